"""The floor of each statistic's arithmetic (bench/every_step.py's stats and floors tables).

For one step of a case: the sizes of the tensors a default Probe reads (each probed call's
output, the error signals, the inputs error_gain reads, activation modules' inputs, the
parameters and their gradients), captured with forward hooks on a copy of the model; per
statistic group (``FLOORS``), the bytes it must read (each tensor once), the kernels a
hand-written eager version launches (computed from the tensor counts and shapes), and that
version, the cheapest eager formulation we measured, to be timed on tensors of those sizes.

Issue 25's statistics read other tensors, captured in the same forward: the query and key
of each ``scaled_dot_product_attention`` call (a ``TorchFunctionMode``; calls inside
``F.multi_head_attention_forward``'s fast path are not seen here), the outputs of the
sequence blocks (``token_cosine``) and of the final projection (``logit_max``,
``logit_z``), found by the engine's own rules (gradprobe.recording.sequences). Their
floors read what the bounded sample must read: the sampled query rows of the sampled
sequences and those sequences' keys; the sampled positions of each block output; every
logit once. Not a public API.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


@dataclass
class Sizes:
    """One step's tensors, as a default Probe sees them (shapes and dtypes only)."""

    outputs: list[torch.Size] = field(default_factory=list)  # each probed call's output
    errors: list[torch.Size] = field(default_factory=list)  # outputs that require grad
    shares: list[torch.Size] = field(default_factory=list)  # inputs error_gain reads
    gates: list[torch.Size] = field(default_factory=list)  # activation modules' inputs
    params: list[torch.Size] = field(default_factory=list)
    attention: list[AttnCall] = field(default_factory=list)  # each SDPA call's q and k
    blocks: list[torch.Size] = field(default_factory=list)  # block outputs, [N, T, F]
    logits: list[torch.Size] = field(default_factory=list)  # the final projection's outputs


@dataclass(frozen=True)
class AttnCall:
    """One ``scaled_dot_product_attention`` call's sizes: q ``[..., H, L, E]``, k
    ``[..., Hkv, S, E]``, the explicit mask's shape (None: no mask), ``is_causal``."""

    q: torch.Size
    k: torch.Size
    mask: torch.Size | None
    causal: bool

    @property
    def sample(self) -> tuple[int, int, int, int, int, int]:
        """(sequences b, heads H, kv heads, rows r, keys S, width E) that AttentionWatch
        reads: ``min(BATCH, N)`` sequences, ``min(ROWS, L)`` query rows per head."""
        from gradprobe.attention import BATCH, ROWS

        lead = math.prod(self.q[:-3]) if len(self.q) > 3 else 1
        heads = self.q[-3] if len(self.q) > 2 else 1
        kv = self.k[-3] if len(self.k) > 2 else 1
        return min(BATCH, lead), heads, kv, min(ROWS, self.q[-2]), self.k[-2], self.q[-1]


def probed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a default Probe probes: the engine's own rule (attention modules
    included), else an older base's ``gradprobe.probe._choose_modules``, else the rule of
    the default selection before attention modules were added to it."""
    try:
        from gradprobe.recording.bindings import choose_modules

        return choose_modules(model, None)
    except ImportError:
        pass
    try:
        from gradprobe.probe import _choose_modules

        return _choose_modules(model, None)
    except ImportError:
        return [
            (n, m)
            for n, m in model.named_modules()
            if not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False))
        ]


def sequence_modules(model: nn.Module) -> tuple[list[tuple[nn.Module, int]], nn.Module | None]:
    """The sequence blocks (each with its time dimension) and the final projection, by the
    engine's rules; none on a base without them."""
    try:
        from gradprobe.recording.sequences import _block_time_dim, _blocks, _head
    except ImportError:
        return [], None
    blocks = _blocks(model)
    head = _head(model, blocks)
    modules = dict(model.named_modules())
    return [(m, _block_time_dim(m)) for m in blocks.values()], modules.get(head or "")


class _SeeAttention(TorchFunctionMode):
    """Notes the sizes of every ``scaled_dot_product_attention`` call."""

    def __init__(self, calls: list[AttnCall]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            given = dict(zip(names, args, strict=False)) | kwargs
            mask = given.get("attn_mask")
            self.calls.append(
                AttnCall(
                    given["query"].shape,
                    given["key"].shape,
                    None if mask is None else mask.shape,
                    bool(given.get("is_causal", False)),
                )
            )
        return func(*args, **kwargs)


def first_float(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        for v in value:
            found = first_float(v)
            if found is not None:
                return found
    if hasattr(value, "values") and callable(value.values):  # a ModelOutput, a dict
        return first_float(list(value.values()))
    return None


def step_sizes(case: Any) -> Sizes:
    from gradprobe.activations import activation_of

    sizes = Sizes(params=[p.shape for p in case.model.parameters() if p.requires_grad])
    model = copy.deepcopy(case.model)

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = first_float(args) if args else first_float(kwargs)
        y = first_float(out)
        if y is None:
            return
        sizes.outputs.append(y.shape)
        if y.requires_grad:
            sizes.errors.append(y.shape)
            if x is not None and x.requires_grad:
                sizes.shares.append(x.shape)
        if x is not None and activation_of(module) is not None:
            sizes.gates.append(x.shape)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in probed_modules(model)]
    blocks, head = sequence_modules(model)

    def block_hook(time_dim: int) -> Callable[..., None]:
        def on(module: nn.Module, args: tuple, out: Any) -> None:
            y = first_float(out)
            if y is not None and y.dim() == 3:  # as [N, T, F]
                sizes.blocks.append(y.movedim(time_dim, 1).shape)

        return on

    def head_hook(module: nn.Module, args: tuple, out: Any) -> None:
        y = first_float(out)
        if y is not None:
            sizes.logits.append(y.shape)

    handles += [m.register_forward_hook(block_hook(d)) for m, d in blocks]
    if head is not None:
        handles.append(head.register_forward_hook(head_hook))
    try:
        with _SeeAttention(sizes.attention):
            case.loss(model, case.batch)
    finally:
        for h in handles:
            h.remove()
    return sizes


def _norms(shapes: list[torch.Size]) -> Callable[[], Any]:
    tensors = [torch.randn(s) for s in shapes]
    return lambda: torch._foreach_norm(tensors) if tensors else None


ZERO_CHUNK = 1 << 18  # entries compared with 0 at a time into a float32 buffer


def _chunks(shape: torch.Size) -> int:
    return -(-shape.numel() // ZERO_CHUNK)


def _outputs(shapes: list[torch.Size]) -> Callable[[], Any]:
    """Sum and L2 norm (mean and std), and the zero count: compared with 0 into a float32
    buffer a chunk at a time and summed (on a CPU, ``var_mean``, ``count_nonzero`` and
    a bool ``(t == 0).sum()`` each cost 20-40× a sum on GPT-2's logits)."""
    tensors = [torch.randn(s).reshape(-1) for s in shapes]
    buffer = torch.empty(ZERO_CHUNK)

    def run() -> Any:
        out = []
        for t in tensors:
            zeros = 0.0
            for start in range(0, t.numel(), ZERO_CHUNK):
                chunk = t[start : start + ZERO_CHUNK]
                zeros = torch.eq(chunk, 0, out=buffer[: chunk.numel()]).sum() + zeros
            out.append((t.sum(), torch.linalg.vector_norm(t), zeros))
        return out

    return run


def _absmax(shapes: list[torch.Size]) -> Callable[[], Any]:
    tensors = [torch.randn(s) for s in shapes]
    return lambda: [torch.aminmax(t) for t in tensors]


def _units(shapes: list[torch.Size]) -> Callable[[], Any]:
    tensors = [torch.randn(s).reshape(-1, s[-1]) for s in shapes]
    # amax and amin over the rows: cheaper than aminmax(dim=0) or abs().amax() here
    return lambda: [(t.amax(0), t.amin(0)) for t in tensors]


def _gates(shapes: list[torch.Size]) -> Callable[[], Any]:
    """tanh's f' = 1 − y² from its output y (the bench's activations are tanh): y², then
    the saturated count (y² > 0.99) and the mean (gate_mean = 1 − mean y²)."""
    tensors = [torch.rand(s) * 2 - 1 for s in shapes]

    def run() -> Any:
        out = []
        for y in tensors:
            square = y.square()
            out.append(((square > 0.99).sum(), 1 - square.mean()))
        return out

    return run


def _update(shapes: list[torch.Size]) -> Callable[[], Any]:
    params = [torch.randn(s) for s in shapes]
    snapshot = [torch.empty(s) for s in shapes]
    diff = [torch.empty(s) for s in shapes]  # kept, as a snapshot is: no allocation per step

    def run() -> Any:
        torch._foreach_copy_(snapshot, params)
        before = torch._foreach_norm(snapshot)
        torch._foreach_copy_(diff, params)
        torch._foreach_sub_(diff, snapshot)
        return before, torch._foreach_norm(diff)

    return run


def _attention(calls: list[AttnCall]) -> Callable[[], Any]:
    """AttentionWatch's arithmetic by hand on its sample: the sampled query rows (middles
    of equal strata) of the first ``b`` sequences against those sequences' keys, scaled,
    the causal or explicit mask applied, then per head the largest logit, the
    stratum-weighted mean entropy and the minimum (entropy as ``-xlogy(p, p)``: 0 where
    a masked weight is 0). Kernels per call: index_select, matmul, scale, softmax, xlogy,
    sum, weight, sum, two amax (10); a causal mask +2 (compare, masked_fill), an explicit
    one +2 (its rows, add). GQA: the query heads grouped onto their key head (a view)."""
    from gradprobe.attention import strata

    prepared = []
    for c in calls:
        b, heads, kv, r, keys, width = c.sample
        q = torch.randn(b, kv, heads // max(kv, 1), c.q[-2], width)
        k = torch.randn(b, kv, 1, keys, width)
        idx, weight = strata(c.q[-2], r, torch.device("cpu"))
        mask = None if c.mask is None else torch.zeros(c.mask[-2:])
        prepared.append((q, k, idx, weight.float(), mask, c.causal, width**-0.5))
    key_pos = {keys: torch.arange(keys) for keys in {c.k[-2] for c in calls}}

    def run() -> Any:
        out = []
        for q, k, idx, weight, mask, causal, scale in prepared:
            logits = q.index_select(-2, idx) @ k.transpose(-1, -2)  # [b, kv, g, r, S]
            logits.mul_(scale)
            if causal:
                above = key_pos[k.shape[-2]] > idx[:, None]
                logits.masked_fill_(above, -torch.inf)
            if mask is not None:
                logits.add_(mask.index_select(0, idx))
            p = logits.softmax(-1)
            neg = torch.special.xlogy(p, p).sum(-1)  # −entropy per row
            mean = (neg * weight).sum((0, -1))
            out.append((logits.amax((0, -2, -1)), mean, neg.amax((0, -1))))
        return out

    return run


def _attention_entries(c: AttnCall) -> int:
    """Entries the sample reads: b·H·r·E query entries, b·Hkv·S·E key entries, r·S mask."""
    b, heads, kv, r, keys, width = c.sample
    return b * heads * r * width + b * kv * keys * width + (0 if c.mask is None else r * keys)


def _cosine_entries(shape: torch.Size) -> int:
    from gradprobe.sequence import POSITIONS

    return shape[0] * min(POSITIONS, shape[1]) * shape[2]


def _token_cosine(shapes: list[torch.Size]) -> Callable[[], Any]:
    """token_cosine by hand on a block output [N, T, F]: the sampled positions
    (index_select), their norms, unit vectors, the Gram matrices [N, P, P], the diagonal
    masked out, the sum: 6 kernels (zero vectors not handled: a floor)."""
    from gradprobe.attention import strata
    from gradprobe.sequence import POSITIONS

    prepared = []
    for shape in shapes:
        idx, _ = strata(shape[1], POSITIONS, torch.device("cpu"))
        off = ~torch.eye(idx.numel(), dtype=torch.bool)
        prepared.append((torch.randn(shape), idx, off))

    def run() -> Any:
        out = []
        for y, idx, off in prepared:
            s = y.index_select(1, idx)
            unit = s / torch.linalg.vector_norm(s, dim=-1, keepdim=True)
            out.append(((unit @ unit.transpose(-1, -2)) * off).sum())
        return out

    return run


def _logits(shapes: list[torch.Size]) -> Callable[[], Any]:
    """logit_max and logit_z by hand, one read of [N·T, V]: the row maxima, x − max into a
    kept buffer, exp in place, the row sums, log, + max (logsumexp per row), the maximum
    of the row maxima, the sum of the logsumexps: 8 kernels."""
    prepared = []
    for shape in shapes:
        x = torch.randn(shape).reshape(-1, shape[-1])
        prepared.append((x, torch.empty_like(x)))

    def run() -> Any:
        out = []
        for x, buffer in prepared:
            top = x.amax(-1, keepdim=True)
            torch.sub(x, top, out=buffer).exp_()
            z = buffer.sum(-1, keepdim=True).log_().add_(top)
            out.append((top.amax(), z.sum()))
        return out

    return run


# Per group: its statistics; the tensors it must read, each once (size lists of Sizes, with
# a multiplicity); the eager kernels of the hand-written version per tensor of each list;
# and that version. "grads" are the gradients (the parameters' shapes).
@dataclass(frozen=True)
class Floor:
    # (Sizes field or "grads", times each tensor is read in full, or the float32 entries
    # read of one item: a sample's)
    reads: tuple[tuple[str, int | Callable[[Any], int]], ...]
    # (Sizes field or "grads", kernels per tensor: a number, or one of its shape)
    kernels: tuple[tuple[str, int | Callable[[Any], int]], ...]
    bare: Callable[[Sizes], Callable[[], Any]] | None
    # Part of the default statistics' floor (the "all" row): each tensor they read counted
    # once (the flags, the global norms and error_nonfinite come from these norms).
    in_all: bool = False


def _field(sizes: Sizes, name: str) -> list[Any]:
    return sizes.params if name == "grads" else getattr(sizes, name)


FLOORS: dict[str, tuple[tuple[str, ...], Floor]] = {
    "none (hooks and step boundary only)": ((), Floor((), (), None)),
    "grad_norm": (
        ("grad_norm",),
        Floor((("grads", 1),), (("grads", 1),), lambda s: _norms(s.params), True),
    ),
    "param_norm": (
        ("param_norm",),
        Floor((("params", 1),), (("params", 1),), lambda s: _norms(s.params), True),
    ),
    "global_grad_norm, global_grad_norm_preclip, clipped": (
        ("global_grad_norm", "global_grad_norm_preclip", "clipped"),
        Floor((("grads", 1),), (("grads", 1),), lambda s: _norms(s.params)),
    ),
    # w before (read once: copy and its norm), then w − w_before (two tensors read); the
    # eager version: copy, norm, copy, subtract, norm.
    "update_ratio": (
        ("update_ratio",),
        Floor((("params", 3),), (("params", 5),), lambda s: _update(s.params), True),
    ),
    "nonfinite (flags from the norms of grads and outputs)": (
        ("nonfinite",),
        Floor(
            (("grads", 1), ("outputs", 1)),
            (("grads", 1), ("outputs", 1)),
            lambda s: _norms(s.params + s.outputs),
        ),
    ),
    "outputs: act_mean, act_std, zero_frac": (
        ("act_mean", "act_std", "zero_frac"),
        Floor(
            (("outputs", 1),),
            (("outputs", lambda shape: 2 + 2 * _chunks(shape)),),
            lambda s: _outputs(s.outputs),
            True,
        ),
    ),
    "act_absmax": (
        ("act_absmax",),
        Floor((("outputs", 1),), (("outputs", 1),), lambda s: _absmax(s.outputs)),
    ),
    "units: dead_frac, dead_window_frac": (
        ("dead_frac", "dead_window_frac"),
        Floor((("outputs", 1),), (("outputs", 2),), lambda s: _units(s.outputs), True),
    ),
    "gate: sat_frac, gate_mean": (
        ("sat_frac", "gate_mean"),
        Floor((("gates", 1),), (("gates", 4),), lambda s: _gates(s.gates), True),
    ),
    "error_norm": (
        ("error_norm",),
        Floor((("errors", 1),), (("errors", 1),), lambda s: _norms(s.errors)),
    ),
    "error_gain (with the error norm it divides by)": (
        ("error_gain",),
        Floor(
            (("errors", 1), ("shares", 1)),
            (("errors", 1), ("shares", 1)),
            lambda s: _norms(s.errors + s.shares),
            True,
        ),
    ),
    "error_nonfinite": (
        ("error_nonfinite",),
        Floor((("errors", 1),), (("errors", 1),), lambda s: _norms(s.errors)),
    ),
    # issue 25's statistics, on recorded steps: bounded samples (gradprobe.attention's BATCH
    # sequences × ROWS query rows per head; gradprobe.sequence's POSITIONS per sequence) and
    # one pass over the logits.
    "attention: attn_logit_max, attn_entropy, attn_entropy_min": (
        ("attn_logit_max", "attn_entropy", "attn_entropy_min"),
        Floor(
            (("attention", _attention_entries),),
            (("attention", lambda c: 10 + 2 * c.causal + 2 * (c.mask is not None)),),
            lambda s: _attention(s.attention),
            True,
        ),
    ),
    "token_cosine": (
        ("token_cosine",),
        Floor(
            (("blocks", _cosine_entries),),
            (("blocks", 6),),
            lambda s: _token_cosine(s.blocks),
            True,
        ),
    ),
    "logits: logit_max, logit_z": (
        ("logit_max", "logit_z"),
        Floor((("logits", 1),), (("logits", 8),), lambda s: _logits(s.logits), True),
    ),
    "host-side: calls, grad_missing, skipped, loss, lr": (
        ("calls", "grad_missing", "skipped", "loss", "lr"),
        Floor((), (), None),
    ),
}


def floor_numbers(floor: Floor, sizes: Sizes, rounds: int) -> tuple[int, int, float | None]:
    """(bytes read, eager kernels, bare thread ms) of one group on one step's sizes."""
    nbytes = sum(
        4 * (times(s) if callable(times) else times * s.numel())
        for name, times in floor.reads
        for s in _field(sizes, name)
    )
    kernels = sum(
        per(shape) if callable(per) else per
        for name, per in floor.kernels
        for shape in _field(sizes, name)
    )
    if floor.bare is None:
        return nbytes, kernels, None
    run = floor.bare(sizes)
    run()  # first call: allocations
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return nbytes, kernels, statistics.median(times) * 1e3
