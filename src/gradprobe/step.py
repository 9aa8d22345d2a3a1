"""Where a step begins and ends: parameter statistics, the optimizer step, the scaler.

:class:`StepBoundary` is a part of :class:`gradprobe.Probe` (a mixin; the Probe owns the
state it reads): the gradient and parameter norms taken at the optimizer step (and the
pre-clip norms when a backward pass ends), the ``update_ratio`` snapshot, the learning
rate, a step a ``GradScaler`` skipped, and the step's close, where the buffer stacks the
step's results. What the module hooks capture is in :mod:`gradprobe.capture`.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .buffer import Ranks
from .capture import _inside_backward
from .errors import GradprobeError
from .hooks import Site, at_backward_end, warn_gap
from .reduce import accumulation_dtype, l2_norms, nonfinite_flags, to_host_later
from .shards import dtensor_type, local_shards
from .spikes import GRAD_SPIKE_FACTOR, SPIKE_MIN, SPIKE_WINDOW
from .stats import STATISTICS

if TYPE_CHECKING:
    from .probe import Probe

__all__ = [
    "AUTO_BURST",
    "AUTO_EVERY",
    "AUTO_FIRST",
    "SPIKE_BURST_FACTOR",
    "SPIKE_BURST_MIN",
    "SPIKE_BURST_WINDOW",
    "StepBoundary",
]

# The "auto" cadence, Probe(every="auto"): all of the first AUTO_FIRST steps (where a bad
# initialisation shows), then every AUTO_EVERY-th; the gradients' norms at every step (one
# _foreach_norm: the floor of any monitor), and after a step whose gradients held a NaN or
# an Inf, the AUTO_BURST steps that follow in full. Over 500 steps it records 29 in full.
AUTO_FIRST = 20
AUTO_EVERY = 50
AUTO_BURST = 20
# ... and after a gradient-norm spike: the step's global norm (before clipping where it was
# measured) spikes by gradprobe/spikes.py's rule, diagnose's grad_norm_spike rule (the
# SPIKE_BURST_* names are its values). Read without a host sync: on the CPU the norms are
# host values already; on a GPU the step's total is copied to pinned host memory without
# waiting and read at a later step, once its event has completed (Event.query() never
# blocks), so the burst starts a step or so late there. The same values feed the live
# check's step-level rules (gradprobe/live.py: LiveCheck.at_step).
SPIKE_BURST_FACTOR = GRAD_SPIKE_FACTOR
SPIKE_BURST_WINDOW = SPIKE_WINDOW
SPIKE_BURST_MIN = SPIKE_MIN
_PENDING_NORMS = 64  # copies in flight at most (they complete within a step or two)


# The entry points of this module (gradprobe.hooks.Entry guards each).
_PRECLIP_SITE = Site("the end of backward (pre-clip norms)", "params")
_FULL_PARAM_SITE = Site("a gradient-accumulated hook (error signals)", "all_errors")


def _backward_end_hook(probe: Probe, first: bool) -> None:
    if first:
        # Queue once more, behind every callback queued during the backward pass: DDP's
        # reducer queues the one that writes the all-reduced buckets into .grad, and the
        # pre-clip norm must be of those synchronised gradients.
        at_backward_end(_backward_end_hook, probe._ref, _PRECLIP_SITE, -1, False)
        return
    if not probe._closed:
        probe._after_backward()  # pre-clip norms and the gradients' marker (gradprobe/follow.py)


def _accumulated_hook(probe: Probe, param: Tensor) -> None:
    """A backward pass accumulated into one of FSDP2's full parameters."""
    probe._note_accumulation()


def _scale_marker(scaler: torch.amp.GradScaler | None) -> tuple[int, int] | None:
    """(identity, version) of the scaler's scale tensor; None before its first ``scale()``."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return None if scale is None else (id(scale), scale._version)


def _grad_values(grads: list[Tensor]) -> list[Tensor]:
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


def _nonfinite_counts(device: torch.device, grads: list[Tensor]) -> Tensor:
    """Per gradient, its NaN/Inf entries (``stats="full"``): NaN·0 and Inf·0 are NaN,
    finite·0 is 0, so the ord-0 "norm" of ``g·0`` counts them, in the accumulation dtype
    (in a bfloat16 gradient's own, 997 would read 996)."""
    zeroed = torch._foreach_mul(grads, 0.0)
    return torch.stack(torch._foreach_norm(zeroed, 0, dtype=accumulation_dtype(device)))


def _loggable(name: str, value: Any, reads_lr: bool) -> Tensor | float:
    """A value for :meth:`Probe.log`: a detached one-element tensor, or a float."""
    if not name.isidentifier() and not name.startswith("lr/"):
        raise GradprobeError(
            f"cannot log {name!r}: names are identifiers", "e.g. probe.log(loss=loss)"
        )
    if (name == "lr" and reads_lr) or (name in STATISTICS and STATISTICS[name].logged is None):
        raise GradprobeError(
            f"cannot log {name!r}: the Probe records it itself",
            "log the loss and other values of your own under their own names",
        )
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise GradprobeError(
                f"cannot log {name!r}: a tensor of shape {tuple(value.shape)} is not one real "
                "number",
                f"log a scalar, e.g. probe.log({name}=loss) with loss = loss_fn(out, y)",
            )
        return value.detach()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise GradprobeError(
            f"cannot log {name!r}: a {type(value).__name__} is not a number",
            f"log a tensor or a float, e.g. probe.log({name}=loss)",
        )
    return float(value)


class StepBoundary:
    def _records(self, step: int) -> bool:
        """Whether the cadence records ``step`` in full (module hooks on)."""
        if self._unfollowed:
            return False
        if self._auto:
            return step < AUTO_FIRST or step % AUTO_EVERY == 0 or step <= self._burst_until
        return step % self.every == 0

    def _record_sentinel(self) -> None:
        """At a step the "auto" cadence does not record: the gradients' norms (before
        clipping, too) and their NaN/Inf flags, as at a recorded step, and nothing else.
        On the screened (CPU) path the flags are on the host already: non-finite
        gradients start a burst of recorded steps. Elsewhere that would need a host read,
        so the rows show the step but no burst follows; nor under torch.distributed
        (ranks keep one cadence). See docs/recording.md, "Cadence"."""
        if not self._unfollowed:
            self._record_params(grads_only=True)

    # ================================================================ parameter hooks
    def _param_groups(self, with_grad: bool) -> dict[tuple[torch.device, torch.dtype], list[int]]:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        retired = self._retired_params  # left the model (gradprobe/follow.py)
        for i, p in enumerate(self._params):
            if (with_grad and p.grad is None) or i in retired:
                continue
            groups[(p.device, p.dtype)].append(i)
        return groups

    def _record_missing_grads(self) -> None:
        """Flag the parameters the optimizer holds for training that got no gradient.

        Not flagged: parameters the optimizer does not hold, or with ``requires_grad=False``
        (frozen on purpose). Host-only: ``.grad is None`` is known without the device.
        """
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None or "grad_missing" not in self.stats:
            return
        candidates = [i for i, p in enumerate(self._params) if p.grad is None and p.requires_grad]
        if not candidates:  # the common step: every parameter got its gradient
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [i for i in candidates if id(self._params[i]) in held]
        if missing:
            self.buffer.set_param_host(missing, "grad_missing")

    @torch.no_grad()
    def _record_params(self, grads_only: bool = False) -> None:
        """Gradient norms, parameter norms, NaN/Inf counts: one batched pass per group.
        ``grads_only``: the sentinel of a step the "auto" cadence does not record."""
        preclip, self._preclip = self._preclip, {}
        # Sharded parameters' values (of local shards) wait for the step's one collective.
        record = partial(self._shards.record, self.buffer)
        for (device, idx), (norms, _finite) in preclip.items():
            record(device, list(idx), "preclip_norm", norms)
            self.buffer.set_param_host(list(idx), "has_preclip")
        self._record_missing_grads()
        if not self._want_params:
            return
        totals: list[Tensor] = []  # the step's Σ‖g‖² per group, for the spike burst
        for (device, _dtype), idx in self._param_groups(with_grad=True).items():
            # The norms backward left are these very gradients' where nothing touched
            # them since (no clipping, no scaler): one pass fewer, and no gradient
            # gathered unless an exact NaN/Inf count asks for them.
            same = preclip.get((device, tuple(idx)))
            grads: list[Tensor] | None = None
            if same is not None and self._grads_untouched(idx):
                grad_norms, finite = same
            else:
                grads = self._grads(idx)
                grad_norms, finite = l2_norms(grads, device)
            record(device, idx, "grad_norm", grad_norms)
            if not self._distributed:  # the burst ("auto") and the live check
                pre = same[0] if same is not None else grad_norms
                totals.append(pre.to(accumulation_dtype(device)).square().sum())
            # Ranks must keep one cadence (their collectives must match): one rank's
            # shards may be finite where another's are not, so no burst under them.
            if grads_only and finite is not None and not all(finite) and not self._distributed:
                self._burst_until = self.step_index + AUTO_BURST
            # Only what is asked: each is a pass over every parameter.
            if "param_norm" in self.stats and not grads_only:
                params = local_shards([self._params[i] for i in idx])
                record(device, idx, "param_norm", self._before_norms(device, idx, params))
                self.buffer.set_param_host(idx, "has_param_norm")
            if "nonfinite" in self.stats:
                if self.exact_counts:  # stats="full": the gradients themselves, counted
                    flags = _nonfinite_counts(device, self._grads(idx) if grads is None else grads)
                else:  # a 0/1 flag the norms carry, at no extra pass
                    flags = nonfinite_flags(grad_norms, finite)
                record(device, idx, "grad_nonfinite", flags)
            self.buffer.set_param_host(idx, "has_grad")
        if totals:
            self._watch_spike(totals)

    def _watch_spike(self, totals: list[Tensor]) -> None:
        """Queue the step's global gradient norm (``totals``: Σ‖g‖² per group) and its
        logged loss for the spike burst and the live check's step-level rules, and read
        every queued step whose values have reached the host."""
        # The loss logged so far for this step (one logged after optimizer.step() is read
        # by the flush's check instead); kept as logged: a tensor, or a float.
        losses = list(self.buffer._logged.get((self.step_index, "loss"), ()))
        put = to_host_later
        entry = (self.step_index, [put(t) for t in totals], [put(v) for v in losses])
        if len(self._pending_norms) < _PENDING_NORMS:
            self._pending_norms.append(entry)
        self._read_norms()

    def _read_norms(self) -> None:
        """Run the spike burst and the live check on each queued step that is on the host."""
        pending = self._pending_norms
        while pending and all(e is None or e.query() for _, e in pending[0][1] + pending[0][2]):
            step, totals, losses = pending.popleft()
            total = float(sum(float(h) for h, _ in totals)) ** 0.5
            if self._spikes.push(total) is not None and self._auto:
                self._burst_until = max(self._burst_until, self.step_index + AUTO_BURST)
            if self._scaler_ref is None:  # with a scaler, only the flush knows skipped steps
                loss = float(sum(float(h) for h, _ in losses)) if losses else None
                self._guard(partial(self._live.at_step, step, total, loss), "the live check")

    def _end_sharded_step(self) -> None:
        """Sharded parameters' norms of the step: their shards' squares summed across the
        ranks, by all of them (whatever failed before on one), unless told not to combine
        ranks: then they are left out, with one warning (a shard's norm is not theirs)."""
        if self._sync_ranks is not False:
            self._shards.reduce(self.buffer)
            return
        self._shards.drop(self.buffer)
        warn_gap(
            self._failed_where,
            "sharded parameters",
            "gradprobe: sync_ranks=False, so the norms of sharded (FSDP2) parameters are "
            "not combined across ranks; a shard's norm is not the parameter's, so they and "
            "the global norms are not recorded. Leave sync_ranks unset to have them",
        )

    def _hook_unsharded_params(self) -> None:
        """Hook FSDP2's full parameters, which it makes at its first all-gather: backward
        accumulates into them, and without gradient sync only into them, so they say
        which backward passes count for error signals (the sharded ones' hooks fire only
        where FSDP2 reduce-scatters)."""
        for full in self._shards.new_unsharded():
            self._hooks.on_accumulated(full, _accumulated_hook, self._ref, _FULL_PARAM_SITE)

    def _on_post_accumulate(self) -> None:
        """A parameter's ``.grad`` was accumulated: measure once, when this backward ends."""
        if self._closed or not (self._recording or self._auto) or self._backward_pending:
            return
        self._backward_pending = True
        at_backward_end(_backward_end_hook, self._ref, _PRECLIP_SITE, -1, True)

    @torch.no_grad()
    def _record_preclip(self) -> None:
        """Norms of ``.grad`` as backward left them: before clipping, unscaled.

        Kept until the step (the last backward of an accumulation step wins), replaced,
        never summed: the accumulated gradient is what clipping would see.
        """
        self._backward_pending = False
        scaler = self._scaler_ref() if self._scaler_ref is not None else None
        scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
        preclip = {}
        for (device, _dtype), idx in self._param_groups(with_grad=True).items():
            norms, finite = l2_norms(self._grads(idx), device)
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
        return [(id(g), g._version) for g in (self._params[i].grad for i in idx)]

    def _grads_untouched(self, idx: list[int]) -> bool:
        """Whether the gradients are exactly as the last backward left them (no clipping,
        unscaling, or other in-place change since), read from version counters."""
        key = (self._params[idx[0]].device, tuple(idx)) if idx else None
        before = self._grad_versions.pop(key, None) if key is not None else None
        # Under data parallelism collectives write gradients without a version bump.
        alone = not self._distributed and not self._shards
        return alone and before is not None and before == self._versions(idx)

    def _grads(self, idx: list[int]) -> list[Tensor]:
        """The gradients of parameters ``idx`` as :func:`_grad_values` gives them."""
        return _grad_values([self._params[i].grad for i in idx])

    def _poll_scaler(self) -> None:
        """Close a step the ``GradScaler`` skipped (never raises: see :meth:`_check_scaler`)."""
        if self._scaler_ref is not None:
            self._guard(self._check_scaler, "the GradScaler watch")

    def _check_scaler(self) -> None:
        """Close a step the ``GradScaler`` skipped: ``update()`` ran but no optimizer step.

        ``update()`` changes the scale tensor in place (also when the value stays), so its
        version counter, read on the host without a sync, counts the updates.
        """
        scaler = self._scaler_ref() if self._scaler_ref is not None else None
        marker = _scale_marker(scaler)
        if marker is None or marker == self._scale_marker:
            return
        previous, self._scale_marker = self._scale_marker, marker
        fresh = previous is None or previous[0] != marker[0]  # a new tensor starts at version 0
        updates = marker[1] if fresh else marker[1] - previous[1]
        if updates <= 0:
            return
        if self._stepped_since_update:
            self._stepped_since_update = False
        else:
            self._skip_step()

    def _skip_step(self) -> None:
        """The scaler skipped the step: drop what it recorded, keep a ``skipped`` row."""
        self.buffer.discard_step(self.step_index)
        self._held, self._held_numel, self._watched = [], 0, []
        self._preclip = {}
        self._shards.discard()
        if self._optimizer_ref is not None:
            self._snapshot = None
        if self._recording or self._auto:
            self.buffer.set_model_host("skipped")
        self._end_step()

    def _before_norms(self, device: torch.device, idx: list[int], params: list[Tensor]) -> Tensor:
        """‖w‖ before the update: from the snapshot when the update already happened."""
        if self._optimizer_ref is None and self._snapshot is not None:
            for (dev, _), (snap_idx, _, norms) in self._snapshot.items():
                if dev == device and snap_idx == idx:
                    return norms
        norms, _ = l2_norms(params, device)
        self._param_norms_now[(device, tuple(idx))] = norms  # the snapshot's, if it follows
        return norms

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        """Copy the parameters that will be updated, for ``update_ratio``."""
        snapshot = {}
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        with_grad = self._optimizer_ref is not None
        # The parameters this step updates: those its optimizer holds (another optimizer's,
        # stepped at another time, would read 0 or another step's update).
        held = (
            {id(p) for group in optimizer.param_groups for p in group["params"]}
            if optimizer is not None
            else None
        )
        for key, idx in self._param_groups(with_grad=with_grad).items():
            if held is not None and not all(id(self._params[i]) in held for i in idx):
                idx = [i for i in idx if id(self._params[i]) in held]
                if not idx:
                    continue
            # Sharded parameters: of this rank's shard, before and after alike.
            params = local_shards([self._params[i].detach() for i in idx])
            copies = self._snapshot_copies(key, idx, params)
            norms = self._param_norms_now.get((key[0], tuple(idx)))
            if norms is None:
                norms, _ = l2_norms(copies, key[0])
            snapshot[key] = (idx, copies, norms)
        self._param_norms_now = {}
        self._snapshot = snapshot

    def _snapshot_copies(
        self, key: tuple[torch.device, torch.dtype], idx: list[int], params: list[Tensor]
    ) -> list[Tensor]:
        """Copies of ``params`` in buffers kept from step to step (their size is the run's
        meta ``snapshot_bytes``). A fresh clone at each step page-faults on every touch:
        it was ~2.7 of the ~3 ms the snapshot took on the bench MLP (26 parameters)."""
        kept = self._snapshot_buffers.get(key)
        if (
            kept is not None
            and kept[0] == tuple(idx)
            and all(
                b.shape == p.shape and b.dtype == p.dtype and b.device == p.device
                for b, p in zip(kept[1], params)
            )
        ):
            torch._foreach_copy_(kept[1], params)
            return kept[1]
        copies = [p.clone() for p in params]
        self._snapshot_buffers[key] = (tuple(idx), copies)
        self._meta["probe"]["snapshot_bytes"] = sum(
            b.numel() * b.element_size() for _, bs in self._snapshot_buffers.values() for b in bs
        )
        return copies

    @torch.no_grad()
    def _record_updates(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        if not snapshot:
            return
        for (device, _dtype), (idx, before, before_norms) in snapshot.items():
            after = local_shards([self._params[i].detach() for i in idx])
            torch._foreach_sub_(before, after)  # the copy is ours: −update, in place
            update_norms, _ = l2_norms(before, device)
            dtype = accumulation_dtype(device)
            self._shards.record_ratio(
                self.buffer,
                device,
                idx,
                "update_ratio",
                update_norms.to(dtype),
                before_norms.to(dtype),
            )
            # A parameter with no entries has no ratio (0/0): its other rows stay.
            measured = [i for i in idx if self._params[i].numel()]
            self.buffer.set_param_host(measured, "has_update")

    def _on_step_pre(self) -> None:
        """The optimizer step begins, with no closure: its gradients are there."""
        if self._closed:
            return
        self._follow_or_stop("the optimizer step (following the model)")
        self._poll_scaler()
        if (self._recording or self._auto) and "lr" in self.stats:
            self._guard(self._record_lr, "optimizer step (learning rate)")
        self._read_step()

    def _read_step(self, snapshot: bool = True) -> None:
        """The gradients the step applies (before the update): at the step pre-hook, or
        when the step's closure returned (gradprobe/follow.py). ``snapshot``: also copy
        the parameters for ``update_ratio`` (not once the update has happened)."""
        if self._recording:
            self._guard_params(self._record_params, "optimizer step (gradients)")
            if self._want_update and snapshot:
                self._guard_params(self._take_snapshot, "optimizer step (snapshot)")
        elif self._auto:
            self._guard_params(self._record_sentinel, "optimizer step (sentinel)")

    def _on_step_post(self) -> None:
        if self._closed:
            return
        if self._step_work_pending:
            # The optimizer never called the closure it was given: the gradients it saw
            # are still there, but the parameters have moved (no update_ratio).
            self._step_work_pending = False
            self._snapshot = None  # (one left by a step that raised is not this step's)
            self._read_step(snapshot=False)
        if self._recording and self._want_update and self._snapshot is not None:
            self._guard_params(self._record_updates, "optimizer step (update ratio)")
        self._stepped_since_update = True
        self._end_step()

    def _record_lr(self) -> None:
        """Each param group's learning rate: host numbers (a tensor rate, as capturable
        optimizers keep it, is logged as a tensor: no sync). ``lr`` is the largest; with
        groups at different rates each one's is ``lr/<i>`` too."""
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None:
            return
        rates = [g["lr"] for g in optimizer.param_groups if "lr" in g]
        if not rates:
            return
        log = partial(self.buffer.log, self.step_index, complete=True)
        if all(not isinstance(r, Tensor) for r in rates):
            floats = [float(r) for r in rates]
            log("lr", max(floats))
            if len(set(floats)) > 1:
                for i, rate in enumerate(floats):
                    log(f"lr/{i}", rate)
            return
        tensors = [r.detach() if isinstance(r, Tensor) else torch.tensor(float(r)) for r in rates]
        if len(tensors) == 1:
            log("lr", tensors[0])
            return
        device = tensors[0].device
        stacked = torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors])
        log("lr", stacked.max())
        for i, rate in enumerate(tensors):
            log(f"lr/{i}", rate)

    # ================================================================ steps and flushes
    def _resolve_ranks(self) -> None:
        """Combine statistics across ranks if asked, or by default when there are several."""
        self._ranks_resolved = True
        dist = torch.distributed
        sync = self._sync_ranks
        if sync is None:
            sync = (
                dist.is_available()
                and dist.is_initialized()
                and dist.get_world_size(self._process_group) > 1
            )
        if sync:
            self.buffer.ranks = Ranks(self._process_group)
            # Every rank then takes part in the unit collectives each step, ran it or not.
            self.buffer.track_units = self._want_units
            self._meta["probe"]["world_size"] = self.buffer.ranks.world

            if self._store is not None:
                self._store.update_meta(probe=self._meta["probe"])

    def _end_step(self) -> None:
        """Close the step. Never raises: a failure is one warning and a gap (this step's
        rows, or a flush's), and the step count moves on."""
        self._backward_pending = False  # a backward that raised never ran its callback
        # Passes of this step cannot be discarded by a later zero_grad (gradprobe/follow.py).
        self._grad_marker, self._grad_mark = None, None
        self._step_work_pending = False
        if not _inside_backward():
            # Nothing of a backward outlives its step: a backward that raised (an OOM retry)
            # never ran the callback that drops its pending results, and with no probed
            # module hooked no pass ever trims the set of passes that accumulated.
            self._owed_error_hooks.clear()
            self._deferred_numel = 0
            self._traversals.pending.clear()
            self._traversals.output_edges.clear()
            self._traversals.accumulating.clear()
        if not self._ranks_resolved:
            self._guard(self._resolve_ranks, "the step boundary (process group)")
        # A step the "auto" cadence does not record still closes: its sentinel's rows.
        closes = self._recording or self._auto
        if closes and self._shards:
            self._guard_params(self._end_sharded_step, "the step boundary (sharded norms)")
        if closes and not self._guard(self._close_step, "the step boundary"):
            self._deferred_units = []
            self._held, self._held_numel, self._watched = [], 0, []
            self._guard(
                partial(self.buffer.discard_step, self.step_index), "the step boundary (discard)"
            )
        self.step_index += 1
        self._recording = self._records(self.step_index)
        self._guard(self._sync_step_hooks, "the step boundary (hooks)")

    def _close_step(self) -> None:
        if self._held or self._watched:
            self._reduce_held()
        self._record_deferred_units()
        if self._scaler_ref is not None:
            self.buffer.set_model_host("scaler")
        try:
            self.buffer.end_step(self.step_index, modules=self._recording)
        finally:
            self._warn_unit_problems()
        if len(self.buffer) >= self.flush_every:
            self._flush()
            if self._pending_norms:  # the flush waited for the device: their copies landed
                self._read_norms()

    def _warn_unit_problems(self) -> None:
        problems, self.buffer.unit_problems = self.buffer.unit_problems, []
        for k, before, after in problems:
            name = self._slots[k].name
            warn_gap(
                self._failed_where,
                f"units of {name}",
                f"gradprobe: the number of units of module {name!r} changed from {before} to "
                f"{after}: its output has no fixed feature or channel dimension, so dead_frac "
                "and dead_window_frac are not recorded for it from now on",
            )
