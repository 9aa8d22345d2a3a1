"""torch.compile: the Probe records every statistic of a compiled model, says once what it costs.

The module hooks run outside the compiled graphs (``torch.compiler.disable``): traced,
their appends to Python lists would guard on list lengths and recompile every call.
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
