"""Parameter statistics: the gradient and parameter norms of the step, and the pre-clip norms.

:class:`ParamStats` takes, at the optimizer step (after AMP unscale, clipping and the DDP
all-reduce), the gradients' and parameters' norms and NaN/Inf counts, one batched pass per
device and dtype; when a backward pass that accumulated into ``.grad`` ends, the norms as
backward left them (``global_grad_norm_preclip``, unscaled by the watched ``GradScaler``),
which the step reuses where nothing touched the gradients since. Under the "auto" cadence,
a step it does not record gets the gradients' norms alone (the sentinel).
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..hooks import Site, at_backward_end
from ..reduce import accumulation_dtype, l2_norms, nonfinite_flags, to_host_later
from ..shards import dtensor_type, local_shards
from .clock import AUTO_EVERY, AUTO_FIRST
from .context import Context

__all__ = [
    "ParamStats",
    "grad_values",
    "grad_versions",
    "gradient_norms",
    "nonfinite_counts",
    "param_groups",
    "squared_total",
]

# The end of a backward pass, queued by its first accumulation (Entry guards it).
_PRECLIP_SITE = Site("the end of backward (pre-clip norms)", "params")


def _backward_end_hook(owner: Any, first: bool) -> None:
    ctx = owner.ctx
    if first:
        # Queue once more, behind every callback queued during the backward pass: DDP's
        # reducer queues the one that writes the all-reduced buckets into .grad, and the
        # pre-clip norm must be of those synchronised gradients.
        at_backward_end(_backward_end_hook, ctx.owner_ref, _PRECLIP_SITE, -1, False)
        return
    if not ctx.closed:
        ctx.emit("backward_ended")  # pre-clip norms, the gradients' marker (follow.py)


def param_groups(
    ctx: Context, with_grad: bool
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The bound parameters (those that left the model excepted) by device and dtype;
    ``with_grad``: those with a ``.grad``."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    retired = ctx.retired_params  # left the model (gradprobe/follow.py)
    for i, p in enumerate(ctx.params):
        if (with_grad and p.grad is None) or i in retired:
            continue
        groups[(p.device, p.dtype)].append(i)
    return groups


def grad_values(grads: list[Tensor]) -> list[Tensor]:
    """Gradients as dense tensors with the same norm and the same NaN/Inf entries.

    A sparse gradient (``nn.Embedding(sparse=True)``, ``EmbeddingBag``) is its coalesced
    values: an uncoalesced one may hold an index several times, and those entries add up
    to the gradient's entry, so they must be summed before any norm. A sharded gradient
    (a ``DTensor``) is this rank's shard: its values add up over the shards.
    """
    if dtensor_type() is None and all(g.layout == torch.strided for g in grads):
        return grads  # the common case: dense, unsharded (one check each, no new list)
    values = []
    for g in local_shards(grads):
        if g.layout == torch.sparse_coo:
            g = g.coalesce().values()
        elif g.layout != torch.strided:
            g = g.values()  # compressed layouts hold each index once
        values.append(g)
    return values


def gradient_norms(grads: list[Tensor], device: torch.device) -> tuple[Tensor, list[bool] | None]:
    """The norms of gradients of one device and dtype, one batched pass (:func:`l2_norms`
    of :func:`grad_values`): the one computation of every gradient norm the Probe
    records, by the general path and the sentinel's short route alike."""
    return l2_norms(grad_values(grads), device)


def squared_total(norms: Tensor) -> Tensor | float:
    """Σ‖g‖² of one group's norms, for the spike burst and the live check
    (:meth:`.clock.StepClock.watch_spike`): on the CPU a host float (the norms are host
    values already; squares of float32 are exact in float64 and ``fsum`` rounds once),
    elsewhere a 0-d tensor in the accumulation dtype, read later without a sync. (Squares
    of float32 norms are exact in float64; of float64 ones, rounded once each.)"""
    if norms.device.type == "cpu":
        try:
            return math.fsum(v * v for v in norms.reshape(-1).tolist())
        except OverflowError:  # finite squares past 1.8e308 (float64 norms): as torch's sum
            return math.inf
    return norms.to(accumulation_dtype(norms.device)).square().sum()


def grad_versions(grads: list[Tensor]) -> list[tuple[int, int]]:
    """Which tensor each gradient is and its in-place version: host numbers, no sync."""
    return [(id(g), g._version) for g in grads]


def nonfinite_counts(device: torch.device, grads: list[Tensor]) -> Tensor:
    """Per gradient, its NaN/Inf entries (``stats="full"``): NaN·0 and Inf·0 are NaN,
    finite·0 is 0, so the ord-0 "norm" of ``g·0`` counts them, in the accumulation dtype
    (in a bfloat16 gradient's own, 997 would read 996)."""
    zeroed = torch._foreach_mul(grads, 0.0)
    return torch.stack(torch._foreach_norm(zeroed, 0, dtype=accumulation_dtype(device)))


class ParamStats:
    """The parameters' statistics of a step. ``snapshot``: the update snapshot component (it has
    ‖w‖ before the update when the update already happened); ``clock``: the step clock
    (the global norm feeds its spike burst; non-finite gradients start a burst)."""

    def __init__(self, ctx: Context, snapshot: Any, clock: Any) -> None:
        self.ctx = ctx
        self._updates = snapshot
        self._clock = clock
        # Gradient norms of the last finished backward pass, by (device, parameter indices).
        self._preclip: dict[
            tuple[torch.device, tuple[int, ...]], tuple[Tensor, list[bool] | None]
        ] = {}
        # The .grad tensors and versions those norms were taken of (see _grads_untouched).
        self._grad_versions: dict[tuple[torch.device, tuple[int, ...]], list[tuple[int, int]]] = {}
        self.backward_pending = False  # a backward's end is queued (on_post_accumulate)
        # Gradients written unseen by their version counters (see writes_unseen).
        self._writes_unseen = False
        self._comparisons: list[tuple[Any, Any]] = []
        self._want_params = ctx.plan.params
        self._want_preclip = ctx.plan.preclip
        ctx.on("backward_ended", self._on_backward_ended)
        ctx.on("step_discarded", self._on_step_discarded)
        ctx.on("step_closed", self._on_step_closed)
        ctx.on("model_rebound", self._on_model_rebound)

    # ------------------------------------------------------------ events
    def _on_backward_ended(self) -> None:
        self.backward_pending = False
        ctx = self.ctx
        if ctx.closed or ctx.searching or ctx.unfollowed:
            return
        if self._want_preclip:
            ctx.guard_params(self._record_preclip, "the end of backward (pre-clip norms)")

    def _on_step_discarded(self, step: int, skipped: bool) -> None:
        if skipped:
            self._preclip = {}
            self.ctx.shards.discard()

    def _on_step_closed(self, step: int) -> None:
        self.backward_pending = False  # a backward that raised never ran its callback

    def _on_model_rebound(self, new_params: list[Tensor]) -> None:
        self._preclip, self._grad_versions = {}, {}

    def close(self) -> None:
        self._preclip = {}

    def adopt_preclip(
        self,
        device: torch.device,
        idx: list[int],
        norms: Tensor,
        finite: list[bool] | None,
        versions: list[tuple[int, int]],
    ) -> None:
        """Take the pre-clip norms the sentinel's short route measured at this step's
        backward (gradprobe/recording/sentinel.py), which goes the general way from now on."""
        self._preclip = {(device, tuple(idx)): (norms, finite)}
        self._grad_versions = {(device, tuple(idx)): versions}

    # ------------------------------------------------------------ the step
    def record_sentinel(self) -> None:
        """At a step the "auto" cadence does not record: the gradients' norms (before
        clipping, too) and their NaN/Inf flags, as at a recorded step, and nothing else.
        On the screened (CPU) path the flags are on the host already: non-finite
        gradients start a burst of recorded steps. Elsewhere that would need a host read,
        so the rows show the step but no burst follows; nor under torch.distributed
        (ranks keep one cadence). See docs/recording.md, "Cadence"."""
        if not self.ctx.unfollowed:
            self._record_params(grads_only=True)

    def record(self) -> None:
        """The step's parameter statistics (at a recorded step)."""
        self._record_params()

    def _record_missing_grads(self) -> None:
        """Flag the parameters the optimizer holds for training that got no gradient.

        Not flagged: parameters the optimizer does not hold, or with ``requires_grad=False``
        (frozen on purpose). Host-only: ``.grad is None`` is known without the device.
        """
        ctx = self.ctx
        optimizer = ctx.optimizer()
        if optimizer is None or "grad_missing" not in ctx.stats:
            return
        params = ctx.params
        candidates = [i for i, p in enumerate(params) if p.grad is None and p.requires_grad]
        if not candidates:  # the common step: every parameter got its gradient
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [i for i in candidates if id(params[i]) in held]
        if missing:
            ctx.buffer.set_param_host(missing, "grad_missing")

    @torch.no_grad()
    def _record_params(self, grads_only: bool = False) -> None:
        """Gradient norms, parameter norms, NaN/Inf counts: one batched pass per group.
        ``grads_only``: the sentinel of a step the "auto" cadence does not record."""
        ctx = self.ctx
        buffer, stats = ctx.buffer, ctx.stats
        preclip, self._preclip = self._preclip, {}
        # Sharded parameters' values (of local shards) wait for the step's one collective.
        # (Nothing sharded: straight into the buffer, as ShardedNorms.record would.)
        record = partial(ctx.shards.record, buffer) if ctx.shards else buffer.record_params
        for (device, idx), (norms, _finite) in preclip.items():
            record(device, list(idx), "preclip_norm", norms)
            buffer.set_param_host(list(idx), "has_preclip")
        self._record_missing_grads()
        if not self._want_params:
            return
        totals: list[Tensor | float] = []  # the step's Σ‖g‖² per group, for the spike burst
        for (device, _dtype), idx in param_groups(ctx, with_grad=True).items():
            # The norms backward left are these very gradients' where nothing touched
            # them since (no clipping, no scaler): one pass fewer, and no gradient
            # gathered unless an exact NaN/Inf count asks for them.
            same = preclip.get((device, tuple(idx)))
            grads: list[Tensor] | None = None
            untouched = same is not None and self._grads_untouched(idx)
            if untouched and not self.reuse_checked(ctx.step_index, grads_only):
                grad_norms, finite = same  # type: ignore[misc]
            else:
                grads = self._grads(idx)
                grad_norms, finite = l2_norms(grads, device)  # (gradient_norms, of these)
                if untouched:  # the versions say unchanged: were they written unseen?
                    self._compare(same[0], grad_norms)  # type: ignore[index]
            record(device, idx, "grad_norm", grad_norms)
            if not ctx.distributed:  # the burst ("auto") and the live check
                pre = same[0] if same is not None else grad_norms
                totals.append(squared_total(pre))
            # Ranks must keep one cadence (their collectives must match): one rank's
            # shards may be finite where another's are not, so no burst under them.
            if grads_only and finite is not None and not all(finite) and not ctx.distributed:
                self._clock.burst()
            # Only what is asked: each is a pass over every parameter.
            if "param_norm" in stats and not grads_only:
                params = local_shards([ctx.params[i] for i in idx])
                norms = self._updates.norms_before(device, idx, params)
                record(device, idx, "param_norm", norms)
                buffer.set_param_host(idx, "has_param_norm")
            if "nonfinite" in stats:
                if finite is not None and not ctx.shards and all(finite):
                    # The common step on the CPU (the screened path: ``finite`` is known on
                    # the host, and a finite norm means no NaN/Inf entry): zero flags, and
                    # zero counts for stats="full", straight into the host arrays, as
                    # record() would put them there (no tensor made, no pass).
                    buffer.set_param_host(idx, "grad_nonfinite", 0.0)
                elif ctx.exact_counts:  # stats="full": the gradients themselves, counted
                    flags = nonfinite_counts(device, self._grads(idx) if grads is None else grads)
                    record(device, idx, "grad_nonfinite", flags)
                else:  # a 0/1 flag the norms carry, at no extra pass
                    record(device, idx, "grad_nonfinite", nonfinite_flags(grad_norms, finite))
            buffer.set_param_host(idx, "has_grad")
        if totals:
            self._clock.watch_spike(totals)

    # ------------------------------------------------------------ writes unseen
    # A write through ``.data`` (``p.grad.data.clamp_``: the DQN tutorial's clipping, RL
    # code; apex's multi_tensor_scale) changes a gradient without bumping its version
    # counter: the norms backward left would be taken for the step's. At the steps
    # AUTO_FIRST and AUTO_EVERY name (any cadence's), a recorded step measures the
    # gradients again where their versions say unchanged and compares; once they differ,
    # no step reuses backward's norms (docs/recording.md, "Cadence").
    @property
    def writes_unseen(self) -> bool:
        """Gradients were found changed between backward and the step with their versions
        unchanged: backward's norms are not reused from then on."""
        self._read_comparisons()
        return self._writes_unseen

    def reuse_checked(self, step: int, grads_only: bool) -> bool:
        """Whether this step measures again rather than reuse backward's norms."""
        if self.writes_unseen:
            return True
        return not grads_only and (step < AUTO_FIRST or step % AUTO_EVERY == 0)

    def _compare(self, before: Tensor, now: Tensor) -> None:
        """Backward's norms against the step's, NaN equal to NaN: a host bool on the CPU,
        on a CUDA device a flag read at a later step, once it has landed (no sync);
        elsewhere (MPS: no event to poll) not compared."""
        if before.device.type == "cpu":
            if not torch.equal(before.isnan(), now.isnan()) or not torch.equal(
                before.nan_to_num(0.0, 0.0, 0.0), now.nan_to_num(0.0, 0.0, 0.0)
            ):
                self._writes_unseen = True
            return
        if before.device.type != "cuda":  # no event to read it by without a sync (MPS)
            return
        differs = (before.to(now.dtype) != now) & ~(before.isnan() & now.isnan())
        self._comparisons.append(to_host_later(differs.any()))

    def _read_comparisons(self) -> None:
        pending = self._comparisons
        while pending and (pending[0][1] is None or pending[0][1].query()):
            host, _ = pending.pop(0)
            if bool(host):
                self._writes_unseen = True

    # ------------------------------------------------------------ pre-clip norms
    def on_post_accumulate(self) -> None:
        """A parameter's ``.grad`` was accumulated: measure once, when this backward ends."""
        ctx = self.ctx
        if ctx.closed or not (ctx.recording or ctx.auto) or self.backward_pending:
            return
        self.backward_pending = True
        at_backward_end(_backward_end_hook, ctx.owner_ref, _PRECLIP_SITE, -1, True)

    @torch.no_grad()
    def _record_preclip(self) -> None:
        """Norms of ``.grad`` as backward left them: before clipping, unscaled.

        Kept until the step (the last backward of an accumulation step wins), replaced,
        never summed: the accumulated gradient is what clipping would see.
        """
        self.backward_pending = False
        scaler = self.ctx.scaler()
        scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
        preclip = {}
        for (device, _dtype), idx in param_groups(self.ctx, with_grad=True).items():
            norms, finite = gradient_norms(self._raw_grads(idx), device)
            if scale is not None:
                dtype = accumulation_dtype(device)
                # The scaled loss made scaled gradients: divide on the device, no sync.
                norms = norms.to(dtype) / scale.to(device=device, dtype=dtype)
                self._grad_versions.pop((device, tuple(idx)), None)
            else:  # unscaled: the step may reuse them if nothing touched the gradients
                self._grad_versions[(device, tuple(idx))] = self._versions(idx)
            preclip[(device, tuple(idx))] = (norms, finite)
        self._preclip = preclip

    def _versions(self, idx: list[int]) -> list[tuple[int, int]]:
        """Which tensor each ``.grad`` is and its in-place version: host numbers, no sync."""
        return grad_versions(self._raw_grads(idx))

    def _grads_untouched(self, idx: list[int]) -> bool:
        """Whether the gradients are exactly as the last backward left them (no clipping,
        unscaling, or other in-place change since), read from version counters."""
        ctx = self.ctx
        key = (ctx.params[idx[0]].device, tuple(idx)) if idx else None
        before = self._grad_versions.pop(key, None) if key is not None else None
        # Under data parallelism collectives write gradients without a version bump.
        alone = not ctx.distributed and not ctx.shards
        return alone and before is not None and before == self._versions(idx)

    def _grads(self, idx: list[int]) -> list[Tensor]:
        """The gradients of parameters ``idx`` as :func:`grad_values` gives them."""
        return grad_values(self._raw_grads(idx))

    def _raw_grads(self, idx: list[int]) -> list[Tensor]:
        params = self.ctx.params
        return [params[i].grad for i in idx]
