"""Sequences: token geometry, output logits, and the error signal spread over time.

Reducers for the recording engine (each takes a detached tensor, returns tensors, no sync):

- :func:`token_cosine`: the mean cosine similarity between distinct token vectors of a
  block's output ``[N, T, F]`` (or ``[T, N, F]``), over a fixed sample of positions per
  sequence. Near 1 is rank collapse: every token the same vector, so attention can only
  average and the query/key gradients vanish (Dong et al. 2021; Noci et al. 2022).
- :func:`logit_stats`: the largest logit and the mean log-partition ``logsumexp`` over
  positions of the model's final projection ``[N, T, V]`` or ``[N, V]``: the ``z`` of a
  z-loss. Their growth is output-logit divergence (Wortsman et al. 2023).
- :func:`time_sq_norms` and :func:`error_time`: ``‖dL/dy[:, t]‖`` per time step of a
  recurrent error signal, summarised as the mean norm over the first and the last quarter
  of the sequence and the least-squares slope of ``log10 ‖dL/dy[:, t]‖`` per step (in
  decades per step; positive: the error is larger towards the end of the sequence, as when
  it dies travelling back from a loss at the end). :func:`error_time_from_calls` does the
  same from an ``LSTMCell``/``GRUCell`` loop's per-call error norms, in call order.

Which error. A fused ``nn.LSTM``'s output error ``dL/dy_t`` is only what reaches step ``t``
from above (the recurrence is inside the kernel): with the loss on the last step alone it is
zero before it. The error that has travelled through time is the one *leaving* the module
(``dL/dx_t`` at its input, or the output error of the module below) and, for a cell loop,
each call's output error ``dL/dh_t`` (the next call reads ``h_t``, so it carries the
recurrent part). These functions take whichever tensor the engine hands them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import no_autocast, strata
from .reduce import accumulation_dtype

__all__ = [
    "POSITIONS",
    "error_time",
    "error_time_from_calls",
    "fold_time",
    "logit_stats",
    "time_sq_norms",
    "token_cosine",
]

POSITIONS = 32  # positions per sequence for token_cosine
_CHUNK = 1 << 22  # entries upcast at a time by logit_stats, time_sq_norms (16 MiB in float32)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (and float32), float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def token_cosine(
    y: Tensor, *, time_dim: int = 1, positions: int | None = POSITIONS
) -> tuple[Tensor, Tensor]:
    """Sum and count of cosine similarities over ordered pairs of distinct sampled positions.

    ``y``: token vectors along the last dimension, time along ``time_dim`` (1 for
    ``[N, T, F]``, 0 for ``[T, N, F]`` or ``[T, F]``); every other dimension is a sequence.
    Per sequence, ``min(positions, T)`` positions (the middles of equal runs, as
    :func:`gradprobe.attention.strata`); pairs within a sequence only. A zero vector has no
    direction: its pairs are left out. The mean is ``sum / count`` (NaN-free: count 0 when
    ``T < 2``, the engine's gap)."""
    with torch.no_grad():
        y = y.detach()
        time_dim = time_dim % y.dim()
        if time_dim == y.dim() - 1:
            raise ValueError("the time dimension cannot be the feature dimension")
        y = y.movedim(time_dim, -2)
        steps, width = y.shape[-2], y.shape[-1]
        idx, _ = strata(steps, positions, y.device) if steps else (y.new_zeros(0).long(), None)
        sequences = math.prod(y.shape[:-2])  # from the shape: a -1 is ambiguous when T = 0
        s = y.index_select(-2, idx).reshape(sequences, idx.numel(), width).to(_wide(y.dtype))
        norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
        nonzero = norm > 0
        unit = s / norm.where(nonzero, 1.0)
        with no_autocast(y.device):  # the user's autocast would make it half again
            gram = unit @ unit.transpose(-1, -2)  # [sequences, P, P]
        n = idx.numel()
        distinct = ~torch.eye(n, dtype=torch.bool, device=y.device)
        pair = nonzero & nonzero.transpose(-1, -2) & distinct
        return torch.where(pair, gram, 0.0).sum(), pair.sum()


def logit_stats(
    logits: Tensor, *, class_dim: int = -1, chunk: int = _CHUNK
) -> tuple[Tensor, Tensor, Tensor]:
    """The largest logit, and the sum and count of ``logsumexp`` over classes per position.

    ``logits``: classes along ``class_dim`` (``[N, T, V]``, ``[N, V]``); every other
    dimension is a position. ``logit_z`` is ``sum / count``. The maximum is exact in the
    input's dtype; ``logsumexp`` is computed in float32 (float64 stays) a slice of about
    ``chunk`` logits at a time, so the upcast copy stays bounded for large vocabularies."""
    with torch.no_grad():
        x = logits.detach().movedim(class_dim, -1)
        classes = x.shape[-1]
        rows = math.prod(x.shape[:-1])  # from the shape: a -1 is ambiguous when V = 0
        x = x.reshape(rows, classes)
        dtype = _wide(x.dtype)
        top = (
            x.amax().to(dtype)
            if x.numel()
            else torch.full((), torch.nan, dtype=dtype, device=x.device)
        )
        per = max(1, chunk // max(classes, 1))
        total = torch.zeros((), dtype=dtype, device=x.device)
        # host ints from the shape: no sync. No classes: no logsumexp (count 0, a gap)
        for start in range(0, rows if classes else 0, per):
            total = total + torch.logsumexp(x[start : start + per].to(dtype), dim=-1).sum()
        # made on the device: a host tensor copied there would make the host wait
        return top, total, torch.full((), rows if classes else 0, device=x.device)


def time_sq_norms(grad: Tensor, *, time_dim: int = 1, chunk: int = _CHUNK) -> Tensor:
    """``‖grad[:, t]‖²`` per time step ``[T]``: the sum of squares over every dimension but
    ``time_dim`` (1 for ``[N, T, F]``, batch_first; 0 for ``[T, N, F]`` or ``[T, F]``).
    Squares add over micro-batches (:func:`fold_time`); :func:`error_time` takes the root.

    Accumulated in float64 (:func:`gradprobe.reduce.accumulation_dtype`), about ``chunk``
    entries upcast at a time: a float32 square underflows below ~1e-19 and overflows above
    ~1.8e19, which is where a vanishing or exploding error signal lives. A device without
    float64 (MPS) accumulates float32 squares of each step's entries divided by the step's
    largest ``|entry|``, then multiplies back: no entry's square underflows next to the
    largest, but the squared norm itself is float32 there (0 or Inf outside ~1e-38..3e38).
    ``T = 0``: an empty ``[0]``."""
    with torch.no_grad():
        g = grad.detach()
        time_dim = time_dim % max(g.dim(), 1)
        steps = g.shape[time_dim]
        g = g.movedim(time_dim, 0).reshape(steps, math.prod(g.shape) // max(steps, 1))
        acc = torch.promote_types(g.dtype, accumulation_dtype(g.device))
        per = max(1, chunk // max(g.shape[1], 1))
        parts = [_sq_norms(g[start : start + per], acc) for start in range(0, steps, per)]
        return torch.cat(parts) if parts else g.new_zeros(0, dtype=acc)


def _sq_norms(rows: Tensor, acc: torch.dtype) -> Tensor:
    """Each row's sum of squares in ``acc`` (scaled by its largest |entry| if float32)."""
    if acc == torch.float64:
        return rows.to(acc).square().sum(dim=1)
    top = rows.abs().amax(dim=1, keepdim=True).to(acc)  # [rows, 1]; 0 for an empty row
    top = top.where((top > 0) & torch.isfinite(top), 1.0)  # NaN/Inf: left to the sum
    return (rows.to(acc) / top).square().sum(dim=1) * top.squeeze(1).square()


def fold_time(sq_norms: Sequence[Tensor]) -> Tensor:
    """Several calls' squared norms per step as one (micro-batches of one step): summed,
    sequences of different lengths aligned at their first step."""
    steps = max(s.numel() for s in sq_norms)
    return torch.stack([F.pad(s, (0, steps - s.numel())) for s in sq_norms]).sum(0)


def error_time(sq_norms: Tensor) -> dict[str, Tensor]:
    """``error_time_first``, ``error_time_last``: the mean of ``‖dL/dy[:, t]‖`` over the
    first and over the last ``max(1, ⌊T/4⌋)`` steps; ``error_time_slope``: the least-squares
    slope of ``log10 ‖dL/dy[:, t]‖`` against ``t`` (decades per step) over the steps whose
    norm is positive and finite. 0-d tensors; NaN where undefined (no steps; fewer than two
    usable steps for the slope)."""
    with torch.no_grad():
        return _error_time(sq_norms.detach().sqrt())


def _error_time(norms: Tensor) -> dict[str, Tensor]:
    """:func:`error_time` from the norms themselves (no square to under- or overflow)."""
    with torch.no_grad():
        steps = norms.numel()
        quarter = max(1, steps // 4)
        t = torch.arange(steps, dtype=norms.dtype, device=norms.device)
        ok = (norms > 0) & torch.isfinite(norms)
        w = ok.to(norms.dtype)
        y = torch.log10(norms.where(ok, 1.0))
        n = w.sum()
        t_bar, y_bar = (w * t).sum() / n, (w * y).sum() / n
        dt = t - t_bar
        slope = (w * dt * (y - y_bar)).sum() / (w * dt * dt).sum()  # 0/0 = NaN: a gap
        return {
            "error_time_first": norms[:quarter].mean(),
            "error_time_last": norms[steps - quarter :].mean(),
            "error_time_slope": slope,
        }


def error_time_from_calls(norms: Sequence[Tensor]) -> dict[str, Tensor]:
    """:func:`error_time` for a cell loop: ``norms[t]`` is the error norm ``‖dL/dh‖`` of the
    cell's ``t``-th call of the step (forward call order; backward visits them in reverse,
    so the engine keeps each call's index), each a 0-d tensor (or one per call). The
    norms are not squared (a float32 square of 1e-20 is 0, of 1e20 Inf): the statistics
    are taken from them in their own dtype, float32 at least."""
    with torch.no_grad():
        stacked = torch.stack([n.detach().reshape(()) for n in norms])
        return _error_time(stacked.to(_wide(stacked.dtype)))
