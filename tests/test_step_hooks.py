"""Module and gradient hooks are on the model only while a recorded step runs: an
unrecorded step runs the model as if no Probe were there, and the recorded steps are
what a Probe recording every step records at them."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.hooks import ModuleHook


def _ours(model: nn.Module) -> int:
    """gradprobe's step hooks on the model's modules and parameters."""
    count = 0
    for m in model.modules():
        for table in (m._forward_pre_hooks, m._forward_hooks):
            # the model's own pass hooks (key -1) stay: they only mark where a pass begins
            count += sum(isinstance(h, ModuleHook) and h._key != -1 for h in table.values())
    for p in model.parameters():
        count += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return count


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def _train(model, opt, probe_hooks: list[int] | None, steps: int = 7) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)
        if probe_hooks is not None:
            probe_hooks.append(_ours(model))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("every", [2, 3])
def test_hooks_only_on_recorded_steps_and_the_same_rows(every):
    model = _model()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    seen: list[int] = []
    with Probe(model, opt, every=every) as sparse, Probe(twin, twin_opt) as dense:
        # the same data for both: a step of one, then of the other
        _train(model, opt, seen)
        _train(twin, twin_opt, None)
        a, b = sparse.frame(), dense.frame()
    assert _ours(model) == 0  # closed: nothing left
    for step, hooks in enumerate(seen):
        assert (hooks > 0) == (step % every == 0), (step, hooks)
    assert sorted(a.step.unique()) == [s for s in range(7) if s % every == 0]
    key = ["step", "name", "stat"]
    merged = a.merge(b, on=key, suffixes=("_sparse", "_dense"))
    # dead_window_frac counts recorded steps: it differs by design
    merged = merged[merged.stat != "dead_window_frac"]
    assert len(merged) == len(a[a.stat != "dead_window_frac"])
    np.testing.assert_allclose(merged.value_sparse, merged.value_dense, rtol=1e-6, atol=1e-9)


def test_a_compiled_model_keeps_its_hooks():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(Warning):
        compiled = torch.compile(model, backend="eager")
        probe = Probe(compiled, opt, every=2)
    with probe:
        seen: list[int] = []
        _train(model, opt, seen, steps=3)  # hooks stay on: changing them would recompile
    assert all(h > 0 for h in seen)
