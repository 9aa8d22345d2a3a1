"""The sentinel's short route (recording/sentinel.py) under training loops as users write
them: accumulation, closures (Lightning's, LBFGS), no optimizer, frozen and unused
parameters, sparse gradients with two optimizers, a GradScaler, two dtypes, a model
changed mid-step, ``create_graph`` backward, a forward that raises (issue 26). The
harness and what it checks: tests/sentinel_twins.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gradprobe.recording.clock import AUTO_BURST, AUTO_EVERY, AUTO_FIRST
from gradprobe.stats import MODEL_NAME
from sentinel_twins import (
    AT,
    SENTINEL_STEPS,
    STEPS,
    Attach,
    Paths,
    TwoPart,
    batch,
    check,
    log,
    mlp,
    never_armed,
    taken_everywhere,
    watch_paths,
)


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    return watch_paths(monkeypatch)


# ---------------------------------------------------------------- 1. a plain loop
def _plain(kind: str) -> Callable[[Attach], nn.Module]:
    def case(attach: Attach) -> nn.Module:
        model = mlp()
        if kind == "sgd":  # no clipping: the step reuses the norms backward left
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
        else:  # clipped: the step's norms are a second pass
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=STEPS)
        probe = attach(model, opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            x, y = batch(gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if kind == "adamw":
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            sched.step()
            log(probe, loss=loss)  # after the step: the step that just closed
        return model

    return case


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_plain_loop_takes_the_short_route(paths, kind):
    sentinels = check(_plain(kind), paths)
    taken_everywhere(paths, sentinels)


def _nan_at_a_sentinel(stats: Any) -> Callable[[Attach], nn.Module]:
    """A NaN in the data at a sentinel step (its gradients are NaN), the weights mended
    after the step, under a choice of statistics."""

    def case(attach: Attach) -> nn.Module:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        probe = attach(model, opt, stats=stats)
        gen = torch.Generator().manual_seed(15)
        for step in range(STEPS):
            x, y = batch(gen)
            if step == AT:
                x[3, 2] = float("nan")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            log(probe, loss=loss)
            if step == AT:  # the data's NaN is gone, and so is the weights'
                with torch.no_grad():
                    for p in model.parameters():
                        p.nan_to_num_(0.0)
        return model

    return case


NAN_STATS = ["grad_norm", "nonfinite", "global_grad_norm_preclip", "lr", "loss"]


@pytest.mark.parametrize("stats", ["cheap", "full", NAN_STATS], ids=["cheap", "full", "list"])
def test_a_nan_at_a_sentinel_step_under_other_statistics(paths, stats):
    # The NaN step's flags (counts under "full") start a burst of recorded steps.
    burst = set(range(AT + 1, AT + 1 + AUTO_BURST))
    recorded = set(range(AUTO_FIRST)) | {AUTO_EVERY} | burst
    said = f"gradprobe: step {AT}: NaN/Inf in `{MODEL_NAME}` (global_grad_norm)"
    sentinels = check(_nan_at_a_sentinel(stats), paths, recorded, frozenset({said}))
    taken_everywhere(paths, sentinels, expected=SENTINEL_STEPS - burst)


# ---------------------------------------------------------------- 2. accumulation
def _accumulating(set_to_none: bool) -> Callable[[Attach], nn.Module]:
    def case(attach: Attach) -> nn.Module:
        return _accumulate(attach, set_to_none)

    return case


def _accumulate(attach: Attach, set_to_none: bool) -> nn.Module:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=set_to_none)  # False: the same .grad, zeroed in place
        for _micro in range(2):
            x, y = batch(gen, 8)
            loss = nn.functional.mse_loss(model(x), y)
            (loss / 2).backward()  # the pre-clip norm is of the sum of both, after the last
            log(probe, loss=loss)
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    return model


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradient_accumulation_measures_after_each_backward_and_the_last_wins(paths, set_to_none):
    sentinels = check(_accumulating(set_to_none), paths)
    taken_everywhere(paths, sentinels, backwards=2)


# ---------------------------------------------------------------- 3. closures
def _lightning_closure(attach: Attach) -> nn.Module:
    """As Lightning's automatic optimisation: zero_grad, backward and clipping inside the
    closure that ``optimizer.step`` calls."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        x, y = batch(gen)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            log(probe, loss=loss)
            return loss

        opt.step(closure)
    return model


def _lbfgs(attach: Attach) -> nn.Module:
    """LBFGS: the closure evaluated several times a step (its line search); the step's
    gradients are those of the first evaluation."""
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3, history_size=4)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(4)
    evaluations = [0]
    for _ in range(STEPS):
        x, y = batch(gen)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            evaluations[0] += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        log(probe, loss=loss)
    assert evaluations[0] > 2 * STEPS  # several a step
    return model


def test_a_lightning_closure_takes_the_short_route(paths):
    sentinels = check(_lightning_closure, paths)
    taken_everywhere(paths, sentinels)


def test_lbfgs_evaluations_after_the_first_are_not_the_steps(paths):
    sentinels = check(_lbfgs, paths)
    # One backward measured per step (the first evaluation's); the search's are not.
    taken_everywhere(paths, sentinels)


# ---------------------------------------------------------------- 4. no optimizer
def _manual(attach: Attach) -> nn.Module:
    model = mlp()
    probe = attach(model)
    gen = torch.Generator().manual_seed(5)
    lr = 0.05
    for step in range(STEPS):
        x, y = batch(gen)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        log(probe, loss=loss, lr=lr)
        if probe is not None:
            probe.step()
        lr = 0.05 / (1 + step / 20)
    return model


def test_probe_step_without_an_optimizer_takes_the_short_route(paths):
    sentinels = check(_manual, paths)
    taken_everywhere(paths, sentinels)


# ---------------------------------------------------------------- 5. gradients missing
class Branchy(nn.Module):
    """A trunk, a head, and an auxiliary head used on even steps only; ``frozen``: the
    input layer is frozen from the start (fine-tuning a pretrained stem)."""

    def __init__(self, frozen: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(8, 16).requires_grad_(not frozen)
        self.trunk = nn.Sequential(nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.aux = nn.Linear(16, 1)
        self.use_aux = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(self.stem(x))
        out = self.head(h)
        return out + self.aux(h) if self.use_aux else out


def _branchy(frozen: bool, branch: bool, unfreeze_at: int = -1) -> Callable[[Attach], nn.Module]:
    """``unfreeze_at``: the frozen stem is unfrozen at that step (gradual unfreezing), and
    handed to the optimizer then, at its own learning rate."""

    def case(attach: Attach) -> nn.Module:
        model = Branchy(frozen)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        probe = attach(model, opt)
        gen = torch.Generator().manual_seed(6)
        for step in range(STEPS):
            if step == unfreeze_at:
                model.stem.requires_grad_(True)
                opt.add_param_group({"params": list(model.stem.parameters()), "lr": 1e-4})
            model.use_aux = not branch or step % 2 == 0
            x, y = batch(gen)
            opt.zero_grad()  # (set_to_none: an unused branch has no .grad)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            log(probe, loss=loss)
        return model

    return case


def test_a_branch_unused_at_some_steps_falls_back_at_those_steps(paths):
    sentinels = check(_branchy(frozen=False, branch=True), paths)
    assert sentinels == SENTINEL_STEPS
    odd = {s for s in sentinels if s % 2}
    assert paths.short_steps() == sentinels - odd
    assert set(paths.general) == odd  # aux has no gradient: the general path's rows
    assert set(paths.short_backward) == sentinels - odd


def test_a_parameter_frozen_from_the_start_takes_the_short_route(paths):
    # It is bound (the Probe binds every parameter of the model) and never has a .grad:
    # the route measures the trainable ones (a frozen backbone, LoRA), with the same rows.
    sentinels = check(_branchy(frozen=True, branch=False), paths)
    assert sentinels == SENTINEL_STEPS
    assert not paths.general
    assert paths.short_steps() == sentinels
    assert set(paths.short_backward) == sentinels


def test_a_stem_unfrozen_mid_run_takes_the_short_route_throughout(paths):
    # Frozen when the Probe was made (so no gradient hook of its own), unfrozen at AT:
    # its first gradient, at AT's backward, lays the route out again with it.
    sentinels = check(_branchy(frozen=True, branch=False, unfreeze_at=AT), paths)
    assert sentinels == SENTINEL_STEPS
    assert not paths.general
    assert paths.short_steps() == sentinels
    assert set(paths.short_backward) == sentinels


# ---------------------------------------------------------------- 6. sparse gradients
class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8, sparse=True)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def _sparse(attach: Attach) -> nn.Module:
    """Two optimizers, as ``nn.Embedding(sparse=True)`` needs: SparseAdam for the table,
    Adam for the rest; the Probe watches one (it takes one: the dense one, stepped last)."""
    model = Bag()
    sparse = torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-2)
    dense = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    probe = attach(model, dense)
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        ids = torch.randint(0, 40, (16, 5), generator=gen)  # repeated ids: uncoalesced
        y = torch.randn(16, 1, generator=gen)
        sparse.zero_grad()
        dense.zero_grad()
        loss = nn.functional.mse_loss(model(ids), y)
        loss.backward()
        sparse.step()
        dense.step()
        log(probe, loss=loss)
    return model


def test_sparse_gradients_fall_back(paths):
    sentinels = check(_sparse, paths)
    assert sentinels == SENTINEL_STEPS
    assert set(paths.general) == sentinels
    assert not paths.short_backward and not paths.short_steps()


# ---------------------------------------------------------------- 7. a GradScaler
def _scaled(
    dtype: torch.dtype, tell_probe: bool, overflow: bool = False, enabled: bool = True
) -> Callable[[Attach], nn.Module]:
    """The AMP loop. ``overflow``: at a sentinel step the scaled gradients overflow in
    fp16 and the scaler skips the optimizer step (a Probe not told of the scaler then
    sees one step of two iterations). ``enabled``: ``GradScaler(enabled=use_amp)``."""

    def case(attach: Attach) -> nn.Module:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        # A small initial scale: no overflow but the one asked for.
        scaler = torch.amp.GradScaler(
            "cpu", init_scale=256.0, growth_interval=10, enabled=enabled
        )
        probe = attach(model, opt, **({"scaler": scaler} if tell_probe else {}))
        gen = torch.Generator().manual_seed(8)
        skipped = 0
        for it in range(STEPS + int(overflow)):
            x, y = batch(gen)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), y)
            big = 1e35 if overflow and it == AT else 1.0  # x256: above fp16's range
            scaler.scale(loss * big).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < scale
            log(probe, loss=loss)
        assert skipped == int(overflow)
        return model

    return case


@pytest.mark.parametrize(
    ("dtype", "overflow"),
    [(torch.bfloat16, False), (torch.float16, False), (torch.float16, True)],
    ids=["bf16", "fp16", "fp16-overflow"],
)
def test_a_watched_grad_scaler_keeps_the_route_unarmed(paths, dtype, overflow):
    sentinels = check(_scaled(dtype, tell_probe=True, overflow=overflow), paths)
    if overflow:  # one more iteration: the skipped one is a step of its own
        assert sentinels == SENTINEL_STEPS | {STEPS}
        assert AT not in paths.at_step
    else:
        assert sentinels == SENTINEL_STEPS
    never_armed(paths, set(paths.at_step))


def test_a_disabled_grad_scaler_keeps_the_route(paths):
    # GradScaler(enabled=use_amp) with use_amp off: scale(), step() and update() pass
    # through, so the route is armed as without a scaler.
    sentinels = check(_scaled(torch.bfloat16, tell_probe=True, enabled=False), paths)
    assert sentinels == SENTINEL_STEPS
    taken_everywhere(paths, sentinels)


@pytest.mark.parametrize("overflow", [False, True], ids=["bf16", "fp16-overflow"])
def test_a_grad_scaler_the_probe_is_not_told_of(paths, overflow):
    # Then the pre-clip norms are of the scaled gradients, on either path alike.
    dtype = torch.float16 if overflow else torch.bfloat16
    sentinels = check(_scaled(dtype, tell_probe=False, overflow=overflow), paths)
    if not overflow:
        taken_everywhere(paths, sentinels)
        return
    # The skipped iteration and the next are one step: two backward passes measured.
    assert AT in sentinels and AT in paths.short_steps()
    assert paths.short_backward[AT] == 2
    assert not paths.general


# ---------------------------------------------------------------- 8. two dtypes
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1).double()  # a float64 head (a precise readout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).double())


def _mixed(attach: Attach) -> nn.Module:
    model = Mixed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(9)
    for _ in range(STEPS):
        x, y = batch(gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y.double())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        log(probe, loss=loss)
    return model


def test_parameters_of_two_dtypes_keep_the_route_unarmed(paths):
    sentinels = check(_mixed, paths)
    assert sentinels == SENTINEL_STEPS
    never_armed(paths, sentinels)


# ---------------------------------------------------------------- 9. changes, create_graph
def _head_replaced_before_the_step(parts: bool) -> Callable[[Attach], nn.Module]:
    """A new head after backward, before the optimizer step (a callback that swaps it),
    at a sentinel step: that step applies the old head's gradients. ``parts``: the loop
    calls the model's parts (``model.head(model.body(x))``), not the model: no forward
    of the model follows it, and the change is found at the optimizer step itself."""

    def case(attach: Attach) -> nn.Module:
        model = TwoPart()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        probe = attach(model, opt)
        gen = torch.Generator().manual_seed(10)
        for step in range(STEPS):
            x, y = batch(gen)
            opt.zero_grad()
            out = model.head(model.body(x)) if parts else model(x)
            loss = nn.functional.mse_loss(out, y)
            loss.backward()
            if step == AT:
                torch.manual_seed(11)
                model.head = nn.Linear(16, 1)
                opt.add_param_group({"params": list(model.head.parameters()), "lr": 0.02})
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            log(probe, loss=loss)
        return model

    return case


@pytest.mark.parametrize("parts", [False, True], ids=["model", "parts"])
def test_a_head_replaced_between_backward_and_the_step(paths, parts):
    sentinels = check(_head_replaced_before_the_step(parts), paths)
    assert sentinels == SENTINEL_STEPS
    # The change is found at the next forward of the model, or at the optimizer step
    # when there is none: the armed step hands over to the general path there (its
    # backward, measured before the change, on the short route where the change came
    # after it). From the next step on the route is armed again, over the parameters
    # still in the model (the old head's have left it: sentinel.py).
    change = AT if parts else AT + 1
    backward_after = parts  # the change found after that step's backward
    assert set(paths.short_backward) == {s for s in sentinels if s != change or backward_after}
    assert paths.short_steps() == {s for s in sentinels if s != change}
    assert set(paths.general) == {change}


def _double_backward(kind: str) -> Callable[[Attach], nn.Module]:
    def case(attach: Attach) -> nn.Module:
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        probe = attach(model, opt)
        gen = torch.Generator().manual_seed(12)
        for _ in range(STEPS):
            x, y = batch(gen)
            opt.zero_grad()
            if kind == "penalty":  # WGAN-GP: ‖∂out/∂x‖² in the loss
                x.requires_grad_(True)
                out = model(x)
                (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
                loss = nn.functional.mse_loss(out, y) + 0.1 * dx.pow(2).sum(1).mean()
                loss.backward()
            else:  # .grad with a graph (higher-order methods read it before the step)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward(create_graph=True)
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
            log(probe, loss=loss)
        if kind == "create_graph":  # the reference cycle each .grad holds (torch's warning)
            opt.zero_grad()
        return model

    return case


@pytest.mark.parametrize("kind", ["penalty", "create_graph"])
def test_double_backward_takes_the_short_route(paths, kind):
    sentinels = check(_double_backward(kind), paths)
    taken_everywhere(paths, sentinels)


# ---------------------------------------------------------------- 10. a forward raises
class Flaky(nn.Module):
    """Raises half-way through its forward when told to (an out-of-memory error, a bad
    batch), after its first layers ran."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[:2](x)
        if self.fail:
            self.fail = False
            raise RuntimeError("out of memory (simulated)")
        return self.net[2:](h)


RETRY_AT = AT  # the forward raises; the batch is halved and tried again
DROP_AT = AT + 4  # the second micro-batch's forward raises; the whole batch is dropped


def _flaky(attach: Attach) -> nn.Module:
    model = Flaky()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = attach(model, opt)
    gen = torch.Generator().manual_seed(13)
    step, dropped = 0, False
    while step < STEPS:
        x, y = batch(gen)
        opt.zero_grad()
        try:
            model.fail = step == RETRY_AT
            loss = nn.functional.mse_loss(model(x), y)
        except RuntimeError:
            x, y = x[:8], y[:8]
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        try:
            model.fail = step == DROP_AT and not dropped
            loss2 = nn.functional.mse_loss(model(x.flip(0)), y.flip(0))
        except RuntimeError:
            dropped = True
            opt.zero_grad()
            continue  # no step for this batch
        loss2.backward()
        opt.step()
        log(probe, loss=loss)
        step += 1
    return model


def test_a_forward_that_raises_and_is_caught(paths):
    sentinels = check(_flaky, paths)
    assert sentinels == SENTINEL_STEPS
    assert paths.short_steps() == sentinels and not paths.general
    # Two backward passes a step; at DROP_AT, the dropped batch's first one too.
    assert paths.short_backward == {s: 3 if s == DROP_AT else 2 for s in sentinels}
