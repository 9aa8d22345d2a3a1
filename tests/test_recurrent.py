"""The carry gates of LSTMs and GRUs (gradprobe.recurrent; stats carry_gate_mean,
memory_steps, seq_len), against a hand-written float64 recurrence (reference.py) and
against autograd's ∂c_T/∂c_0."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning
from gradprobe.recurrent import carry_gates
from reference import recurrent_carry_gates

T, B, F, H = 7, 3, 4, 5


def _fused(kind: type[nn.Module], **kw: object) -> nn.Module:
    torch.manual_seed(0)
    module = kind(F, H, **kw).double()
    with torch.no_grad():  # gates away from 0.5, different per layer: a wrong layer shows
        for name, p in module.named_parameters():
            if name.startswith("bias_ih"):
                p[H : 2 * H] += 1.5 if "_l1" in name else -0.7
    return module


def _probe_one_step(model: nn.Module, forward: Callable[[], Tensor]) -> dict[str, float]:
    """Record one trained step under a Probe; the module's carry statistics."""
    model.train()
    with Probe(model) as probe:
        forward().sum().backward()
        probe.step()
        frame = probe.frame()
    rows = frame[frame.stat.isin(["carry_gate_mean", "memory_steps", "seq_len"])]
    return {r.stat: r.value for r in rows.itertuples() if r.name == ""}


def _expected(gates: list[Tensor]) -> tuple[float, float]:
    every = torch.cat([g.reshape(-1) for g in gates])
    return float(every.mean()), float(-1.0 / every.log().mean())


FUSED = {
    "lstm": (nn.LSTM, {}),
    "lstm_2layers_batch_first": (nn.LSTM, {"num_layers": 2, "batch_first": True}),
    "lstm_2layers_bidirectional": (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    "lstm_3layers_bidir_batch_first_proj": (
        nn.LSTM,
        {"num_layers": 3, "bidirectional": True, "batch_first": True, "proj_size": 3},
    ),
    "gru_2layers": (nn.GRU, {"num_layers": 2}),
    "gru_2layers_bidirectional_batch_first": (
        nn.GRU,
        {"num_layers": 2, "bidirectional": True, "batch_first": True},
    ),
}


@pytest.mark.parametrize("with_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("case", list(FUSED))
def test_fused_gates_match_a_float64_step_loop(case: str, with_state: bool) -> None:
    kind, kw = FUSED[case]
    module = _fused(kind, **kw)
    x = torch.randn(T, B, F, dtype=torch.float64)
    layers, directions = module.num_layers, 1 + module.bidirectional
    h_out = module.proj_size if getattr(module, "proj_size", 0) else H
    hx = None
    if with_state:
        h0 = torch.randn(layers * directions, B, h_out, dtype=torch.float64)
        c0 = torch.randn(layers * directions, B, H, dtype=torch.float64)
        hx = (h0, c0) if kind is nn.LSTM else h0
    expected = recurrent_carry_gates(module, x, hx)
    x_in = x.transpose(0, 1) if module.batch_first else x
    x_in = x_in.clone().requires_grad_(True)  # a trained pass: the Probe records it

    # the gates themselves, layer by layer and direction by direction
    with torch.no_grad():
        output = module(x_in, hx)
    call = carry_gates(module, (x_in, hx), {}, output)
    assert len(call.preacts) == len(expected) == layers * directions
    for got, want in zip(call.preacts, expected):
        torch.testing.assert_close(torch.sigmoid(got), want, rtol=1e-10, atol=1e-12)
    assert (call.steps, call.sequences) == (T, 1)

    # and what the Probe records from a training step
    stats = _probe_one_step(module, lambda: module(x_in, hx)[0])
    mean, memory = _expected(expected)
    assert stats["carry_gate_mean"] == pytest.approx(mean, rel=1e-9)
    assert stats["memory_steps"] == pytest.approx(memory, rel=1e-9)
    assert stats["seq_len"] == T


def test_unbatched_input_is_one_sequence() -> None:
    module = _fused(nn.LSTM, num_layers=2)
    x = torch.randn(T, F, dtype=torch.float64, requires_grad=True)
    expected = recurrent_carry_gates(module, x.unsqueeze(1))
    stats = _probe_one_step(module, lambda: module(x)[0])
    assert stats["carry_gate_mean"] == pytest.approx(_expected(expected)[0], rel=1e-9)


@pytest.mark.parametrize("kind", [nn.LSTMCell, nn.GRUCell])
def test_cell_in_a_loop_matches_a_float64_step_loop(kind: type[nn.Module]) -> None:
    torch.manual_seed(0)
    cell = kind(F, H).double()
    x = torch.randn(T, B, F, dtype=torch.float64, requires_grad=True)
    expected = recurrent_carry_gates(cell, x)
    lstm = kind is nn.LSTMCell

    def loop() -> Tensor:
        # an explicit zero state (needs no grad): where a sequence starts
        state: object = (
            (torch.zeros(B, H, dtype=torch.float64),) * 2
            if lstm
            else torch.zeros(B, H, dtype=torch.float64)
        )
        outs = []
        for t in range(T):
            state = cell(x[t], state)
            outs.append(state[0] if lstm else state)
        return torch.stack(outs)

    stats = _probe_one_step(cell, loop)
    mean, memory = _expected(expected)
    assert stats["carry_gate_mean"] == pytest.approx(mean, rel=1e-9)
    assert stats["memory_steps"] == pytest.approx(memory, rel=1e-9)
    assert stats["seq_len"] == T  # T calls, one sequence start


def test_memory_predicts_the_decay_autograd_measures_along_the_cell_path() -> None:
    # With the h-path weights zeroed the cell path is the only way back, and
    # ∂c_T/∂c_0 = ∏_{s=1..T} f_s exactly: mean log ∂c_T/∂c_0 = T · mean log f = −T/memory.
    torch.manual_seed(0)
    length = 40
    lstm = nn.LSTM(F, H).double()
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
        lstm.bias_ih_l0[H : 2 * H] = torch.linspace(-2.0, 3.0, H)  # memories from ~0.3 to ~20
    x = torch.randn(length, B, F, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(1, B, H, dtype=torch.float64)
    c0 = torch.zeros(1, B, H, dtype=torch.float64, requires_grad=True)
    stats = _probe_one_step(lstm, lambda: lstm(x, (h0, c0))[0])
    memory = stats["memory_steps"]

    c0 = c0.detach().requires_grad_(True)
    _, (_, c_n) = lstm(x, (h0, c0))
    (carried,) = torch.autograd.grad(c_n.sum(), c0)  # diagonal: ∂c_T[b, j]/∂c_0[b, j]
    measured = float(carried.log().mean())
    assert measured == pytest.approx(-length / memory, rel=1e-9)

    # ... and over any span: the error carried k steps back falls as exp(−k/memory)
    # (the gates here depend only on x, which is stationary: a straight line in k)
    spans, logs = [], []
    for t in (0, 10, 20, 30):
        head = lstm(x[:t], (h0, c0.detach()))[1] if t else (h0, c0.detach())
        c_t = head[1].detach().requires_grad_(True)
        _, (_, c_n) = lstm(x[t:], (head[0].detach(), c_t))
        (g,) = torch.autograd.grad(c_n.sum(), c_t)
        spans.append(length - t)
        logs.append(float(g.log().mean()))
    slope = (logs[0] - logs[-1]) / (spans[0] - spans[-1])
    assert slope == pytest.approx(-1.0 / memory, rel=0.15)


def test_truncated_bptt_windows_are_the_sequence_length() -> None:
    # A cell whose carried state is detached every 4 steps: the error travels back 4 steps.
    torch.manual_seed(0)
    cell = nn.LSTMCell(F, H).double()
    x = torch.randn(12, B, F, dtype=torch.float64, requires_grad=True)

    def loop() -> Tensor:
        h = c = torch.zeros(B, H, dtype=torch.float64)
        outs = []
        for t in range(12):
            if t % 4 == 0:
                h, c = h.detach(), c.detach()
            h, c = cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs)

    assert _probe_one_step(cell, loop)["seq_len"] == 4


def test_packed_input_is_a_gap_with_one_warning() -> None:
    module = _fused(nn.LSTM, num_layers=2)
    x = torch.randn(T, B, F, dtype=torch.float64, requires_grad=True)
    module.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Probe(module) as probe:
            for _ in range(2):
                packed = pack_padded_sequence(x, [T, T - 2, 3])
                module(packed)[0].data.sum().backward()
                probe.step()
            frame = probe.frame()
    said = [w for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(said) == 1 and "PackedSequence" in str(said[0].message)
    assert not frame.stat.isin(["carry_gate_mean", "memory_steps", "seq_len"]).any()
    assert (frame.stat == "error_norm").any()  # the module's other statistics are kept


def test_inter_layer_dropout_measures_the_first_layer_only_and_says_so() -> None:
    module = _fused(nn.LSTM, num_layers=2, dropout=0.5)
    x = torch.randn(T, B, F, dtype=torch.float64, requires_grad=True)
    expected = recurrent_carry_gates(module, x)[:1]  # layer 0: its input is not dropped
    with pytest.warns(GradprobeWarning, match="dropout"):
        stats = _probe_one_step(module, lambda: module(x)[0])
    assert stats["carry_gate_mean"] == pytest.approx(_expected(expected)[0], rel=1e-9)


def test_a_failure_is_a_gap_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradprobe.recurrent as recurrent

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(recurrent, "carry_gates", broken)
    module = _fused(nn.GRU)
    x = torch.randn(T, B, F, dtype=torch.float64, requires_grad=True)
    with pytest.warns(GradprobeWarning, match="boom"):
        stats = _probe_one_step(module, lambda: module(x)[0])
    assert stats == {}


def test_the_memory_of_a_forget_bias() -> None:
    # Orders of magnitude the thresholds in docs/findings.md quote: a gate of σ(b) carries
    # the error −1/log σ(b) steps (inputs and state add noise around b).
    assert -1 / math.log(1 / (1 + math.exp(20))) == pytest.approx(0.05, rel=1e-6)
    assert -1 / math.log(0.5) == pytest.approx(1.44, rel=1e-2)
