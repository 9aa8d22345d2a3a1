"""torch.compile: the Probe records every statistic of a compiled model, says once what it costs.

The model may be compiled before the Probe is built or at any time after. Every hook runs
outside the compiled graphs (``gradprobe.hooks.Entry`` leaves the graph when dynamo traces
it): traced, a hook would pass the Probe's weak reference on as the Probe itself, and its
appends to Python lists would guard on list lengths and recompile every call.
The fast test uses dynamo with the ``aot_eager`` backend (no C++ build); the slow one
compiles with inductor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning
from numerics import EPS32, norm_rtol
from reference import capture_outputs, error_norms, hook_counts, param_grad_norms


def train(compiled: bool, backend: str = "aot_eager"):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)
    )
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = torch.compile(model, backend=backend) if compiled else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Probe(run, opt) as probe:
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(run(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
            frame = probe.frame()
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    return frame, ours


def _check_equal(rel: float, backend: str) -> None:
    torch._dynamo.reset()
    eager, eager_warnings = train(False)
    compiled, compiled_warnings = train(True, backend)
    assert eager_warnings == []
    assert len(compiled_warnings) == 1 and "compiled" in compiled_warnings[0]
    assert "modules=[]" in compiled_warnings[0]  # it says how to keep the graph whole
    # and that the attention statistics are the one gap under compile (not "every statistic")
    assert "attention statistics (attn_*), which are a gap" in compiled_warnings[0]
    assert "Every statistic is recorded" not in compiled_warnings[0]
    keys = ["step", "name", "stat"]
    merged = eager.merge(
        compiled, on=keys, how="outer", suffixes=("_eager", "_compiled"), indicator=True
    )
    assert (merged["_merge"] == "both").all()  # every statistic, under the user's names
    assert not any(n.startswith("_orig_mod") for n in compiled.name)
    for row in merged.itertuples():
        assert row.value_compiled == pytest.approx(row.value_eager, rel=rel, abs=1e-7), row


def test_compiled_model_gives_the_eager_statistics():
    _check_equal(rel=1e-6, backend="aot_eager")


def test_compiled_model_does_not_recompile_per_call():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    train(True)
    # One graph per stretch between probed modules, compiled once, not once per call.
    assert counters["stats"]["unique_graphs"] <= 8


@pytest.mark.slow
def test_inductor_compiled_model_gives_the_eager_statistics():
    _check_equal(rel=1e-4, backend="inductor")


# ---------------------------------------------------------------- compiled at any time
# Whether a model is compiled is not known when the Probe is built: the user compiles it
# mid-run, in place, a submodule only, or the whole training step. Each way below trains
# under the Probe and, un-probed, the same way: the parameters end bit-identical, no hook
# is left after close(), one warning says the model is compiled, and the statistics are
# those plain autograd gives on an eager, un-probed copy.
MODULES = ["0", "1", "2", "3", "4"]
STEPS = 5


def _sequential() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _reference_stats(model: nn.Module) -> list[dict[tuple[str, str], float]]:
    """Per step, by autograd on an eager copy: act_mean (float64), ‖dL/d(output)‖ of each
    module, each parameter's ‖grad‖ read from .grad."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        loss, outs, _ = capture_outputs(
            model, MODULES, lambda x=x, y=y: nn.functional.cross_entropy(model(x), y)
        )
        errors = error_norms(loss, outs)
        loss.backward()
        ref = {(n, "act_mean"): float(outs[n][0].detach().double().mean()) for n in MODULES}
        ref.update({(n, "error_norm"): errors[n] for n in MODULES})
        ref.update({(n, "grad_norm"): v for n, v in param_grad_norms(model).items()})
        steps.append(ref)
        # What each value's tolerance is derived from (see _tolerance).
        SCALES.update(
            {(n, "act_mean"): (outs[n][0].numel(), float(outs[n][0].abs().mean())) for n in MODULES}
        )
        SCALES.update({(n, "error_norm"): (outs[n][0].numel(), 0.0) for n in MODULES})
        SCALES.update({(n, "grad_norm"): (p.numel(), 0.0) for n, p in model.named_parameters()})
        opt.step()
    return steps


# (name, stat) → (entries, mean |entry|) of the tensor the statistic is of.
SCALES: dict[tuple[str, str], tuple[int, float]] = {}


def _tolerance(name: str, stat: str, expected: float) -> float:
    """How far a float32 statistic of n entries may be from the float64 one of the same
    float32 tensors, in any order of summation (another CPU's vector width): a 2-norm
    within norm_rtol(n) relative (tests/numerics.py); a mean within (n + 1)·eps·mean|y|
    absolute (each of the n − 1 additions rounds by at most eps/2 of a running sum of at
    most Σ|y|, and the division once more). The float64 reference's own rounding is far
    below either. (act_mean's mean |y| is of the step it was last seen at: the scale of a
    few steps of a small model moves little, and the bound has a factor 2 to spare.)"""
    n, mean_abs = SCALES[(name, stat)]
    if stat == "act_mean":
        return (n + 1) * EPS32 * max(mean_abs, abs(expected))
    return norm_rtol(n) * abs(expected)


def _compile_model_mid_run(model, opt, step, run):
    """The issue's case: `model = torch.compile(model)` after three eager steps."""
    return torch.compile(model, backend="aot_eager") if step == 3 else run


def _compile_in_place(model, opt, step, run):
    if step == 2:
        model.compile(backend="aot_eager")  # nn.Module.compile: the same object, compiled
    return run


def _compile_a_submodule(model, opt, step, run):
    if step == 1:
        model[2].compile(backend="aot_eager")
    return run


def _loop(model, opt, run, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(run(x), y).backward()
    opt.step()


def _closure_loop(model, opt, run, x, y):
    """The step through a closure, as Lightning and LBFGS users write it."""

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        return loss

    return opt.step(closure)


WAYS = {
    "compiled_mid_run": _compile_model_mid_run,
    "compiled_in_place": _compile_in_place,
    "submodule_compiled": _compile_a_submodule,
}


def _train_way(way: str, probed: bool, every: int = 1):
    model = _sequential()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_counts(model)
    probe = Probe(model, opt, every=every) if probed else None
    run = model
    train_step = None
    for step in range(STEPS):
        x, y = _data(step)
        if way in ("training_step_compiled", "closure_step_compiled"):
            # The whole step compiled from the start, the optimizer's hooks traced too (and
            # the closure the Probe hands the optimizer, with its backward inside).
            if train_step is None:
                loop = _loop if way == "training_step_compiled" else _closure_loop
                train_step = torch.compile(loop, backend="aot_eager")
            train_step(model, opt, model, x, y)
            continue
        run = WAYS[way](model, opt, step, run)
        _loop(model, opt, run, x, y)
    frame = None
    if probe is not None:
        frame = probe.frame()
        probe.close()
        assert hook_counts(model) == before
    return model, frame


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("way", [*WAYS, "training_step_compiled", "closure_step_compiled"])
def test_a_model_compiled_at_any_time_is_recorded_right(way, every):
    torch._dynamo.reset()
    reference = _reference_stats(_sequential())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probed, frame = _train_way(way, probed=True, every=every)
    torch._dynamo.reset()
    twin, _ = _train_way(way, probed=False)
    for (name, p), q in zip(probed.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name  # training is the un-probed twin's, bit for bit
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(ours) == 1 and "is compiled" in ours[0], ours
    rows = {(r.step, r.name, r.stat): r.value for r in frame.itertuples()}
    for step, ref in enumerate(reference):
        if step % every:
            continue
        for (name, stat), expected in ref.items():
            # float32 against float64 sums of the same float32 tensors (aot_eager runs the
            # same kernels): within _tolerance's bound, on any CPU.
            got = rows.get((step, name, stat))
            tol = _tolerance(name, stat, expected)
            assert got == pytest.approx(expected, rel=0, abs=tol), (way, step, name, stat)


def test_parameters_only_compile_whole_with_fullgraph():
    """modules=[] (the warning's advice) leaves no hook that must break the graph: the model
    compiles with fullgraph=True, after attach, and the parameter rows and the logged loss
    are those of plain autograd at their own steps."""
    torch._dynamo.reset()
    reference = _reference_stats(_sequential())
    losses = []

    def train(probed: bool):
        model = _sequential()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = Probe(model, opt, every=1, modules=[]) if probed else None
        run = model
        for step in range(STEPS):
            if step == 1:
                run = torch.compile(model, backend="aot_eager", fullgraph=True)
            x, y = _data(step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(run(x), y)
            loss.backward()
            if probe is not None:
                probe.log(loss=loss)  # between backward and step: this step's
                losses.append(float(loss))
            opt.step()
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
        return model, frame

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probed, frame = train(True)
    torch._dynamo.reset()
    twin, _ = train(False)
    for (name, p), q in zip(probed.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert [w for w in caught if issubclass(w.category, GradprobeWarning)] == []
    rows = {(r.step, r.name, r.stat): r.value for r in frame.itertuples()}
    for step, ref in enumerate(reference):
        for (name, stat), expected in ref.items():
            if stat == "grad_norm":  # float32 norms against float64: 1e-5 on any CPU
                assert rows[(step, name, stat)] == pytest.approx(expected, rel=1e-5)
        assert rows[(step, "(model)", "loss")] == pytest.approx(losses[step], rel=1e-6)


def test_compiled_autograd_leaves_the_error_signals_out_with_a_warning():
    """Compiled autograd runs the backward as a compiled graph: the Probe's backward hooks do
    not see it whole, so the error statistics are absent (one warning), the rest right."""
    torch._dynamo.reset()
    reference = _reference_stats(_sequential())

    def train(probed: bool):
        model = _sequential()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = Probe(model, opt, every=1) if probed else None
        run = torch.compile(model, backend="aot_eager")

        @torch.compile(backend="aot_eager")
        def forward_backward(x, y):
            nn.functional.cross_entropy(run(x), y).backward()

        with torch._dynamo.config.patch(compiled_autograd=True):
            for step in range(STEPS):
                opt.zero_grad()
                forward_backward(*_data(step))
                opt.step()
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
        return model, frame

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probed, frame = train(True)
    torch._dynamo.reset()
    twin, _ = train(False)
    for (name, p), q in zip(probed.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    assert sum("compiled autograd" in m for m in ours) == 1, ours
    assert frame[frame.stat.isin(["error_norm", "error_gain"])].empty
    rows = {(r.step, r.name, r.stat): r.value for r in frame.itertuples()}
    for step, ref in enumerate(reference):
        for (name, stat), expected in ref.items():
            if stat != "error_norm":  # float32 against float64: _tolerance's bound
                got = rows.get((step, name, stat))
                tol = _tolerance(name, stat, expected)
                assert got == pytest.approx(expected, rel=0, abs=tol), (step, name, stat)
