"""Issue 21.3: the model as it is at each step — a head replaced, a module added, a layer
wrapped, parameter groups added while training.

Each change is made mid-run, the way fine-tuning code does it, under a Probe and, from the
same state, without one (training must be bit-identical). The references come from the
un-probed twin: ``.grad`` read right before each step, the optimizer's own parameters
for the global norm, autograd for the error signal, the outputs for the activations.
Rows of a replaced module continue under its name from the step of the change; nothing
is recorded for what left the model, and nothing wrong (no false ``grad_missing``).

Float64 models: the Probe's norms and the references are the same sums in another order
(~n·2⁻⁵³ relative, n ≤ 10³), so 1e-9 holds on any CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning
from gradprobe.stats import MODEL_NAME
from step_twins import error_norm_sq, hook_count, states_equal
from step_twins import table as stat_table

RTOL = 1e-9
CHANGE_AT = 3
STEPS = 6


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-300)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU())
        self.extra: nn.Module | None = None
        self.head: nn.Module = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.extra is not None:
            h = h + self.extra(h)
        return self.head(h)


class LoRA(nn.Module):
    """A wrapped layer: the base frozen, a low-rank update trained (its own parameters)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        g = torch.Generator().manual_seed(5)
        self.A = nn.Parameter(
            torch.randn(rank, base.in_features, generator=g, dtype=torch.float64) * 0.1
        )
        self.B = nn.Parameter(
            torch.randn(base.out_features, rank, generator=g, dtype=torch.float64) * 0.1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.A.T @ self.B.T


def swap_head(model: Net, opt: torch.optim.Optimizer) -> list[str]:
    torch.manual_seed(21)
    model.head = nn.Linear(16, 3).double()  # fine-tuning: a fresh head
    opt.add_param_group({"params": list(model.head.parameters())})
    return ["head"]


def add_module(model: Net, opt: torch.optim.Optimizer) -> list[str]:
    torch.manual_seed(22)
    model.extra = nn.Sequential(nn.Linear(16, 16), nn.SiLU()).double()
    opt.add_param_group({"params": list(model.extra.parameters()), "lr": 0.01})
    return ["extra.0", "extra.1"]


def wrap_layer(model: Net, opt: torch.optim.Optimizer) -> list[str]:
    model.body[2] = LoRA(model.body[2])
    opt.add_param_group({"params": [model.body[2].A, model.body[2].B]})
    return ["body.2", "body.2.base"]


CHANGES: dict[str, Callable[[Net, torch.optim.Optimizer], list[str]]] = {
    "swap_head": swap_head,
    "add_module": add_module,
    "wrap_layer": wrap_layer,
}


def train(change: str, probed: bool, every: int | str, store: str | None = None) -> dict:
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hooks = hook_count(model, opt)
    probe = Probe(model, opt, every=every, store=store) if probed else None
    gen = torch.Generator().manual_seed(3)
    refs, watched = [], []
    for step in range(STEPS):
        if step == CHANGE_AT:
            watched = CHANGES[change](model, opt)
        x = torch.randn(12, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(12, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        outputs: dict[str, torch.Tensor] = {}
        handles = [
            dict(model.named_modules())[n].register_forward_hook(
                lambda m, a, o, n=n, outputs=outputs: outputs.__setitem__(n, o)
            )
            for n in watched
        ]
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
        ref: dict = {}
        if not probed:
            ref["head_err_sq"] = error_norm_sq(out, loss)
            ref["act_mean"] = {n: float(o.detach().mean()) for n, o in outputs.items()}
        loss.backward()
        for h in handles:
            h.remove()
        if not probed:
            ref["grads"] = {
                n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None
            }
            held = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            ref["global"] = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in held))
        opt.step()
        refs.append(ref)
    if probe is not None:
        probe.close()
    return {
        "model": model,
        "refs": refs,
        "watched": watched,
        "probe": probe,
        "unhooked": hook_count(model, opt) == hooks,
    }


@pytest.mark.parametrize("every", [1, "auto"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_the_model_is_followed_as_it_is_at_each_step(change, every):
    run = train(change, True, every)
    twin = train(change, False, every)
    assert states_equal(run["model"], twin["model"])
    assert run["unhooked"]
    frame = run["probe"].frame()
    for step, ref in enumerate(twin["refs"]):
        for name, norm in ref["grads"].items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm), (step, name)
        # Over the gradients the optimizer holds (an old head's are gone: not counted).
        assert close(stat_table(frame, "global_grad_norm", MODEL_NAME)[step], ref["global"]), step
        assert close(stat_table(frame, "global_grad_norm_preclip", MODEL_NAME)[step], ref["global"])
        # The model's output, whichever head made it.
        assert stat_table(frame, "calls", "head")[step] == 1.0
        assert close(stat_table(frame, "error_norm", "head")[step] ** 2, ref["head_err_sq"]), step
        for name, mean in ref["act_mean"].items():
            assert close(stat_table(frame, "act_mean", name)[step], mean), (step, name)
            assert stat_table(frame, "calls", name)[step] == 1.0
    # Nothing recorded as missing: every parameter the optimizer steps got its gradient.
    assert frame[frame.stat == "grad_missing"].empty
    # Parameters that left the model have no rows after the change.
    gone = {n for n, _ in Net().named_parameters()} - {
        n for n, _ in run["model"].named_parameters()
    }
    late = frame[(frame.step >= CHANGE_AT) & frame.name.isin(gone)]
    assert late.empty, late


def test_a_change_reaches_the_store_and_its_meta(tmp_path):
    run = train("swap_head", True, 1, store=str(tmp_path / "run"))
    loaded = gradprobe.load(tmp_path / "run")
    heads = [m for m in loaded.meta["modules"] if m["name"] == "head"]
    assert len(heads) == 2  # the head of the first steps, and the new one
    assert sum(p["name"] == "head.weight" for p in loaded.meta["parameters"]) == 2
    table = loaded.frame()
    grads = table[(table.stat == "grad_norm") & (table.name == "head.weight")]
    assert sorted(grads.step) == list(range(STEPS))
    assert run["unhooked"]
    # What reads a run takes the two heads as one name: a table, the diagnosis, a report.
    assert list(loaded.table("grad_norm")["head.weight"].index) == list(range(STEPS))
    gradprobe.diagnose(loaded)
    import matplotlib.pyplot as plt

    loaded.plot()
    plt.close("all")


def test_a_module_replaced_between_steps_without_an_optimizer():
    """No optimizer: ``probe.step()`` marks the step, and the change is followed there."""
    torch.manual_seed(0)
    model = Net().double()
    probe = Probe(model, every=1)
    gen = torch.Generator().manual_seed(4)
    expected = []
    for step in range(4):
        if step == 2:
            model.head = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3)).double()
        x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
        model.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        expected.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
        probe.step()
    probe.close()
    frame = probe.frame()
    for step, grads in enumerate(expected):
        for name, norm in grads.items():
            assert close(stat_table(frame, "grad_norm", name)[step], norm), (step, name)
    assert set(stat_table(frame, "calls", "head.1")) == {2, 3}


def test_a_selection_by_name_follows_the_module_under_that_name():
    """``modules=[...]``: a replaced module under a selected name is probed; a selected
    name the model no longer has is simply not there (no error mid-training)."""
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = Probe(model, opt, every=1, modules=["head", "body.1"])
    gen = torch.Generator().manual_seed(6)
    outputs = []
    for step in range(4):
        if step == 2:
            model.head = nn.Linear(16, 3).double()
            model.body[1] = nn.Identity()  # "body.1" is now an Identity: followed too
            opt.add_param_group({"params": list(model.head.parameters())})
        x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        out = model(x)
        outputs.append(float(out.detach().mean()))
        out.pow(2).mean().backward()
        opt.step()
    probe.close()
    frame = probe.frame()
    modules = set(frame[frame.stat == "calls"].name)
    assert modules == {"head", "body.1"}
    for step, mean in enumerate(outputs):
        assert close(stat_table(frame, "act_mean", "head")[step], mean)
    assert [m["type"] for m in probe.meta["modules"]] == ["Tanh", "Linear", "Identity", "Linear"]


@pytest.mark.parametrize("every", [1, "auto"])
def test_a_change_that_cannot_be_followed_leaves_everything_after_it_out(monkeypatch, every):
    """Binding the changed model fails part-way (a failure injected after the buffer grew):
    the Probe's bindings cannot be trusted any more, so it records nothing from that step
    on — one warning says so — while the steps before stay, and training is untouched."""
    from gradprobe.follow import Follow

    real = Follow._rebind

    def failing(self, model):
        real(self, model)  # the buffer, slots and hooks changed ...
        raise RuntimeError("injected after binding")  # ... and then it failed

    def train(probed: bool):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        probe = Probe(model, opt, every=every) if probed else None
        g = torch.Generator().manual_seed(2)
        for step in range(STEPS):
            if step == CHANGE_AT:
                torch.manual_seed(9)
                model.head = nn.Linear(16, 3)
                opt.add_param_group({"params": list(model.head.parameters())})
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
            assert hook_count(model, opt) == 0
        return model, frame

    monkeypatch.setattr(Follow, "_rebind", failing)
    with pytest.warns(GradprobeWarning) as caught:
        model, frame = train(True)
    twin, _ = train(False)
    assert states_equal(model, twin)
    said = [str(w.message) for w in caught]
    assert any("injected after binding" in m for m in said)
    assert sum("records nothing from this step on" in m for m in said) == 1
    # Absent, never wrong: only the optimizer's learning rate, read from it, goes on.
    assert set(frame[frame.step >= CHANGE_AT].stat) <= {"lr"}
    before = frame[frame.step < CHANGE_AT]
    assert set(before.step) == set(range(CHANGE_AT))
    assert (before[before.stat == "grad_norm"].value > 0).all()
