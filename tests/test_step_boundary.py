"""The step boundary on real input: shapes that change between steps, and failures anywhere.

Units are features or channels: a sequence length, a batch size or an image size that
changes from step to step is normal input, and ``dead_frac``/``dead_window_frac`` are
checked per unit against the outputs themselves (kept by plain forward hooks). Then every
piece of the Probe's work is made to fail in turn: training must go on bit-identical to
an un-probed twin, with one ``GradprobeWarning`` and a gap where the failure was.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gradprobe.buffer
import gradprobe.store
from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning
from gradprobe.recording.params import ParamStats
from gradprobe.recording.rows import Rows
from gradprobe.recording.units import Units
from gradprobe.recording.updates import UpdateSnapshot
from reference import capture_outputs

DEAD_WINDOW = 2


def rows(frame, name: str, stat: str) -> dict[int, float]:
    sub = frame[(frame.name == name) & (frame.stat == stat)]
    return {int(s): float(v) for s, v in zip(sub.step, sub.value)}


def dead_units(y: Tensor, unit_dim: int) -> Tensor:
    """Per unit: True where every entry of the unit is exactly 0 (by hand, on the output)."""
    dims = [d for d in range(y.dim()) if d != unit_dim % y.dim()]
    return (y.detach() == 0).all(dim=dims) if dims else y.detach() == 0


def train_and_capture(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], names: list[str], **probe_kwargs
):
    """Train under a Probe, keeping each named module's outputs of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    outputs: list[dict[str, list[Tensor]]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Probe(model, opt, dead_window=DEAD_WINDOW, **probe_kwargs) as probe:
            for x, y in batches:
                opt.zero_grad()

                def run(x=x, y=y) -> Tensor:
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    return loss

                _, outs, _ = capture_outputs(model, names, run)
                outputs.append({n: [o.detach().clone() for o in v] for n, v in outs.items()})
                opt.step()
            frame = probe.frame()
            meta = probe.meta
    ours = [w for w in caught if issubclass(w.category, GradprobeWarning)]
    return frame, meta, outputs, ours


def check_dead(frame, outputs, name: str, unit_dim: int) -> None:
    """dead_frac and dead_window_frac of ``name`` at every step, against the outputs."""
    history = []
    for step, outs in enumerate(outputs):
        dead = torch.stack([dead_units(y, unit_dim) for y in outs[name]]).all(dim=0)
        history.append(dead)
        assert rows(frame, name, "dead_frac")[step] == pytest.approx(dead.double().mean().item())
        window = rows(frame, name, "dead_window_frac")
        if step + 1 >= DEAD_WINDOW:
            expected = torch.stack(history[-DEAD_WINDOW:]).all(dim=0).double().mean().item()
            assert window[step] == pytest.approx(expected)
        else:
            assert step not in window


def sequence_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.3), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].bias[:3] = -100.0  # three units dead at every position of every sample
    return model


def test_variable_sequence_length_features_last():
    """The issue's case: [4, T, 6], T = 10, 12, 7, 12, Dropout → Linear → ReLU → Linear, Adam."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, t, 6, generator=g), torch.randn(4, t, 3, generator=g))
        for t in (10, 12, 7, 12)
    ]
    frame, meta, outputs, warned = train_and_capture(sequence_model(), batches, ["0", "1", "2"])
    assert not warned
    assert sorted(set(frame.step)) == [0, 1, 2, 3]
    units = {m["name"]: m.get("units") for m in meta["modules"]}
    assert units == {"0": "feature", "1": "feature", "2": "feature", "3": "feature"}
    for name in ("0", "1", "2"):
        check_dead(frame, outputs, name, unit_dim=-1)
    assert rows(frame, "2", "dead_frac")[3] == pytest.approx(3 / 8)


def test_variable_sequence_length_and_batch_size_with_layer_norm():
    """[N, T, 16] with N and T both changing; LayerNorm → GELU → Linear → ReLU (features)."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(5, 16),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 2),
    )
    with torch.no_grad():
        model[3].bias[:4] = -50.0
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 9), (5, 4), (2, 11), (5, 4), (1, 1)]
    batches = [
        (torch.randn(n, t, 5, generator=g), torch.randn(n, t, 2, generator=g)) for n, t in shapes
    ]
    frame, _, outputs, warned = train_and_capture(model, batches, ["0", "1", "2", "3", "4"])
    assert not warned
    for name in ("0", "1", "2", "3", "4"):
        check_dead(frame, outputs, name, unit_dim=-1)
    assert rows(frame, "4", "dead_frac")[0] == pytest.approx(4 / 12)


def conv_model() -> nn.Module:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Dropout2d(0.2),  # element-wise on the raw image: its layout comes from the Conv
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    )
    with torch.no_grad():
        model[1].bias[:2] = -100.0  # two dead channels after the first ReLU
    return model


def test_variable_image_size_units_are_channels():
    g = torch.Generator().manual_seed(5)
    sizes = [(4, 16, 16), (3, 12, 20), (4, 8, 8), (2, 16, 16)]
    batches = [
        (torch.randn(n, 3, h, w, generator=g), torch.randn(n, 2, generator=g)) for n, h, w in sizes
    ]
    names = ["0", "1", "2", "3", "4", "5"]
    frame, meta, outputs, warned = train_and_capture(conv_model(), batches, names)
    assert not warned
    units = {m["name"]: m.get("units") for m in meta["modules"]}
    assert all(units[n] == "channel" for n in names), units
    for name in names:
        check_dead(frame, outputs, name, unit_dim=1)
    assert rows(frame, "2", "dead_frac")[0] == pytest.approx(2 / 6)


def test_variable_batch_size_mlp():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 1))
    with torch.no_grad():
        model[0].bias[:5] = -100.0
    g = torch.Generator().manual_seed(7)
    batches = [
        (torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)) for n in (8, 5, 8, 1, 3)
    ]
    frame, _, outputs, warned = train_and_capture(model, batches, ["0", "1"])
    assert not warned
    check_dead(frame, outputs, "1", unit_dim=-1)
    check_dead(frame, outputs, "0", unit_dim=-1)


class SumFeatures(nn.Module):
    """A parameter-free custom module: [N, T, F] -> [N, T]. Its only axis left is the
    sequence: it has no fixed feature or channel dimension."""

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(dim=-1)


def test_units_that_change_are_dropped_with_one_warning():
    """No error, one warning naming the module, no dead rows once the count changed."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), SumFeatures())
    g = torch.Generator().manual_seed(9)
    batches = [
        (torch.randn(2, t, 3, generator=g), torch.randn(2, t, generator=g)) for t in (5, 6, 7, 6)
    ]
    frame, _, outputs, warned = train_and_capture(model, batches, ["1"])
    assert sorted(set(frame.step)) == [0, 1, 2, 3]
    assert (
        len(warned) == 1 and "'2'" in str(warned[0].message) and "5 to 6" in str(warned[0].message)
    )
    assert sorted(rows(frame, "2", "dead_frac")) == [0]  # before anything showed the problem
    assert sorted(rows(frame, "2", "calls")) == [0, 1, 2, 3]  # its other statistics stay
    check_dead(frame, outputs, "1", unit_dim=-1)  # the other modules are not affected


def test_a_module_whose_unit_count_changes_is_warned_once_and_left_out():
    """Direct: the buffer is told different unit counts for one module: no exception."""
    buffer = gradprobe.buffer.StepBuffer(2, 0, dead_window=2)
    cpu = torch.device("cpu")
    for step, n in enumerate((10, 12, 7)):
        buffer.add_host(0, "calls")
        buffer.add_host(1, "calls")
        buffer.record_units(0, cpu, torch.ones(n))
        buffer.record_units(1, cpu, torch.tensor([0.0, 1.0]))
        buffer.end_step(step)
    assert buffer.unit_problems == [(0, 10, 12)]
    drained = buffer.drain()
    assert drained is not None
    assert drained.modules["n_units"][:, 0].tolist() == [10, 0, 0]
    assert drained.modules["n_units"][:, 1].tolist() == [2, 2, 2]
    assert drained.modules["dead_units"][:, 1].tolist() == [1, 1, 1]
    assert drained.modules["dead_window_units"][:, 1].tolist() == [0, 1, 1]


# ------------------------------------------------------------------ failures anywhere


def mlp() -> nn.Module:
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))


def loop(model: nn.Module, steps: int, probe_kwargs: dict | None, tmp=None) -> tuple[dict, object]:
    """Train ``steps`` steps (with a Probe if ``probe_kwargs`` is not None); final state."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(12)  # dropout masks: the same with and without the Probe
    probe = Probe(model, opt, **probe_kwargs) if probe_kwargs is not None else None
    for _ in range(steps):
        x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    frame = None
    if probe is not None:
        probe.close()
        frame = probe.frame()
    return {k: v.clone() for k, v in model.state_dict().items()}, frame


def fail_on(calls_to_fail: set[int]) -> Callable:
    """Wrap a method so that its n-th calls (0-based) raise, the others run it."""

    def wrap(original: Callable) -> Callable:
        count = [0]

        def failing(*args, **kwargs):
            n = count[0]
            count[0] += 1
            if n in calls_to_fail:
                raise RuntimeError(f"injected failure #{n}")
            return original(*args, **kwargs)

        return failing

    return wrap


# (owner, attribute, which calls fail, the steps expected to have no rows at all or None)
PLACES = [
    (gradprobe.buffer.StepBuffer, "end_step", {1}, {1}),
    (gradprobe.buffer.StepBuffer, "_close_all_units", {1}, {1}),
    (gradprobe.buffer.StepBuffer, "record_units_many", {3}, None),  # one call or a stack
    (gradprobe.buffer.StepBuffer, "record_params", {0}, None),
    (gradprobe.buffer.StepBuffer, "drain", {0}, None),  # the steps wait for the next flush
    (ParamStats, "_record_params", {1}, None),
    (UpdateSnapshot, "take", {1}, None),
    (UpdateSnapshot, "record", {1}, None),
    (ParamStats, "_record_preclip", {1}, None),
    (Rows, "_to_frame", {0}, {0, 1}),
    (Units, "record_deferred", {2}, {2}),
    (gradprobe.store.Store, "append", {0}, {0, 1}),
    (gradprobe.store.Store, "update_meta", {0, 1, 2}, set()),
    (gradprobe.store.Store, "close", {0}, set()),
]


@pytest.mark.parametrize(
    "owner,attribute,calls,missing", PLACES, ids=[f"{o.__name__}.{a}" for o, a, _, _ in PLACES]
)
def test_a_failure_anywhere_is_one_warning_and_a_gap(
    monkeypatch, tmp_path, owner, attribute, calls, missing
):
    steps = 5
    expected_state, _ = loop(mlp(), steps, None)
    monkeypatch.setattr(owner, attribute, fail_on(calls)(getattr(owner, attribute)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, frame = loop(mlp(), steps, {"store": tmp_path / "run", "flush_every": 2})
    for k, v in expected_state.items():
        assert torch.equal(v, state[k]), k  # training is bit-identical
    ours = [w for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "injected failure" in str(ours[0].message)
    recorded = set(frame.step)
    if missing is not None:
        assert recorded == set(range(steps)) - missing
    else:
        assert recorded == set(range(steps))


def test_a_listener_that_fails_leaves_the_rows(tmp_path):
    model = mlp()
    state_ref, _ = loop(mlp(), 3, None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Probe(model, opt, flush_every=1) as probe:
            probe.add_listener(lambda rows: 1 / 0)
            for _ in range(3):
                x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
            frame = probe.frame()
    assert set(frame.step) == {0, 1, 2}
    assert len([w for w in caught if issubclass(w.category, GradprobeWarning)]) == 1
    for k, v in state_ref.items():
        assert torch.equal(v, model.state_dict()[k])


def test_probe_step_without_optimizer_never_raises(monkeypatch):
    """probe.step() (no optimizer): a failing snapshot and step close are warnings."""
    model = mlp()
    twin = copy.deepcopy(model)
    monkeypatch.setattr(UpdateSnapshot, "take", fail_on({1})(UpdateSnapshot.take))
    monkeypatch.setattr(
        gradprobe.buffer.StepBuffer, "end_step", fail_on({2})(gradprobe.buffer.StepBuffer.end_step)
    )
    g = torch.Generator().manual_seed(13)
    batches = [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Probe(model) as probe:
            for m in (model, twin):
                torch.manual_seed(14)
                opt = torch.optim.SGD(m.parameters(), lr=0.1)
                for x, y in batches:
                    opt.zero_grad()
                    nn.functional.mse_loss(m(x), y).backward()
                    opt.step()
                    if m is model:
                        probe.step()
            frame = probe.frame()
    assert len([w for w in caught if issubclass(w.category, GradprobeWarning)]) == 2
    assert set(frame.step) == {0, 1, 3}
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


def test_no_state_outlives_its_step() -> None:
    """Per-backward bookkeeping is dropped at the step boundary: with no module probed (no
    pass ever trims it), with a module whose output never requires grad (Dropout on the
    input), and after a backward that raised (an OOM retry never runs its end callback)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    for modules in ([], None):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with Probe(model, opt, modules=modules) as probe:
            for step in range(20):
                opt.zero_grad()
                loss = model(torch.randn(16, 4)).pow(2).mean()
                if step % 5 == 0:
                    # a backward that raises half-way: a hook on the input of the last layer
                    h = model[2](model[1](model[0](torch.randn(16, 4))))
                    h.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("oom")))
                    with pytest.raises(RuntimeError, match="oom"):
                        model[3](h).sum().backward()
                loss.backward()
                opt.step()
            traversals = probe._engine.errors._traversals
            assert len(traversals.accumulating) == 0, modules
            assert len(traversals.pending) == 0, modules
            assert sum(probe._engine.errors._owed.values()) == 0, modules
