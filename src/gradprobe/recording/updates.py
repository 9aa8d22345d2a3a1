"""The update snapshot: a copy of the parameters before the optimizer step, for ``update_ratio``.

:class:`UpdateSnapshot` copies the parameters the step will update (those its optimizer
holds), with their norms (‖w‖ before the update), and after the step measures ‖Δw‖ / ‖w‖
from the copies, in place. The copies are buffers kept from step to step while they are
small (up to ``KEEP_SNAPSHOT_BYTES``); larger ones are let go after each update, so that
they never add to the peak memory of the forward and backward passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reduce import accumulation_dtype, l2_norms
from ..shards import local_shards
from .context import Context
from .params import param_groups

__all__ = ["KEEP_SNAPSHOT_BYTES", "UpdateSnapshot"]

_Key = tuple[torch.device, torch.dtype]
# The parameters' copies are kept from step to step up to this size (see _copies).
KEEP_SNAPSHOT_BYTES = 32 << 20


class UpdateSnapshot:
    """The parameters' copies before the update, and the update ratio measured from them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._snapshot: dict[_Key, tuple[list[int], list[Tensor], Tensor]] | None = None
        # The copies, kept from step to step (see _copies).
        self._buffers: dict[_Key, tuple[tuple[int, ...], list[Tensor]]] = {}
        # ‖w‖ just taken for param_norm: the snapshot reuses them.
        self._norms_now: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
        ctx.on("step_discarded", self._on_step_discarded)
        ctx.on("model_rebound", self._on_model_rebound)

    @property
    def taken(self) -> bool:
        """Whether a snapshot waits for its update."""
        return self._snapshot is not None

    def drop(self) -> None:
        self._snapshot = None

    def close(self) -> None:
        self._snapshot = None
        self._buffers = {}

    def _on_step_discarded(self, step: int, skipped: bool) -> None:
        if skipped and self.ctx.optimizer_ref is not None:
            self._snapshot = None

    def _on_model_rebound(self, new_params: list[Tensor]) -> None:
        self._snapshot = None

    def norms_before(self, device: torch.device, idx: list[int], params: list[Tensor]) -> Tensor:
        """‖w‖ before the update: from the snapshot when the update already happened."""
        if self.ctx.optimizer_ref is None and self._snapshot is not None:
            for (dev, _), (snap_idx, _, norms) in self._snapshot.items():
                if dev == device and snap_idx == idx:
                    return norms
        norms, _ = l2_norms(params, device)
        self._norms_now[(device, tuple(idx))] = norms  # the snapshot's, if it follows
        return norms

    @torch.no_grad()
    def take(self) -> None:
        """Copy the parameters that will be updated, for ``update_ratio``."""
        ctx = self.ctx
        snapshot = {}
        optimizer = ctx.optimizer()
        with_grad = ctx.optimizer_ref is not None
        params = ctx.params
        # The parameters this step updates: those its optimizer holds (another optimizer's,
        # stepped at another time, would read 0 or another step's update).
        held = (
            {id(p) for group in optimizer.param_groups for p in group["params"]}
            if optimizer is not None
            else None
        )
        for key, idx in param_groups(ctx, with_grad=with_grad).items():
            if held is not None and not all(id(params[i]) in held for i in idx):
                idx = [i for i in idx if id(params[i]) in held]
                if not idx:
                    continue
            # Sharded parameters: of this rank's shard, before and after alike. No detach:
            # under no_grad the copies and norms take no graph (26 ops a step fewer on
            # the bench MLP, and as many in record()).
            tensors = local_shards([params[i] for i in idx])
            copies = self._copies(key, idx, tensors)
            norms = self._norms_now.get((key[0], tuple(idx)))
            if norms is None:
                norms, _ = l2_norms(copies, key[0])
            snapshot[key] = (idx, copies, norms)
        self._norms_now = {}
        self._snapshot = snapshot

    def _copies(self, key: _Key, idx: list[int], params: list[Tensor]) -> list[Tensor]:
        """Copies of ``params`` (their size is the run's meta ``snapshot_bytes``), in
        buffers kept from step to step while small: a fresh clone at each step page-faults
        on every touch, ~2.7 of the ~3 ms the snapshot took on the bench MLP (26
        parameters)."""
        kept = self._buffers.get(key)
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
        size = sum(b.numel() * b.element_size() for b in copies)
        # Kept only while small: a kept copy lives through the next forward and backward,
        # where the run's peak memory is, and adds its size to that peak (the GPT-2 of
        # bench/every_step.py: 114 MiB, +6% of its peak RSS). A larger one is let go
        # after the update (record) and made anew at the next snapshot: its page faults
        # cost ~0.15 ms per MiB, ~1% of the step of a model that size.
        if size <= KEEP_SNAPSHOT_BYTES:
            self._buffers[key] = (tuple(idx), copies)
        else:
            self._buffers.pop(key, None)
        self.ctx.meta["probe"]["snapshot_bytes"] = size + sum(
            b.numel() * b.element_size()
            for k, (_, bs) in self._buffers.items()
            if k != key
            for b in bs
        )
        return copies

    @torch.no_grad()
    def record(self) -> None:
        """The update ratio of the step that just applied its update."""
        snapshot, self._snapshot = self._snapshot, None
        if not snapshot:
            return
        ctx = self.ctx
        params, buffer = ctx.params, ctx.buffer
        for (device, _dtype), (idx, before, before_norms) in snapshot.items():
            after = local_shards([params[i] for i in idx])  # under no_grad: see take()
            torch._foreach_sub_(before, after)  # the copy is ours: −update, in place
            update_norms, _ = l2_norms(before, device)
            dtype = accumulation_dtype(device)
            ctx.shards.record_ratio(
                buffer,
                device,
                idx,
                "update_ratio",
                update_norms.to(dtype),
                before_norms.to(dtype),
            )
            # A parameter with no entries has no ratio (0/0): its other rows stay.
            measured = [i for i in idx if params[i].numel()]
            buffer.set_param_host(measured, "has_update")
