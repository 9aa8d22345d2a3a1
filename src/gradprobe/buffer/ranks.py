"""The data-parallel process group over which the buffer's statistics are combined.

At a flush the drained partials of every rank are combined as each partial declares
(``sum`` or ``max``; ``same`` ones are equal on every rank already): two collectives per
flush, whatever the model, and a third for logged values (``Probe.log``, the learning
rate), whose names and steps need not be the same on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..stats import PARTIALS
from ..stats.partials import Combine

if TYPE_CHECKING:
    from .drain import Drained

__all__ = ["Ranks"]


class Ranks:
    """The data-parallel process group over which statistics are combined.

    Built only where ``torch.distributed`` is initialised. Collectives on host arrays
    run on the CPU, or through the current GPU where the backend is NCCL (which
    reduces CUDA tensors only); they happen at a flush, itself a host sync already.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        nccl = dist.get_backend(group) == "nccl"
        self.host_device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    def all_reduce_(self, tensor: Tensor, combine: Combine) -> None:
        """Combine ``tensor`` in place across the ranks (every rank must call it)."""
        import torch.distributed as dist

        op = dist.ReduceOp.SUM if combine == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=op, group=self.group)

    def combine(self, drained: Drained) -> None:
        """Combine every rank's partials as :data:`~gradprobe.stats.PARTIALS` declares."""
        for combine in ("sum", "max"):
            entries = [
                (table, name)
                for table in (drained.modules, drained.params, drained.model)
                for name in table
                if PARTIALS[name].combine == combine
            ]
            arrays = [table[name] for table, name in entries]
            if combine == "sum" and drained.histograms is not None:
                arrays.append(drained.histograms)  # histogram counts add up like counts
            if not arrays:
                continue
            flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
            flat = flat.to(self.host_device)
            self.all_reduce_(flat, combine)  # deliberate collective, at the flush
            reduced = flat.cpu().numpy()  # deliberate host copy, at the flush (NCCL: from the GPU)
            offset = 0
            for a in arrays:
                a.reshape(-1)[:] = reduced[offset : offset + a.size]
                offset += a.size
        for table in (drained.modules, drained.params, drained.model):
            for name, values in table.items():
                degree = PARTIALS[name].loss_degree
                if degree:
                    # DDP applies the gradient of the mean of the ranks' losses.
                    values *= float(self.world) ** -degree
        drained.logged = self.combine_logged(drained.logged)
        # Per-head tables are not combined across ranks (their widths differ by module and
        # a module may run on some ranks only): left out, a gap, rather than one rank's.
        drained.heads = {}
        drained.series = self.combine_series(drained.series)

    def combine_series(self, series: Any) -> Any:
        """Add up every rank's per-time-step series (``time_sq``: summed, aligned at the
        first step, then scaled as its partial's loss degree says). A rank that ran none
        has none: gathered as objects (one collective, at the flush)."""
        import torch.distributed as dist

        from ..stats.series import add_at

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, series, group=self.group)
        scale = float(self.world) ** -PARTIALS["time_sq"].loss_degree
        combined: dict[int, dict[int, np.ndarray]] = {}
        for part in gathered:
            for row, by_slot in (part or {}).items():
                for slot, values in by_slot.items():
                    add_at(combined.setdefault(row, {}), slot, 0, values)
        for by_slot in combined.values():
            for values in by_slot.values():
                values *= scale
        return combined

    def combine_logged(
        self, logged: dict[tuple[int, str], tuple[float, float]]
    ) -> dict[tuple[int, str], tuple[float, float]]:
        """Add up every rank's ``log_sum`` and ``log_count`` per (step, name), as declared
        (``sum``): ranks may have logged different names or steps (only rank 0 logs, or a
        value arrived after a flush on one rank), so they are gathered as objects."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        # Deliberate collective of host numbers, at the flush (every rank calls it).
        dist.all_gather_object(gathered, logged, group=self.group)
        combined: dict[tuple[int, str], tuple[float, float]] = {}
        for part in gathered:
            for key, (total, count) in (part or {}).items():
                before = combined.get(key, (0.0, 0.0))
                combined[key] = (before[0] + total, before[1] + count)
        return combined
