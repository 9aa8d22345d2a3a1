"""One norm for a signal that is both a module's dL/d(output) and its reader's share.

In a chain (Linear → Tanh → Linear, Conv → BatchNorm → ReLU) the tensor autograd hands to
a module's producer is the very gradient its one reader sent: the Probe measures it once
(capture.py, ``_same_as_share``). Where another reader adds to it (a skip connection),
the two differ and both are measured. Each case is checked against autograd in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.recording import errors as errors_module
from gradprobe.recording.errors import ErrorCapture
from reference import leaf_error_norms


def _spy_reuse(monkeypatch) -> list[tuple[str, bool]]:
    """Record what each call of recording.errors._same_as_share answered, by the
    producer's name (read from the context of the error capture last made)."""
    answers: list[tuple[str, bool]] = []
    original = errors_module._same_as_share
    contexts = []
    original_init = ErrorCapture.__init__

    def init(self, ctx, *args, **kwargs):
        contexts.append(ctx)
        original_init(self, ctx, *args, **kwargs)

    def spy(pending, k, token, grad, exact, constant):
        answer = original(pending, k, token, grad, exact, constant)
        answers.append((contexts[-1].slots[k].name, answer))
        # A reader's share kept for this call is let go here, equal or not: no gradient
        # is held past the producer's own hook (a skip connection's would be, otherwise).
        assert token not in pending.shared
        return answer

    monkeypatch.setattr(ErrorCapture, "__init__", init)
    monkeypatch.setattr(errors_module, "_same_as_share", spy)
    return answers


def _train(model, xs, **probe_kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with Probe(model, opt, **probe_kwargs) as probe:
        for x in xs:
            expected.append(leaf_error_norms(model, x, float64=True))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        frame = probe.frame()
    return frame, expected


def _assert_errors(frame, expected, skip_gain=()):
    for step, errors in enumerate(expected):
        rows = frame[frame.step == step]
        for name, (out_norm, in_norm) in errors.items():
            got = rows[rows.name == name].set_index("stat").value
            assert got["error_norm"] == pytest.approx(out_norm, rel=1e-4), (step, name)
            if name not in skip_gain:
                gain = in_norm / out_norm
                assert got["error_gain"] == pytest.approx(gain, rel=1e-4), (step, name)


@pytest.mark.parametrize("width", [8, 24])  # 8: signals batched at the pass's end; 24: > 2^16 entries, measured in their hooks
def test_conv_bn_inplace_relu_chain_measures_each_signal_once(monkeypatch, width):
    answers = _spy_reuse(monkeypatch)
    torch.manual_seed(0)
    layers = []
    for c_in in (3, 8, 8):
        layers += [nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    xs = [torch.randn(16, 3, width, width) for _ in range(3)]
    frame, expected = _train(model, xs)
    _assert_errors(frame, expected, skip_gain=("0",))
    # Every module but the first reads a probed module's output, alone: one norm each.
    assert sum(answer for _, answer in answers) >= 3 * (len(layers) + 2)


@pytest.mark.parametrize("batch", [8, 600])  # 600 × 128 > 2^16 entries: measured in the hooks
def test_a_second_reader_keeps_the_share_and_the_whole_signal_apart(monkeypatch, batch):
    class Skip(nn.Module):
        """h = a(x) is read by b and by the sum after it: b's share is not dL/dh."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 128)
            self.b = nn.Linear(128, 128)
            self.act = nn.Tanh()
            self.head = nn.Linear(128, 1)

        def forward(self, x):
            h = self.a(x)
            return self.head(self.act(self.b(h) + h))

    def own_share_gain(model: Skip, x: torch.Tensor) -> tuple[float, float]:
        """b's error_gain from its own share of dL/dh, dL/d(b's output) @ W_b, and the
        ratio the whole dL/dh would give; float64, on a twin."""
        twin = copy.deepcopy(model).double()
        h = twin.a(x.double())
        out_b = twin.b(h)
        h.retain_grad()
        out_b.retain_grad()
        twin.head(twin.act(out_b + h)).pow(2).mean().backward()
        share = out_b.grad @ twin.b.weight
        with torch.no_grad():
            return float(share.norm() / out_b.grad.norm()), float(h.grad.norm() / out_b.grad.norm())

    answers = _spy_reuse(monkeypatch)
    torch.manual_seed(1)
    model = Skip()
    xs = [torch.randn(batch, 16) for _ in range(3)]
    gains = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with Probe(model, opt) as probe:
        for x in xs:
            gains.append(own_share_gain(model, x))
            expected.append(leaf_error_norms(model, x, float64=True))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        frame = probe.frame()
    for step, (gain, whole) in enumerate(gains):
        rows = frame[(frame.step == step) & (frame.name == "b")].set_index("stat").value
        assert rows["error_gain"] == pytest.approx(gain, rel=1e-4), step
        assert abs(gain - whole) > 1e-3 * whole  # the skip's addition is not b's
    _assert_errors(frame, expected, skip_gain=("a", "b"))
    reused = {name for name, answer in answers if answer}
    assert "a" not in reused  # h's signal was never b's share alone
    assert "act" in reused  # the head alone reads the activation
