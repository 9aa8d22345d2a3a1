"""Inside attention: the largest attention logit and the entropy of the attention weights.

Two things live here, for the recording engine to wire in:

- :func:`attention_stats`, the reducer. From one call's query and key (the arguments of
  ``F.scaled_dot_product_attention``) it measures, per head: the largest logit
  ``q·k·scale`` after the mask (masked positions excluded), and the entropy in nats of
  the softmax weights, as a mean and a minimum over query rows. Cost is bounded: a fixed
  number of query rows (``rows``) of a fixed number of sequences (``batch``) per head,
  so a call costs ``batch × H × rows × S`` logits (``× E`` multiply-adds) whatever the
  batch size and sequence length.
- :class:`AttentionWatch`, the interception: a ``TorchFunctionMode`` that, while the
  engine has it entered, sees every ``scaled_dot_product_attention`` call (and every
  ``F.multi_head_attention_forward``, which hides its own SDPA call from a mode: see
  below), computes the statistics under ``no_grad`` and hands them to the engine.

Which rows. The query rows (and the sequences of a batch) are cut into ``rows`` strata of
consecutive rows; each stratum is represented by its middle row, weighted by the stratum's
size. Deterministic (no random numbers, torch's RNG is never touched), spread over the
sequence (causal attention's entropy grows with the row: row ``i`` sees ``i + 1`` keys, so
a sample bunched at one end would be biased), and exact when ``rows ≥ L`` and
``batch ≥`` the number of sequences. With fewer rows the weighted mean differs from the
exact mean by at most ``Σ_j |S_j| · range_j / L`` (``range_j``: max − min of the per-row
entropies in stratum ``j``), which ``tests/test_attention_stats.py`` checks against a
float64 reference; the sampled maximum logit is a lower bound of the exact one, the
sampled minimum entropy an upper bound.

The weights measured are the softmax *before* dropout: dropout rescales a random subset
of them in training, which is noise on top of the attention the model computes, not a
property of it. Fully masked query rows (a padded query under a boolean or ``-inf``
mask) have no weights: they are left out (SDPA returns NaN or zeros there). A float mask
entry at or below half its dtype's lowest value counts as masked (the finite "−∞" that
Hugging Face and others use); a row whose every entry is masked that way is left out
too, though SDPA spreads it uniformly over all keys.

Everything stays a tensor (no ``.item()``, no Python branch on a device value); half
inputs are computed in float32, float64 in float64. On a GPU the float32 matmul follows the
user's TF32 setting (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision``): with TF32 on, the logits carry ~1e-3 relative
error. The flags are global and the user's: never flipped here. Logits are formed a slice
of sequences, heads and rows at a time (:func:`slice_plan`): at most ``_LOGITS`` alive.

The minimum entropy is over the sampled rows: for a causal head with ``rows < L`` the
first sampled row is about ``L / (2·rows)``, not row 0 (entropy 0), so it depends on
``L / rows`` (row 0 is not forced in: a causal minimum would be 0 by construction).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .kinds import module_kind

__all__ = [
    "BATCH",
    "ROWS",
    "AttentionCall",
    "AttentionWatch",
    "attention_stats",
    "fast_path_at_risk",
    "no_autocast",
    "slice_plan",
    "strata",
    "summarise",
]

ROWS = 32  # query rows per head and sequence
BATCH = 8  # sequences per call
_LOGITS = 1 << 22  # logits measured at once (16 MiB in float32): see slice_plan

# F.scaled_dot_product_attention is this builtin (docstring added in place).
_SDPA = torch._C._nn.scaled_dot_product_attention
# A Python-level torch function: under a mode, its body (and the SDPA call inside it) runs
# with the mode popped, so the mode must read the attention from its arguments.
_MHA = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA)


@dataclass(frozen=True)
class AttentionCall:
    """One call's attention statistics, per head (tensors of shape ``[H]``).

    ``entropy_sum`` and ``weight`` are kept apart so that several calls fold exactly (a
    mean of means would weigh a short call like a long one); ``weight`` is the number of
    (sequence, query row) pairs the sampled rows stand for, 0 for a head with no row.
    """

    logit_max: Tensor  # -inf for a head without a valid row
    entropy_sum: Tensor
    weight: Tensor
    entropy_min: Tensor  # +inf for a head without a valid row

    @property
    def entropy_mean(self) -> Tensor:
        """Mean entropy per head (NaN where no row was valid)."""
        return self.entropy_sum / self.weight.where(self.weight > 0, torch.nan)


def strata(n: int, m: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """``min(m, n)`` representatives of ``0..n-1`` cut into equal runs, and each run's size.

    Run ``j`` is ``[⌊jn/m⌋, ⌊(j+1)n/m⌋)``; its representative is its middle. Computed on
    ``device`` from ``arange`` (no host-to-device copy, so no sync)."""
    m = n if m is None else max(1, min(m, n))
    j = torch.arange(m, device=device)
    lo = torch.div(j * n, m, rounding_mode="floor")
    hi = torch.div((j + 1) * n, m, rounding_mode="floor")
    return lo + torch.div(hi - lo - 1, 2, rounding_mode="floor"), hi - lo


def _unravel(flat: Tensor, shape: Sequence[int]) -> list[Tensor]:
    """Per-dimension indices of flat indices into ``shape`` (row-major), on device."""
    out = []
    for size in reversed(shape):
        out.append(torch.remainder(flat, size))
        flat = torch.div(flat, size, rounding_mode="floor")
    return out[::-1]


def _left_pad(t: Tensor, dims: int) -> Tensor:
    return t.reshape((1,) * (dims - t.dim()) + tuple(t.shape))


def _mask_out(mask: Tensor) -> Tensor:
    """Which entries of an additive float mask count as masked (−∞ or its finite stand-in)."""
    return mask <= torch.finfo(mask.dtype).min / 2


def attention_stats(
    q: Tensor,
    k: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    rows: int | None = ROWS,
    batch: int | None = BATCH,
    _sample: tuple[Tensor, Tensor, Tensor] | None = None,
) -> AttentionCall:
    """Per-head logit maximum and entropy of ``softmax(q·kᵀ·scale + mask)``, as SDPA forms it.

    ``q``: ``[..., H, L, E]``, ``k``: ``[..., Hk, S, E]`` (leading dimensions broadcast as
    SDPA's do; ``Hk`` divides ``H`` with ``enable_gqa``, query head ``h`` reading key head
    ``h // (H / Hk)`` as ``repeat_interleave`` does). ``attn_mask``: boolean (``True``
    takes part) or additive float, broadcastable to ``[..., H, L, S]``. ``is_causal``: row
    ``i`` sees keys ``0..i`` (top-left aligned when ``L ≠ S``, as SDPA). ``scale``: default
    ``1/√E``. ``rows``/``batch``: query rows per sequence and sequences (``None``: all).
    Raises ``ValueError`` on shapes SDPA would reject (the watch turns it into a gap).
    ``_sample`` (internal: :func:`_mha_call`): ``q``, ``k`` and the mask are already the
    sampled sequences and query rows; their weights ``(b_w, r_w)`` and the query rows'
    positions (for ``is_causal``), as :func:`strata` gave them.
    """
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        if q.dim() < 2 or k.dim() < 2 or q.size(-1) != k.size(-1):
            raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} do not pair")
        q = q if q.dim() > 2 else q.unsqueeze(0)  # [L, E]: one head
        k = k if k.dim() > 2 else k.unsqueeze(0)
        heads, length = q.shape[-3], q.shape[-2]
        kv_heads, keys = k.shape[-3], k.shape[-2]
        if kv_heads != heads and kv_heads != 1 and not (enable_gqa and heads % kv_heads == 0):
            raise ValueError(f"{heads} query heads and {kv_heads} key heads")
        mask = None if attn_mask is None else attn_mask.detach()
        if mask is not None and mask.dim() < 2:
            mask = mask.reshape(1, -1)
        mask_lead = tuple(mask.shape[:-3]) if mask is not None and mask.dim() > 3 else ()
        lead = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], mask_lead)) or (1,)
        n_seq = math.prod(lead)
        dtype = torch.promote_types(q.dtype, torch.float32)
        dev = q.device
        if length == 0 or keys == 0 or n_seq == 0:
            empty = torch.zeros(heads, dtype=dtype, device=dev)
            return AttentionCall(empty - torch.inf, empty, empty.clone(), empty + torch.inf)

        if _sample is None:
            b_rep, b_w = strata(n_seq, batch, dev)
            r_rep, r_w = strata(length, rows, dev)
            r_pos = r_rep
        else:  # already sampled: every row and sequence, with the sample's weights
            b_w, r_w, r_pos = _sample
            b_rep = torch.arange(n_seq, device=dev)
            r_rep = torch.arange(length, device=dev)
        nb, nr = b_rep.numel(), r_rep.numel()
        group = heads // kv_heads
        per_seq, per_head, per_row = slice_plan(nb, heads, group, nr, keys)
        with no_autocast(dev):
            by_heads = []
            for h0, h1 in _head_slices(heads, group, per_head):
                parts = [
                    _measure(
                        q,
                        k,
                        mask,
                        lead,
                        b_rep[i : i + per_seq],
                        b_w[i : i + per_seq],
                        r_rep[j : j + per_row],
                        r_w[j : j + per_row],
                        r_pos[j : j + per_row],
                        (h0, h1),
                        is_causal=is_causal,
                        scale=scale,
                        dtype=dtype,
                    )
                    for i in range(0, nb, per_seq)
                    for j in range(0, nr, per_row)
                ]
                by_heads.append(_pool(parts))
        if len(by_heads) == 1:
            return by_heads[0]
        return AttentionCall(
            *(torch.cat([getattr(c, f) for c in by_heads]) for f in _FIELDS)  # type: ignore[arg-type]
        )


_FIELDS = ("logit_max", "entropy_sum", "weight", "entropy_min")


def _pool(parts: list[AttentionCall]) -> AttentionCall:
    """Slices of the same heads (other sequences or rows) as one measurement."""
    if len(parts) == 1:
        return parts[0]
    return AttentionCall(
        logit_max=torch.stack([p.logit_max for p in parts]).amax(0),
        entropy_sum=torch.stack([p.entropy_sum for p in parts]).sum(0),
        weight=torch.stack([p.weight for p in parts]).sum(0),
        entropy_min=torch.stack([p.entropy_min for p in parts]).amin(0),
    )


def slice_plan(
    sequences: int, heads: int, group: int, rows: int, keys: int, budget: int | None = None
) -> tuple[int, int, int]:
    """Sequences, query heads and query rows measured at once, so that the logits of a
    slice (``sequences × heads × rows × keys``, and the mask entries and temporaries of
    that shape) are at most ``budget`` (default :data:`_LOGITS`): whole sequences while
    one fits, then whole groups of heads sharing a key head (``group``; ``enable_gqa``),
    then heads within a group, then rows of one head. The floor is one query row of one
    head: ``keys`` logits, when ``keys`` alone exceeds the budget."""
    budget = _LOGITS if budget is None else budget
    one_head = rows * keys
    if one_head > budget:
        return 1, 1, max(1, budget // keys)
    if heads * one_head > budget:
        fit = budget // one_head  # ≥ 1 head
        return 1, fit // group * group if fit >= group else fit, rows
    return max(1, min(sequences, budget // (heads * one_head))), heads, rows


def _head_slices(heads: int, group: int, per: int) -> list[tuple[int, int]]:
    """``[h0, h1)`` ranges of ``per`` heads (fewer at the end): whole groups when ``per``
    is a multiple of ``group``, else ranges inside one group (a slice reads one key head
    per group it covers)."""
    if per % group == 0:
        return [(h, min(h + per, heads)) for h in range(0, heads, per)]
    return [
        (h, min(h + per, g + group))
        for g in range(0, heads, group)
        for h in range(g, g + group, per)
    ]


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for the measurement: under the user's autocast a matmul would run in
    half precision again."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _measure(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    lead: tuple[int, ...],
    b_rep: Tensor,
    b_w: Tensor,
    r_rep: Tensor,
    r_w: Tensor,
    r_pos: Tensor,
    head_range: tuple[int, int],
    *,
    is_causal: bool,
    scale: float | None,
    dtype: torch.dtype,
) -> AttentionCall:
    """The statistics of the sampled rows ``r_rep`` of the sampled sequences ``b_rep``, of
    the query heads ``head_range`` (whole groups sharing a key head, or part of one).
    ``r_pos``: those rows' positions in the sequence (``r_rep`` unless already sampled)."""
    all_heads, length, width = q.shape[-3:]
    kv_heads, keys = k.shape[-3], k.shape[-2]
    group = all_heads // kv_heads
    h0, h1 = head_range
    heads = h1 - h0
    kv0, kv1 = h0 // group, (h1 - 1) // group + 1  # the key heads these query heads read
    dev, d = q.device, len(lead)
    nb, nr = b_rep.numel(), r_rep.numel()
    idx = [i.view(nb, 1, 1) for i in _unravel(b_rep, lead)]
    head_i = torch.arange(h0, h1, device=dev).view(1, heads, 1)
    row_i = r_rep.view(1, 1, nr)

    # The sampled query rows [nb, h, nr, E] and their keys [nb, kv, S, E]: advanced
    # indexing of broadcast views copies only what is selected.
    qs = _left_pad(q, d + 3).expand(*lead, all_heads, length, width)
    qs = qs[(*idx, head_i, row_i)].to(dtype)
    ks = _left_pad(k, d + 3).expand(*lead, kv_heads, keys, width)[..., kv0:kv1, :, :]
    ks = ks[tuple(i.view(nb) for i in idx)].to(dtype)
    # Each key head once (not repeated per query head): [nb, kv, heads/kv, nr, S]. On a
    # GPU this float32 matmul follows the user's TF32 setting
    # (torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision): with
    # TF32 on, logits carry ~1e-3 relative error. Global flags are the user's: not flipped.
    logits = torch.matmul(
        qs.reshape(nb, kv1 - kv0, heads // (kv1 - kv0), nr, width),
        ks.unsqueeze(2).transpose(-1, -2),
    ).reshape(nb, heads, nr, keys)
    logits = logits * (1.0 / math.sqrt(width) if scale is None else scale)

    valid = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev)
    if is_causal:  # top-left: row i sees keys 0..i
        valid = (r_pos.view(nr, 1) >= torch.arange(keys, device=dev).view(1, keys))[None, None]
    if mask is not None:
        ms = _left_pad(mask, d + 3).expand(*lead, all_heads, length, keys)
        ms = ms[(*idx, head_i, row_i)]
        if ms.dtype == torch.bool:
            valid = valid & ms
        else:
            valid = valid & ~_mask_out(ms)
            logits = logits + ms.to(dtype)
    valid = valid.expand(nb, heads, nr, keys)

    row_ok = valid.any(-1)  # fully masked rows are left out
    safe = torch.where(valid, logits, -torch.inf).where(row_ok.unsqueeze(-1), 0.0)
    logp = torch.log_softmax(safe, dim=-1)
    entropy = -torch.where(valid, logp.exp() * logp, 0.0).sum(-1)  # [nb, H, nr]
    w = (b_w.view(nb, 1, 1) * r_w.view(1, 1, nr)).to(dtype) * row_ok
    return AttentionCall(
        logit_max=torch.where(valid, logits, -torch.inf).amax(dim=(0, 2, 3)),
        entropy_sum=(w * entropy).sum(dim=(0, 2)),
        weight=w.sum(dim=(0, 2)),
        entropy_min=torch.where(row_ok, entropy, torch.inf).amin(dim=(0, 2)),
    )


def summarise(calls: Sequence[AttentionCall]) -> dict[str, Tensor]:
    """A module's statistics for the step from its calls (0-d tensors, and ``[H]`` per head).

    ``attn_logit_max``: max over calls, heads and rows. ``attn_entropy``: the mean over
    every (call, head, row), weighted as sampled. ``attn_entropy_min``: the lowest per-head
    mean (the most collapsed head). Per head (``attn_head_*``, shape ``[H]``), given only
    when every call has the same heads: the calls pooled head by head. NaN where nothing
    was measured (a gap, not a value)."""
    if not calls:
        return {}
    # made on the device (a host tensor copied there would make the host wait)
    nan = torch.full((), torch.nan, device=calls[0].weight.device)
    top = torch.stack([c.logit_max.amax() for c in calls]).amax()
    weight = torch.stack([c.weight.sum() for c in calls]).sum()
    total = torch.stack([c.entropy_sum.sum() for c in calls]).sum()
    out = {"attn_logit_max": top.where(weight > 0, nan), "attn_entropy": total / weight}
    if len({c.weight.shape for c in calls}) == 1:
        pooled = AttentionCall(
            logit_max=torch.stack([c.logit_max for c in calls]).amax(0),
            entropy_sum=torch.stack([c.entropy_sum for c in calls]).sum(0),
            weight=torch.stack([c.weight for c in calls]).sum(0),
            entropy_min=torch.stack([c.entropy_min for c in calls]).amin(0),
        )
        per_head = [pooled]
        valid = pooled.weight > 0
        out["attn_head_logit_max"] = pooled.logit_max.where(valid, nan)
        out["attn_head_entropy"] = pooled.entropy_mean
        out["attn_head_entropy_min"] = pooled.entropy_min.where(valid, nan)
    else:  # heads differ between calls (e.g. a decoding step packed by head group)
        per_head = list(calls)
    means = torch.cat([c.entropy_mean for c in per_head])
    out["attn_entropy_min"] = (
        torch.where(means.isnan(), torch.inf, means).amin().where(weight > 0, nan)
    )
    return out


def _sdpa_call(args: tuple, kwargs: dict, rows: int | None, batch: int | None) -> AttentionCall:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    given = dict(zip(names, args, strict=False)) | kwargs
    return attention_stats(
        given["query"],
        given["key"],
        attn_mask=given.get("attn_mask"),
        is_causal=bool(given.get("is_causal", False)),
        scale=given.get("scale"),
        enable_gqa=bool(given.get("enable_gqa", False)),
        rows=rows,
        batch=batch,
    )


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention's masks (boolean: ``True`` is *masked*) as an additive mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -torch.inf)


def _mha_call(args: tuple, kwargs: dict, rows: int | None, batch: int | None) -> AttentionCall:
    """Query and key of ``F.multi_head_attention_forward`` as it forms them (sequence-first
    inputs, in-projection, ``bias_k``, ``add_zero_attn``, ``static_k``, masks merged), then
    :func:`attention_stats`. The projections are recomputed (the mode cannot see inside
    this function: its body runs with the mode popped), under ``no_grad`` (the watch), for
    the sampled sequences and query rows only (keys: all of the sampled sequences'), so
    the cost is bounded whatever the batch size, as for an SDPA call."""
    a = _MHA_SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    query, key = p["query"].detach(), p["key"].detach()
    kpm, attn_mask = p["key_padding_mask"], p["attn_mask"]
    if query.dim() == 2:  # unbatched
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        kpm = None if kpm is None else kpm.unsqueeze(0)
    length, n, embed = query.shape
    heads = p["num_heads"]
    hd = embed // heads
    dev = query.device
    b_rep, b_w = strata(n, batch, dev)  # the sample attention_stats would take
    r_rep, r_w = strata(length, rows, dev)
    nb, nr = b_rep.numel(), r_rep.numel()
    w, b = p["in_proj_weight"], p["in_proj_bias"]
    bq, bk = (None, None) if b is None else (b[:embed], b[embed : 2 * embed])
    if p["use_separate_proj_weight"]:
        wq, wk = p["q_proj_weight"], p["k_proj_weight"]
    else:
        wq, wk = w[:embed], w[embed : 2 * embed]
    q = F.linear(query[r_rep.view(nr, 1), b_rep.view(1, nb)], wq, bq)  # [nr, nb, E]
    q = q.reshape(nr, nb, heads, hd).permute(1, 2, 0, 3)  # [nb, H, nr, hd]
    dtype = q.dtype
    if p["static_k"] is not None:  # [N·H, S, hd]
        static = p["static_k"].detach()
        k = static.reshape(n, heads, static.shape[1], hd)[b_rep]
    else:
        k = F.linear(key[:, b_rep], wk, bk)  # [S, nb, E]
        if p["bias_k"] is not None:
            k = torch.cat([k, p["bias_k"].detach().expand(1, nb, embed)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        k = k.reshape(k.shape[0], nb, heads, hd).permute(1, 2, 0, 3)  # [nb, H, S, hd]
    if p["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(nb, heads, 1, hd)], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    keys = k.shape[2]
    is_causal = bool(p["is_causal"]) and kpm is None and not p["need_weights"]
    mask = None
    if not is_causal:  # as the function does: the causal hint replaces the mask only then
        if attn_mask is not None:  # [L, S] or [N·H, L, S]: the sampled rows (and sequences)
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.reshape(n, heads, length, keys)[b_rep][:, :, r_rep]
            else:
                attn_mask = attn_mask[r_rep]
        mask = _additive(attn_mask, dtype)
        kpm = _additive(None if kpm is None else kpm[b_rep], dtype)
        if kpm is not None:
            kpm = kpm.reshape(nb, 1, 1, keys)
            mask = kpm if mask is None else mask + kpm
    sample = (b_w, r_w, r_rep)
    return attention_stats(
        q, k, attn_mask=mask, is_causal=is_causal, rows=rows, batch=batch, _sample=sample
    )


_PLAIN = (Tensor, nn.Parameter)


def _has_fast_path(m: nn.Module) -> bool:
    """nn.MultiheadAttention (the kinds table's attention module) or a subclass, and
    nn.TransformerEncoderLayer: the modules with a fused inference path."""
    return module_kind(m).attention or isinstance(m, nn.TransformerEncoderLayer)


def fast_path_at_risk(model: nn.Module) -> bool:
    """Whether a forward of ``model`` now could take the fused inference path of
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (a module in eval mode with
    grad off or its parameters frozen). Any torch-function mode turns that path off (it
    checks ``has_torch_function``), and the regular path rounds differently: the engine
    must not enter :class:`AttentionWatch` for such a forward (a gap, not a changed model)."""
    grad = torch.is_grad_enabled()
    return any(
        not grad or not any(p.requires_grad for p in m.parameters())
        for m in model.modules()
        if _has_fast_path(m) and not m.training
    )


class AttentionWatch(TorchFunctionMode):
    """While entered, every ``F.scaled_dot_product_attention`` and
    ``F.multi_head_attention_forward`` call made by the current probed module is measured.

    ``current()`` names the probed module making the call (``None``: not one of ours, the
    call is left alone); ``sink(name, call)`` receives its :class:`AttentionCall`. The
    call's result is returned untouched, computed before anything is measured; a failure
    of the measurement or of the sink is one :class:`~gradprobe.hooks.GradprobeWarning`
    per module and kind of failure (``warned`` remembers which) and no record. While dynamo
    traces (``torch.compile``), nothing is measured: compiled regions are a gap.
    """

    def __init__(
        self,
        current: Callable[[], str | None],
        sink: Callable[[str, AttentionCall], None],
        *,
        rows: int | None = ROWS,
        batch: int | None = BATCH,
        warned: set[str] | None = None,
    ) -> None:
        super().__init__()
        self._current = current
        self._sink = sink
        self._rows = rows
        self._batch = batch
        self._warned = set() if warned is None else warned

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        out = func(*args, **kwargs)
        if (func is _SDPA or func is _MHA) and not torch.compiler.is_compiling():
            self._observe(func, args, kwargs)
        return out

    def _observe(self, func: Callable[..., object], args: tuple, kwargs: dict) -> None:
        name = None
        try:
            name = self._current()
            if name is None:
                return
            if torch._C._functorch.peek_interpreter_stack() is not None:
                # Under torch.vmap / torch.func.grad the tensors are the transform's
                # wrappers: a statistic of them would escape the transform. Not received
                # (the engine counts the call attributed): the module is a gap for the step.
                from .hooks import warn_gap

                warn_gap(
                    self._warned,
                    f"attention {name} transform",
                    f"gradprobe: module {name!r} calls attention inside a torch.func transform "
                    "(torch.vmap, torch.func.grad): its attention statistics are not measured "
                    "there, so attn_logit_max and attn_entropy have a gap for that step; "
                    "training is not affected",
                )
                return
            tensors = [a for a in (*args[:2], *kwargs.values()) if isinstance(a, Tensor)]
            if any(type(a) not in _PLAIN or a.is_nested for a in tensors):
                # a DTensor would run collectives, a nested tensor has no [L, E] rows
                raise TypeError("a tensor subclass or nested tensor is not measured")
            read = _sdpa_call if func is _SDPA else _mha_call
            # Nothing of the measurement reaches autograd: under activation checkpointing
            # a tensor it saved would be one more than the recompute saves (CheckpointError)
            with torch.no_grad():
                call = read(args, kwargs, self._rows, self._batch)
            self._sink(name, call)
        except Exception as exc:  # never into the user's forward
            from .hooks import warn_gap

            where = "attention" if name is None else f"attention {name}"
            warn_gap(
                self._warned,
                f"{where} {type(exc).__name__}",
                f"gradprobe: measuring the attention of module {name!r} failed "
                f"({type(exc).__name__}: {exc}); attn_logit_max and attn_entropy have a gap "
                "there, training is not affected",
            )
