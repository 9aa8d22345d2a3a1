"""Issue 21.1: a step called with a closure is recorded as the gradients the step applies.

``optimizer.step(closure)`` runs the forward, the backward (and, in Lightning, the
accumulation and the clipping) inside the step; some optimizers (LBFGS) evaluate the
closure several times. Each case here is trained under the Probe and, from the same
state, without it (training must be bit-identical), and the Probe's numbers are checked
against the gradients read where the update uses them (:class:`step_twins.ReadingSGD`),
``clip_grad_norm_``'s own return value and autograd on the un-probed twin.

Models are float64: the Probe's norms and the references are then the same sums in
another order, equal to ~n·2⁻⁵³ relative (n ≤ 10³ entries): 1e-10 leaves room on any CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.stats import MODEL_NAME
from step_twins import ReadingSGD, error_norm_sq, global_norm, hook_count, names_of, states_equal
from step_twins import table as stat_table

RTOL = 1e-10


def close(a: float, b: float, rtol: float = RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-300)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 1)
    ).double()


def data(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, (x[:, :1] * 2 - x[:, 1:2]).sin()


# --------------------------------------------------------------------------- Lightning
pl = pytest.importorskip("lightning.pytorch", reason="the [lightning] extra is not installed")


class Regressor(pl.LightningModule):
    """Keeps the gradients Lightning's clipping receives (its hook runs right before it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        self.preclip: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) * 40  # large: clipping acts

    def on_before_optimizer_step(self, optimizer) -> None:
        sq = sum(
            float(p.grad.double().pow(2).sum()) for p in self.parameters() if p.grad is not None
        )
        self.preclip.append(math.sqrt(sq))

    def configure_optimizers(self):
        return ReadingSGD(self.parameters(), lr=0.01, names=names_of(self))


def lightning_fit(callbacks: list, compiled: bool = False) -> Regressor:
    model = Regressor()
    if compiled:  # a compiled network inside the LightningModule, as users write it
        model.net = torch.compile(model.net, backend="aot_eager")
    x, y = data(1, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_steps=4,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    return model


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_lightning_accumulation_and_clipping_record_what_the_step_applies(compiled):
    from gradprobe.integrations.lightning import GradProbeCallback

    callback = GradProbeCallback(every=1)
    model = lightning_fit([callback], compiled)
    twin = lightning_fit([], compiled)
    assert states_equal(model, twin)
    optimizer = model.trainer.optimizers[0]
    assert optimizer.applied == twin.trainer.optimizers[0].applied and len(optimizer.applied) == 4
    assert model.preclip == twin.preclip
    assert all(pre > 0.5 for pre in model.preclip)  # clipping acted at every step

    frame = callback.run().frame()
    for step, applied in enumerate(optimizer.applied):
        for name, norm in applied.items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm), (step, name)
        post = stat_table(frame, "global_grad_norm", MODEL_NAME)[step]
        assert close(post, global_norm(applied)) and close(post, 0.5, 1e-6)
        pre = stat_table(frame, "global_grad_norm_preclip", MODEL_NAME)[step]
        assert close(pre, model.preclip[step])
        assert stat_table(frame, "clipped", MODEL_NAME)[step] == 1.0
        # Both micro-batches of the step: two calls of each module.
        # (a compiled submodule's modules are named as model.named_modules() names them)
        first = "net._orig_mod.0" if compiled else "net.0"
        assert stat_table(frame, "calls", first)[step] == 2.0
    assert hook_count(model, optimizer) == 0


# --------------------------------------------------------------------------- LBFGS
def lbfgs_train(probed: bool) -> tuple[nn.Module, list[dict], Probe | None, bool]:
    """LBFGS evaluates the closure up to max_iter times per step. The reference, taken on
    either run at each step's first evaluation (before the optimizer moves anything):
    the gradients at the step's starting parameters, and ‖dL/dy‖ of the middle layer."""
    model = mlp(0)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=4)
    out = {}
    model[2].register_forward_hook(lambda m, a, o: out.__setitem__("y", o))
    hooks = hook_count(model, opt)
    probe = Probe(model, opt, every=1) if probed else None
    x, y = data(2)
    steps: list[dict] = []
    for _ in range(3):
        evaluations = [0]
        before = [p.detach().clone() for p in model.parameters()]

        def closure(evaluations=evaluations):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            first = evaluations[0] == 0
            if first and not probed:
                steps.append({"err_sq": error_norm_sq(out["y"], loss)})
            loss.backward()
            if first and not probed:
                steps[-1]["grads"] = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
            evaluations[0] += 1
            return loss

        opt.step(closure)
        if not probed:
            steps[-1]["evaluations"] = evaluations[0]
            steps[-1]["ratio"] = {
                n: float((p.detach() - b).norm() / b.norm())
                for (n, p), b in zip(model.named_parameters(), before)
            }
    if probe is not None:
        probe.close()
    return model, steps, probe, hook_count(model, opt) == hooks


def test_lbfgs_records_the_first_evaluation_at_the_starting_parameters():
    model, _, probe, unhooked = lbfgs_train(probed=True)
    twin, steps, _, _ = lbfgs_train(probed=False)
    assert unhooked
    assert states_equal(model, twin)
    assert max(s["evaluations"] for s in steps) > 1  # several evaluations per step: the case
    frame = probe.frame()
    for step, ref in enumerate(steps):
        for name, norm in ref["grads"].items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm)
            assert close(stat_table(frame, "update_ratio", name)[step], ref["ratio"][name])
        assert close(
            stat_table(frame, "global_grad_norm", MODEL_NAME)[step], global_norm(ref["grads"])
        )
        # Its pre-clip norm too (the later evaluations' backward passes end later, at
        # other parameters), and nothing clipped it.
        pre = stat_table(frame, "global_grad_norm_preclip", MODEL_NAME)[step]
        assert close(pre, global_norm(ref["grads"]))
        assert stat_table(frame, "clipped", MODEL_NAME)[step] == 0.0
        # The first evaluation's pass only: one call, its error signal.
        assert stat_table(frame, "calls", "2")[step] == 1.0
        assert close(stat_table(frame, "error_norm", "2")[step] ** 2, ref["err_sq"], 1e-9)


# --------------------------------------------------------------------------- own closure
def closure_loop(probed: bool, optimizer: str) -> tuple[nn.Module, list[dict], Probe | None, bool]:
    """A hand-written closure: two micro-batches accumulated, then clipped, inside it."""
    model = mlp(5)
    names = names_of(model)
    opt = (
        ReadingSGD(model.parameters(), lr=0.05, names=names)
        if optimizer == "reading"
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    )
    out: list[torch.Tensor] = []
    model[4].register_forward_hook(lambda m, a, o: out.append(o))
    hooks = hook_count(model, opt)
    probe = Probe(model, opt, every=1) if probed else None
    steps: list[dict] = []
    for s in range(4):
        ref: dict = {"err_sq": 0.0}

        def closure(ref=ref, s=s):
            opt.zero_grad()
            total = 0.0
            for mb in range(2):
                x, y = data(10 * s + mb, 8)
                loss = nn.functional.mse_loss(model(x), y) * 30
                if not probed:
                    ref["err_sq"] += error_norm_sq(out[-1], loss)
                loss.backward()
                total += float(loss.detach())
            ref["preclip"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3))
            ref["grads"] = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
            return total

        opt.step(closure)
        steps.append(ref)
    if probe is not None:
        probe.close()
    model.optimizer_used = opt  # kept for the test (the Probe holds it weakly)
    return model, steps, probe, hook_count(model, opt) == hooks


@pytest.mark.parametrize("optimizer", ["reading", "sgd_momentum"])
def test_a_closure_with_accumulation_and_clipping_inside(optimizer):
    model, _, probe, unhooked = closure_loop(True, optimizer)
    twin, steps, _, _ = closure_loop(False, optimizer)
    assert unhooked
    assert states_equal(model, twin)
    frame = probe.frame()
    for step, ref in enumerate(steps):
        for name, norm in ref["grads"].items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm)
        assert close(
            stat_table(frame, "global_grad_norm", MODEL_NAME)[step], global_norm(ref["grads"])
        )
        assert close(
            stat_table(frame, "global_grad_norm_preclip", MODEL_NAME)[step], ref["preclip"]
        )
        assert stat_table(frame, "clipped", MODEL_NAME)[step] == float(ref["preclip"] > 0.3)
        assert stat_table(frame, "calls", "4")[step] == 2.0
        assert close(stat_table(frame, "error_norm", "4")[step] ** 2, ref["err_sq"], 1e-9)
    if optimizer == "reading":  # the optimizer's own reading agrees with the closure's
        opt = model.optimizer_used
        assert [global_norm(a) for a in opt.applied] == pytest.approx(
            [global_norm(r["grads"]) for r in steps], rel=RTOL
        )


# --------------------------------------------------------------------------- odd callers
class IgnoresClosure(torch.optim.Optimizer):
    """Takes a closure and calls it only at the steps in ``calls`` (counted from 0)."""

    def __init__(self, params, lr: float, calls: set[int]) -> None:
        super().__init__(params, {"lr": lr})
        self.calls, self.count = calls, 0

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.count += 1
        if closure is not None and self.count - 1 in self.calls:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def odd_loop(probed: bool) -> tuple[nn.Module, list[dict], list[str], Probe | None]:
    """Step 1's closure raises inside the optimizer's step (the loop catches it, as a
    retrying trainer would); at the other steps the optimizer never calls the closure."""
    model = mlp(8)
    opt = IgnoresClosure(model.parameters(), lr=0.05, calls={1})
    probe = Probe(model, opt, every=1) if probed else None
    errors, refs = [], []
    for step in range(4):
        x, y = data(30 + step, 8)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        refs.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})

        def closure() -> torch.Tensor:
            raise ValueError("the user's own error")

        try:
            opt.step(closure)
        except ValueError as exc:
            errors.append(str(exc))
    if probe is not None:
        probe.close()
    return model, refs, errors, probe


def test_a_closure_that_raises_or_is_never_called():
    model, _, errors, probe = odd_loop(True)
    twin, refs, twin_errors, _ = odd_loop(False)
    assert states_equal(model, twin)
    assert errors == twin_errors == ["the user's own error"]  # the user's, unchanged
    frame = probe.frame()
    # Step 1 raised before its update: its pass's gradient was discarded by the next
    # zero_grad(), and the step it would have closed is closed by the next one.
    for step, ref in zip((0, 1, 2), (refs[0], refs[2], refs[3])):
        for name, norm in ref.items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm), (step, name)
        assert stat_table(frame, "calls", "0")[step] == 1.0
    # Given a closure it did not call, the optimizer moved the parameters before they
    # could be copied: no update_ratio, rather than a wrong one.
    assert frame[frame.stat == "update_ratio"].empty
