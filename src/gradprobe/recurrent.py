"""The carry gates of gated recurrent modules: how far back in time the error can travel.

Along an LSTM's cell path the error is multiplied by the forget gate at every step it
travels back: ∂c_T/∂c_t = ∏_{s=t+1..T} f_s (element-wise). A GRU's leaky path does the
same with its update gate: h_t = (1 − z_t)⊙n_t + z_t⊙h_{t−1}, so ∂h_T/∂h_t along that
path is ∏ z_s. These gates are the *carry factors*: mean log f per step is how fast
the carried error falls, and −1/mean(log f) the number of steps after which it has
fallen by e (the *memory*). A per-time-step output error ‖dL/dy_t‖ does not show it
when the loss is at every position (every y_t gets a direct signal); the gates do.

They are measured from the call itself, never read from the bias:

- ``nn.LSTMCell`` / ``nn.GRUCell``: the call sees its input and (h, c), so the gate's
  pre-activation is one matrix product of the gate's rows.
- fused ``nn.LSTM`` / ``nn.GRU``: only the last layer's hidden sequence leaves the
  kernel. It gives the last layer's h_{t−1}; the layers below are replayed under
  ``no_grad`` with their own weights (the kernel torch itself calls, one layer at a
  time) to get each layer's input and h_{t−1}. Then every gate of every step is one
  matrix product. ``batch_first``, unbatched input, ``bidirectional`` and ``proj_size``
  are handled; a ``PackedSequence`` input is not (a gap and one warning), nor are the
  layers above the first while inter-layer dropout is active in training (its masks
  cannot be replayed: those layers are left out, with one warning).

Everything stays a tensor: a call leaves two 0-d sums (of f and of log f, the latter as
``logsigmoid`` of the pre-activation, exact where f underflows) and host counts for the
buffer (see ``carry_*`` in :mod:`gradprobe.stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .kinds import KINDS, module_kind

__all__ = ["CARRY_TYPES", "CarryCall", "CarryGap", "carry_gates", "carry_slots", "record_carry"]

# The modules whose carried state is gated (nn.RNN's is not: its error goes through Wᵀ·tanh'):
# those of the kinds table marked carry_gated (kept as a name for code that imported it).
CARRY_TYPES: tuple[type[nn.Module], ...] = tuple(t for t, k in KINDS if k.carry_gated)


class CarryGap(Exception):
    """The carry gates of this call cannot be measured; ``key`` names the reason (warned once)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class CarryCall:
    """One call's carry gates: their pre-activations (one tensor per layer and direction),
    the time steps the carried state travelled, and whether a new sequence started."""

    preacts: list[Tensor]
    steps: int
    sequences: int
    partial_reason: str | None = None  # some layers left out (say why, once)


def carry_slots(modules: Sequence[tuple[int, nn.Module]]) -> frozenset[int]:
    """The slot indices of the gated recurrent modules among ``(slot, module)`` pairs."""
    return frozenset(k for k, m in modules if module_kind(m).carry_gated)


def _gate_rows(module: nn.Module) -> slice:
    """Rows of the stacked gate weights that make the carry gate: PyTorch orders an
    LSTM's gates (input, forget, cell, output) and a GRU's (reset, update, new), so the
    forget gate and the update gate are both the second block."""
    h = module.hidden_size
    return slice(h, 2 * h)


def _preact(module: nn.Module, suffix: str, x: Tensor, h_prev: Tensor, rows: slice) -> Tensor:
    """The carry gate's pre-activation x·W_iᵀ + h·W_hᵀ (+ biases), for its rows only."""
    w_ih = getattr(module, f"weight_ih{suffix}")[rows]
    w_hh = getattr(module, f"weight_hh{suffix}")[rows]
    g = x @ w_ih.T + h_prev @ w_hh.T
    if module.bias:
        g = (
            g
            + getattr(module, f"bias_ih{suffix}")[rows]
            + getattr(module, f"bias_hh{suffix}")[rows]
        )
    return g


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _cell_gates(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CarryCall:
    x = _argument(args, kwargs, 0, "input")
    hx = _argument(args, kwargs, 1, "hx")
    lstm = module_kind(module).recurrent == "lstm"
    if hx is None:
        h = x.new_zeros((*x.shape[:-1], module.hidden_size))
        carried: Tensor | None = None
    else:
        h = hx[0] if lstm else hx
        carried = hx[1] if lstm else hx
    # A state that does not require grad (None, zeros, a detached one: truncated BPTT)
    # is where the error stops travelling back: a new sequence, in the gradient's sense.
    fresh = carried is None or not carried.requires_grad
    g = _preact(module, "", x, h, _gate_rows(module))
    return CarryCall([g], steps=1, sequences=int(fresh))


def _fused_gates(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> CarryCall:
    x = _argument(args, kwargs, 0, "input")
    hx = _argument(args, kwargs, 1, "hx")
    if isinstance(x, PackedSequence):
        raise CarryGap(
            "packed",
            "its input is a PackedSequence (sequences of different lengths): the carry "
            "gates of packed calls are not measured. Pad the batch (pad_packed_sequence) "
            "to have them",
        )
    lstm = module_kind(module).recurrent == "lstm"
    layers, directions = module.num_layers, 2 if module.bidirectional else 1
    hidden = module.hidden_size
    h_out = getattr(module, "proj_size", 0) or hidden
    out = output[0]
    unbatched = x.dim() == 2
    if unbatched:
        x, out = x.unsqueeze(1), out.unsqueeze(1)
    elif module.batch_first:
        x, out = x.transpose(0, 1), out.transpose(0, 1)
    length, batch = x.shape[0], x.shape[1]
    # The initial states, [layers·directions, batch, ·]: zeros where none was given.
    if hx is None:
        h0 = x.new_zeros((layers * directions, batch, h_out))
        c0 = x.new_zeros((layers * directions, batch, hidden)) if lstm else None
    else:
        h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    replayable = layers
    reason = None
    if layers > 1 and module.dropout > 0 and module.training:
        replayable = 1  # the inter-layer dropout masks of this call cannot be replayed
        reason = (
            f"inter-layer dropout ({module.dropout}) is active in training: its random masks "
            "cannot be replayed, so only the first layer's carry gates are measured"
        )
    rows = _gate_rows(module)
    names = module._flat_weights_names
    preacts = []
    layer_input = x
    for layer in range(replayable):
        if layer == layers - 1:
            layer_out = out  # the last layer's hidden sequence is the module's own output
        else:
            layer_out = _replay_layer(module, layer, layer_input, h0, c0, names)
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            h_seq = layer_out[..., d * h_out : (d + 1) * h_out]
            h_init = h0[layer * directions + d].unsqueeze(0)
            # h_{t−1} of each step: the forward direction reads the step before, the
            # reverse one the step after; both start from the initial state.
            if d == 0:
                h_prev = torch.cat([h_init, h_seq[:-1]])
            else:
                h_prev = torch.cat([h_seq[1:], h_init])
            preacts.append(_preact(module, suffix, layer_input, h_prev, rows))
        layer_input = layer_out
    return CarryCall(preacts, steps=length, sequences=1, partial_reason=reason)


def _replay_layer(
    module: nn.Module,
    layer: int,
    layer_input: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    names: list[str],
) -> Tensor:
    """One layer (both directions) of a fused module, run again with its own weights:
    its hidden sequence ``[T, B, directions·h_out]``, the next layer's input. The kernel
    is the one ``nn.LSTM``/``nn.GRU`` call (``torch._VF``), for one layer, no dropout."""
    directions = 2 if module.bidirectional else 1
    own = {f"_l{layer}", f"_l{layer}_reverse"}
    weights = [w for n, w in zip(names, module._flat_weights) if n[n.rindex("_l") :] in own]
    states = slice(layer * directions, (layer + 1) * directions)
    if module_kind(module).recurrent == "lstm":
        assert c0 is not None
        kernel, hx = torch._VF.lstm, (h0[states], c0[states])  # type: ignore[attr-defined]
    else:
        kernel, hx = torch._VF.gru, h0[states]  # type: ignore[attr-defined]
    # one layer, no dropout, not training, not batch_first (the input is laid out [T, N, F])
    result = kernel(
        layer_input, hx, weights, module.bias, 1, 0.0, False, module.bidirectional, False
    )
    return result[0]


def carry_gates(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> CarryCall:
    """The carry gates' pre-activations of one call of a gated recurrent module.

    Each tensor of ``preacts`` holds one layer and direction (input layer first, the
    forward direction before the reverse one); the gate is its sigmoid. Computed under
    ``no_grad`` from the call's real inputs and the module's current weights. Raises
    :class:`CarryGap` where the call cannot be measured.
    """
    with torch.no_grad():
        if module_kind(module).cell:
            call = _cell_gates(module, args, kwargs)
        else:
            call = _fused_gates(module, args, kwargs, output)
    call.preacts = [g.detach() for g in call.preacts]
    return call


def record_carry(
    buffer: Any,
    slot: int,
    name: str,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
    warned: set[str],
) -> None:
    """Measure one call's carry gates and hand the buffer (a
    :class:`~gradprobe.buffer.StepBuffer`) two 0-d sums and the host counts; no sync.

    Never raises: a call that cannot be measured, or a failure, is a ``carry_gap`` for
    the step (its carry statistics are left out, the module's others are kept) and one
    :class:`~gradprobe.hooks.GradprobeWarning` per module and reason.
    """
    from .hooks import warn_gap

    try:
        call = carry_gates(module, args, kwargs, output)
        if call.partial_reason is not None:
            warn_gap(
                warned,
                f"carry partial {name}",
                f"gradprobe: module {name!r}: {call.partial_reason}",
            )
        g = torch.cat([p.reshape(-1) for p in call.preacts])
        dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None
        with torch.no_grad():
            total = torch.sigmoid(g).sum(dtype=dtype)
            # log σ(g) from the pre-activation: exact where σ(g) underflows to 0.
            log_total = nn.functional.logsigmoid(g).sum(dtype=dtype)
    except CarryGap as gap:
        buffer.set_host(slot, "carry_gap", 1)
        warn_gap(warned, f"carry {gap.key} {name}", f"gradprobe: module {name!r}: {gap}")
        return
    except Exception as exc:  # never into the user's loop
        buffer.set_host(slot, "carry_gap", 1)
        warn_gap(
            warned,
            f"carry failed {name}",
            f"gradprobe: measuring the carry gates of module {name!r} failed "
            f"({type(exc).__name__}: {exc}); carry_gate_mean, memory_steps and seq_len have "
            "a gap there, training is not affected",
        )
        return
    buffer.record("carry", slot, g.device, g.numel(), total, log_total)
    buffer.add_host(slot, "carry_count", g.numel())
    buffer.add_host(slot, "carry_steps", call.steps)
    buffer.add_host(slot, "carry_seqs", call.sequences)
