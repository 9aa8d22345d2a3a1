"""The default cadence's sentinel steps record exactly what a Probe recording every step
records for the same statistics (issue 26: a shorter Python path for the sentinel must
not change one number).

The twin is a Probe with ``every=1`` on an identical model and data: its rows of the
sentinel's statistics at every step are the independent reference (computed by the full
recording path), compared bit for bit: both paths take the same ``_foreach_norm`` over the
same gradients, so no tolerance is needed. The run has a logged loss, gradient clipping,
a gradient-norm spike, a step with NaN gradients, a layer replaced mid-run, and a bf16
autocast variant; training with either Probe must stay bit-identical to training without.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.step import AUTO_EVERY, AUTO_FIRST

STEPS = 2 * AUTO_EVERY + 30  # 130: two cadence steps past the first ones
SPIKE_STEP = AUTO_EVERY + 9  # a sentinel step (no burst is running there)
NAN_STEP = AUTO_EVERY + 35  # a sentinel step after the spike's burst (AUTO_BURST)
CHANGE_STEP = 2 * AUTO_EVERY + 9  # the last layer replaced at a sentinel step
# What a sentinel step records (docs/recording.md, "Cadence"): at every step.
SENTINEL = ("grad_norm", "global_grad_norm", "global_grad_norm_preclip", "lr", "loss")


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 1))


def _train(
    every: str | int | None, bf16: bool, general: list[int] | None = None
) -> tuple[object, list[torch.Tensor]]:
    """Train STEPS steps (``every=None``: no Probe); the frame and the final weights.
    ``general``: the steps whose sentinel went the general path are appended to it."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    probe = Probe(model, opt, every=every) if every is not None else None
    if probe is not None and general is not None:
        params = probe._engine.params
        record_sentinel = params.record_sentinel

        def counted() -> None:
            general.append(probe._ctx.step_index)
            record_sentinel()

        params.record_sentinel = counted
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with probe if probe is not None else contextlib.nullcontext():
        for step in range(STEPS):
            if step == CHANGE_STEP:  # a new head, and the optimizer told about it
                torch.manual_seed(2)
                model[-1] = nn.Linear(16, 1)
                opt.add_param_group({"params": list(model[-1].parameters()), "lr": 5e-4})
            opt.zero_grad()
            x = torch.randn(32, 16, generator=gen)
            if step == NAN_STEP:
                x[0, 0] = float("nan")
            with cast:
                loss = model(x).float().pow(2).mean()
            if step == SPIKE_STEP:
                loss = loss * 1e4
            loss.backward()
            if probe is not None:
                probe.log(loss=loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step == NAN_STEP:  # the data's NaN is gone; so is the weights' and AdamW's
                with torch.no_grad():
                    for p in model.parameters():
                        p.nan_to_num_(0.0)
                    for state in opt.state.values():
                        for v in state.values():
                            if torch.is_tensor(v) and v.is_floating_point():
                                v.nan_to_num_(0.0)
        frame = probe.frame() if probe is not None else None
    return frame, [p.detach().clone() for p in model.parameters()]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("bf16", [False, True])
def test_sentinel_rows_match_a_probe_recording_every_step(bf16):
    general: list[int] = []
    auto, w_auto = _train("auto", bf16, general)
    full, w_full = _train(1, bf16)
    _, w_plain = _train(None, bf16)
    for a, b, c in zip(w_auto, w_full, w_plain, strict=True):  # training untouched
        assert torch.equal(a, c) and torch.equal(b, c)

    ref = {(r.step, r.name, r.stat): r.value for r in full.itertuples()}
    sentinel = auto[auto.stat.isin((*SENTINEL, "nonfinite", "clipped"))]
    sentinel = sentinel[sentinel.name.isin(set(full.name))]
    assert len(sentinel) > 0
    for r in sentinel.itertuples():
        key = (r.step, r.name, r.stat)
        assert key in ref, key
        assert _same(r.value, ref[key]), (key, r.value, ref[key])
    # ... and those statistics are there at every step, as in the twin.
    for stat in SENTINEL:
        want = full[full.stat == stat]
        got = auto[auto.stat == stat]
        assert set(zip(want.step, want.name)) == set(zip(got.step, got.name)), stat
    # The spike and the NaN step start bursts of full steps (module rows), as documented.
    module_steps = set(auto[auto.stat == "error_norm"].step)
    assert set(range(AUTO_FIRST)) <= module_steps
    assert SPIKE_STEP + 1 in module_steps or SPIKE_STEP + 2 in module_steps
    assert NAN_STEP + 1 in module_steps
    assert CHANGE_STEP not in module_steps
    # The comparison above covered the sentinel steps, NaN flags and the new head included.
    at_sentinel = sentinel[~sentinel.step.isin(module_steps)]
    assert {SPIKE_STEP, NAN_STEP, CHANGE_STEP} <= set(at_sentinel.step)
    assert (at_sentinel[at_sentinel.step == NAN_STEP].stat == "nonfinite").any()
    new_head = auto[(auto.step == CHANGE_STEP) & (auto.stat == "grad_norm")]
    assert {"8.weight", "8.bias"} <= set(new_head.name)
    # The sentinel steps went the short route (recording/sentinel.py), but the one where
    # the model changed (bound anew at its forward: the general path for that step),
    # before it and after it.
    assert general == [CHANGE_STEP]


def test_a_closed_probe_holds_no_parameter():
    # The route holds the parameters it measures while the Probe is open; closed, the
    # Probe (its frame kept, the object alive) holds none of them, nor the model.
    import gc
    import weakref

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = Probe(model, opt)
    for _ in range(AUTO_FIRST + 3):  # sentinel steps: the route armed
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    assert probe._engine.sentinel.armed
    probe.close()
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(model)]
    del model, opt
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert not probe.frame().empty
