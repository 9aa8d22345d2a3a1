"""Small outputs are reduced in batches at the end of the forward (ForwardCapture._reduce_held):
every statistic still equals its computation on an un-probed twin, also where an output
is written in place after its module's hook, by an in-place module or by the parent's
forward (``out += identity``), and where modules of one shape differ in units."""

import copy

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.recording.errors import Deferred
from gradprobe.recording.forward import ForwardCapture
from reference import leaf_error_norms


class Block(nn.Module):
    """A residual block as torchvision writes it: ``out += identity`` after the norm."""

    def __init__(self, width: int, inplace_relu: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.act = nn.ReLU(inplace=inplace_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.fc(x))
        out += x  # in place, on the norm's output, after its hook
        return self.act(out)


def _model(inplace_relu: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), Block(16, inplace_relu), Block(16, inplace_relu),
        nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3),
    )


def _reference_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each module's output as it left the module, from an un-probed twin (copies)."""
    outs: dict[str, torch.Tensor] = {}
    twin = copy.deepcopy(model)
    handles = [
        m.register_forward_hook(lambda m, a, y, n=n: outs.__setitem__(n, y.detach().clone()))
        for n, m in twin.named_modules()
        if n and not list(m.children())
    ]
    with torch.no_grad():
        twin(x)
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("inplace_relu", [False, True])
def test_batched_statistics_equal_the_twin_on_every_step(inplace_relu, monkeypatch):
    batched: list[int] = []
    original = ForwardCapture._forward_stats_batch

    def spy(self, entries, device, unit):
        batched.append(len(entries))
        return original(self, entries, device, unit)

    monkeypatch.setattr(ForwardCapture, "_forward_stats_batch", spy)
    model = _model(inplace_relu)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs = [torch.randn(8, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = []
    with Probe(model, opt) as probe:
        for x in xs:
            expected.append(_reference_outputs(model, x))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        frame = probe.frame()
    assert batched and max(batched) >= (2 if inplace_relu else 4)  # batches were exercised
    for step, outs in enumerate(expected):
        rows = frame[frame.step == step]
        for name, y in outs.items():
            got = rows[rows.name == name].set_index("stat").value
            y64 = y.double()
            assert got["act_mean"] == pytest.approx(float(y64.mean()), rel=1e-5, abs=1e-7), (step, name)
            assert got["act_std"] == pytest.approx(float(y64.std(unbiased=False)), rel=1e-4), (step, name)
            assert got["zero_frac"] == pytest.approx(float((y == 0).double().mean())), (step, name)
            dead = float((y.abs().amax(dim=0) == 0).double().mean())
            assert got["dead_frac"] == pytest.approx(dead), (step, name)
            assert got["nonfinite"] == 0


def test_an_output_written_in_place_after_a_held_hook_is_a_gap_then_reduced_in_its_hook():
    """Control flow that writes over an output only from the third step on: that call is
    a gap (not a wrong number), and later ones are right."""

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            self.calls += 1
            if self.calls >= 3:
                y.mul_(100.0)  # after fc's hook
            return torch.tanh(y)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), Late(), nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(5, 6)
    with Probe(model, opt) as probe:
        for _ in range(5):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        frame = probe.frame()
    fc = frame[(frame.name == "1.fc") & (frame.stat == "act_mean")].set_index("step").value
    with torch.no_grad():
        expected = float(model[1].fc(model[0](x)).double().mean())
    assert 2 not in fc.index  # the call written over: a gap
    for step in (0, 1, 3, 4):
        assert fc[step] == pytest.approx(expected, rel=1e-5), step


# ------------------------------------------------------------- error signals, batched

def test_batched_error_norms_equal_autograd_on_every_step(monkeypatch):
    deferred: list[int] = []
    original = Deferred.resolve

    def spy(self, pending):
        # Deferred norms, and signals that are a deferred one (a reader's whole share).
        deferred.append(len(pending.deferred) + len(pending.aliases))
        return original(self, pending)

    monkeypatch.setattr(Deferred, "resolve", spy)
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = []
    with Probe(model, opt) as probe:
        for x in xs:
            expected.append(leaf_error_norms(model, x))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        frame = probe.frame()
    assert deferred[0] == 0 and max(deferred) >= 16  # from the second step, batched
    for step, errors in enumerate(expected):
        rows = frame[frame.step == step]
        for name, (out_norm, in_norm) in errors.items():
            got = rows[rows.name == name].set_index("stat").value
            assert got["error_norm"] == pytest.approx(out_norm, rel=1e-5), (step, name)
            if name != "0":  # the first module's input needs no grad
                assert got["error_gain"] == pytest.approx(in_norm / out_norm, rel=1e-5), (step, name)


class _ScaleInPlaceBackward(torch.autograd.Function):
    """y = 2x, whose backward writes over the incoming dL/dy (which our hook has read)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, grad):
        return grad.mul_(2.0)


class _Scale(nn.Module):
    def forward(self, x):
        return _ScaleInPlaceBackward.apply(x)


def test_an_error_signal_written_over_in_backward_is_never_a_wrong_number():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), _Scale(), nn.Tanh(), nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(4, 5)
    with Probe(model, opt) as probe:
        for _ in range(4):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        frame = probe.frame()
    # dL/d(output of _Scale) by autograd, before its backward doubles it in place
    y = model[1](model[0](x)).detach().requires_grad_()
    model[3](model[2](y)).sum().backward()
    expected = float(y.grad.double().norm())
    got = frame[(frame.name == "1") & (frame.stat == "error_norm")].set_index("step").value
    assert len(got) >= 3  # at most the one call that taught the Probe is left out
    for step, value in got.items():
        assert value == pytest.approx(expected, rel=1e-5), step


def test_a_batched_output_with_nan_counts_its_nan_entries_as_non_zero(monkeypatch):
    """zero_frac and the ReLU's gate_mean of held outputs holding NaN in some rows: a NaN
    entry is not 0 (as the one-call path counts it); against the twin's outputs."""
    batched: list[int] = []
    original = ForwardCapture._forward_stats_batch

    def spy(self, entries, device, unit):
        batched.append(len(entries))
        return original(self, entries, device, unit)

    monkeypatch.setattr(ForwardCapture, "_forward_stats_batch", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # NaN gradients: weights kept
    x = torch.randn(8, 6)
    x[2, 0] = float("nan")  # one sample's row of every output is NaN
    with Probe(model, opt, every=1) as probe:
        for _ in range(3):
            expected = _reference_outputs(model, x)
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        frame = probe.frame()
    assert batched and max(batched) >= 2
    rows = frame[frame.step == 2]
    for name, y in expected.items():
        got = rows[rows.name == name].set_index("stat").value
        assert got["zero_frac"] == pytest.approx(float((y == 0).double().mean())), name
    for name in ("1", "3"):  # ReLU: f' = 1 where y ≠ 0 (a NaN's f' is not 0 either)
        got = rows[rows.name == name].set_index("stat").value
        assert got["gate_mean"] == pytest.approx(float((expected[name] != 0).double().mean())), name
