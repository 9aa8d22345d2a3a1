"""The one guard: no entry point of the Probe's can raise into the user's program.

Every callable the Probe hands to PyTorch is a ``gradprobe.hooks.Entry``, made where it is
registered (checked on the source below). A failure is injected into the work behind each
kind of entry point (the method its hook calls, monkeypatched to raise), eagerly, with
the model compiled after the Probe was attached, and with the whole training step
compiled (dynamo traces the module and the optimizer's hooks): training stays
bit-identical to an un-probed twin, one warning names the site, the statistics that site
feeds are absent at every step, and every other statistic matches plain autograd on the
twin (outputs kept by forward hooks of the test's own, ``.grad`` read directly).
"""

from __future__ import annotations

import ast
import copy
import itertools
import math
import pathlib
import warnings

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning
from gradprobe.probe import Probe as ProbeClass
from gradprobe.recording.errors import ErrorCapture
from gradprobe.recording.forward import ForwardCapture
from gradprobe.recording.optstep import OptimizerStep
from gradprobe.recording.params import ParamStats
from gradprobe.recording.passes import Passes
from reference import capture_outputs, error_norms, hook_counts, param_grad_norms

SRC = pathlib.Path(gradprobe.__file__).parent
STEPS = 3
MODULES = ["0", "1", "2", "3", "4"]
TARGET = 2  # the slot (module "2") a per-module failure is injected into
ERROR_STATS = ("error_norm", "error_gain")


def test_every_hook_is_registered_through_the_guard():
    """No module but hooks.py hands a callable to PyTorch: registration is the boundary.
    (The lab's own measurements hook the lab's own models, not a user's program; and
    ``theory.predict(model, x)`` hooks the model for the one forward the user asked it to
    run, removing its hooks before it returns: neither is an entry into training.)"""
    registering = {"register_hook", "register_prehook", "queue_callback"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "hooks.py" or path.relative_to(SRC).parts[0] == "lab":
            continue
        if path.relative_to(SRC).parts == ("theory", "model.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (
                node.attr in registering
                or (node.attr.startswith("register_") and node.attr.endswith("_hook"))
            ):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.attr}")
    assert offenders == []


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))] * STEPS


def _reference(model: nn.Module) -> list[dict[tuple[str, str], float]]:
    """Per step, from plain autograd on an un-probed copy: act_mean and act_std of each
    module's output (float64), ‖dL/d(output)‖, error_gain (in a Sequential, a module's
    input is the previous module's output), each parameter's ‖grad‖ and the global norm."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for x, y in _batches():
        opt.zero_grad()
        loss, outs, _ = capture_outputs(
            model, MODULES, lambda x=x, y=y: nn.functional.cross_entropy(model(x), y)
        )
        errors = error_norms(loss, outs)
        loss.backward()
        ref: dict[tuple[str, str], float] = {}
        for name in MODULES:
            out = outs[name][0].detach().double()
            ref[(name, "act_mean")] = float(out.mean())
            ref[(name, "act_std")] = float(out.std(unbiased=False))
            ref[(name, "error_norm")] = errors[name]
        for before, name in itertools.pairwise(MODULES):
            ref[(name, "error_gain")] = errors[before] / errors[name]
        grads = param_grad_norms(model)
        for name, value in grads.items():
            ref[(name, "grad_norm")] = value
        ref[("(model)", "global_grad_norm")] = math.sqrt(sum(v * v for v in grads.values()))
        steps.append(ref)
        opt.step()
    return steps


def _train(model: nn.Module, probed: bool, mode: str):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(model, opt, every=1) if probed else None

    def step(run: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()

    run, train_step = model, step
    for i, (x, y) in enumerate(_batches()):
        if mode == "compiled_after_attach" and i == 1:  # mid-run, as users do
            run = torch.compile(model, backend="aot_eager")
        if mode == "training_step_compiled" and i == 1:  # the optimizer's hooks traced too
            train_step = torch.compile(step, backend="aot_eager")
        train_step(run, x, y)
    frame = probe.frame() if probe is not None else None
    if probe is not None:
        probe.close()
    return frame


# The component whose method each entry point's hook calls (the Probe's own otherwise).
OWNERS = {
    "on_pre": ForwardCapture,
    "on_forward": ForwardCapture,
    "on_error_grad": ErrorCapture,
    "on_input_share": ErrorCapture,
    "commit_errors": ErrorCapture,
    "note_accumulation": ErrorCapture,
    "on_pass_start": Passes,
    "on_pass_end": Passes,
    "_record_preclip": ParamStats,
    "_on_step_pre": OptimizerStep,
    "_on_step_post": OptimizerStep,
}


def _owner(method: str) -> type:
    return OWNERS.get(method, ProbeClass)


def _raise_when(method: str, when=lambda *a: True):
    original = getattr(_owner(method), method)

    def failing(self, *args, **kwargs):
        if when(*args):
            raise RuntimeError(f"injected into {method}")
        return original(self, *args, **kwargs)

    return failing


# site: (method of the Probe its hook calls, condition on the arguments, the words of the
# warning, which (name, stat) must be absent). Error signals are not kept for a backward
# pass that no post-accumulate hook saw (a failure there leaves them out too).
PARAMS = lambda n, s: "." in n or n == "(model)"  # noqa: E731
CASES = {
    "forward pre-hook": (
        "on_pre",
        lambda k, *a: k == TARGET,
        "forward pre-hook of module '2'",
        lambda n, s: n == "2",
    ),
    "forward hook": (
        "on_forward",
        lambda k, *a: k == TARGET,
        "forward hook of module '2'",
        lambda n, s: n == "2",
    ),
    "pass start": (
        "on_pass_start",
        lambda *a: True,
        "the start of the model's forward",
        lambda n, s: n in MODULES,
    ),
    "pass end": (
        "on_pass_end",
        lambda *a: True,
        "the end of the model's forward",
        lambda n, s: n in MODULES,
    ),
    "output error": (
        "on_error_grad",
        lambda k, g, kind, *a: k == TARGET and kind == "err",
        "backward (output) hook of module '2'",
        lambda n, s: n == "2" and s in ERROR_STATS,
    ),
    "input share": (
        "on_input_share",
        lambda k, *a: k == TARGET,
        "backward (input) hook of module '2'",
        lambda n, s: n == "2" and s == "error_gain",
    ),
    "backward end (errors)": (
        "commit_errors",
        lambda *a: True,
        "the end of backward (errors)",
        lambda n, s: s in ERROR_STATS,
    ),
    "gradient accumulated": (
        "note_accumulation",
        lambda *a: True,
        "a gradient-accumulated hook",
        lambda n, s: PARAMS(n, s) or s in ERROR_STATS,
    ),
    "backward end (pre-clip)": (
        "_record_preclip",
        lambda *a: True,
        "the end of backward (pre-clip norms)",
        PARAMS,
    ),
    "step pre-hook": ("_on_step_pre", lambda *a: True, "the optimizer step (pre-hook)", PARAMS),
    "step post-hook": ("_on_step_post", lambda *a: True, "the optimizer step (post-hook)", PARAMS),
}


@pytest.mark.parametrize("mode", ["eager", "compiled_after_attach", "training_step_compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_failing_entry_point_is_a_warning_and_a_gap(case, mode, monkeypatch):
    compiled = mode != "eager"
    method, when, words, absent = CASES[case]
    torch._dynamo.reset() if compiled else None
    model = _model()
    twin, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    reference = _reference(reference_model)
    before = hook_counts(model)
    monkeypatch.setattr(_owner(method), method, _raise_when(method, when))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = _train(model, probed=True, mode=mode)
    _train(twin, probed=False, mode=mode)
    # Training is the twin's, bit for bit; the Probe left no hook behind.
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert hook_counts(model) == before
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    failed = [m for m in ours if "injected into" in m]
    assert len(failed) == 1 and words in failed[0], ours  # one warning, naming the site
    # Compiled after attach: the Probe learned it (its hooks were traced) and said so once.
    assert sum("is compiled" in m for m in ours) == (1 if compiled else 0)
    rows = {(r.step, r.name, r.stat): r.value for r in frame.itertuples()}
    checked = 0
    for step, ref in enumerate(reference):
        # Traced, the end of the model's forward does nothing (hooks.Site "skip"), but
        # dynamo runs a frame that has no graph left eagerly, hook included: either way.
        either = compiled and step >= 1 and case == "pass end"
        for (name, stat), expected in ref.items():
            got = rows.get((step, name, stat))
            if either and got is None:
                continue
            if absent(name, stat) and not either:
                assert got is None, (step, name, stat, got)
            else:
                # float32 forward/backward against float64 sums of the same float32
                # tensors: rounding of ~1e-7 per op over a few dozen ops; compiled graphs
                # (aot_eager) run the same kernels. 1e-5 relative holds on any CPU.
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (step, name, stat)
                checked += 1
    assert checked > 0


def test_a_users_own_error_still_propagates():
    """The guard wraps the Probe's work, not the user's forward: their error is theirs."""

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("the user's own error")

    model = nn.Sequential(nn.Linear(3, 3), Broken())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_counts(model)
    with Probe(model, opt, every=1), pytest.raises(RuntimeError, match="the user's own error"):
        model(torch.randn(2, 3))
    assert hook_counts(model) == before
