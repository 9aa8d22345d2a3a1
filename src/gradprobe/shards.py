"""Sharded parameters (FSDP2's ``DTensor``\\ s): norms of the full tensors, from shards.

Under ``fully_shard`` every parameter, and its ``.grad``, is a ``DTensor``: each rank
holds one shard (``to_local()``, without the padding FSDP adds to uneven shards), and
the norm of a shard is not the norm of the parameter. Squared norms of disjoint shards
add up, so each rank measures its local shards in the same batched ``_foreach_norm``
pass as any other parameter; the squares of every sharded parameter and every quantity
of the step (gradient, parameter, pre-clip gradient, update, NaN/Inf counts) wait in
one vector, and at the step boundary one all-reduce (SUM) over the mesh dimension the
parameters are sharded on makes them the full tensors'. One collective per recorded
step, whatever the model; its shape depends only on the parameters and the statistics
asked for, so it is the same on every rank whatever each rank measured.

Mesh dimensions on which a parameter is ``Replicate`` (the replicas of hybrid sharding,
a bias under tensor parallelism) hold equal values and are not summed; a parameter
sharded on several mesh dimensions is summed over each (one collective per dimension).
A ``Partial`` placement (a sum not yet reduced) has no norm from its shards: such a
parameter is reported as a failure of the step hook (one warning and a gap).
"""

from __future__ import annotations

import sys
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .stats import PARTIALS

if TYPE_CHECKING:
    from .buffer import StepBuffer

__all__ = ["ShardedNorms", "dtensor_type", "local_shards", "sharded_parameters"]

# What the step measures of a parameter, and how its shards' values combine: the squares
# of norms add up over shards (the root comes after the sum), counts add up as they are.
# As the catalogue declares (stats.Partial.shard); ``update`` and ``before`` are the two
# norms of ``update_ratio``, a ratio that does not combine itself.
_SQUARED = (*(n for n, p in PARTIALS.items() if p.shard == "sumsq"), "update", "before")
_COUNTED = tuple(n for n, p in PARTIALS.items() if p.shard == "count")
QUANTITIES = _SQUARED + _COUNTED


def dtensor_type() -> type | None:
    """The ``DTensor`` class if anything in this process imported it, else ``None``.

    No ``DTensor`` can exist before ``torch.distributed.tensor`` is imported, and
    importing it here would slow down every import of gradprobe.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local_shards(tensors: list[Tensor]) -> list[Tensor]:
    """Each ``DTensor`` as this rank's shard (FSDP's padding excluded); others as they are."""
    dtensor = dtensor_type()
    if dtensor is None:
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def sharded_parameters(model: nn.Module) -> dict[tuple[int, str], nn.Parameter]:
    """FSDP2's sharded parameter of each (module id, attribute name) that ``fully_shard``
    manages.

    Between a forward with ``reshard_after_forward=False`` and its backward, FSDP2
    registers the unsharded (full) parameters on the modules; the sharded ``DTensor``
    ones, which the optimizer holds and which carry ``.grad``, are these. Read from
    FSDP2's state (private): an FSDP2 without it gives ``{}``, and the registered
    parameters are used as they are.
    """
    found: dict[tuple[int, str], nn.Parameter] = {}
    for fsdp_param in _fsdp_params(model):
        try:
            info = fsdp_param._module_info
            found[(id(info.module), info.param_name)] = fsdp_param.sharded_param
        except Exception:  # another FSDP2 layout: keep the registered parameters
            continue
    return found


def _fsdp_params(model: nn.Module) -> list[Any]:
    """FSDP2's record of each parameter it manages in ``model`` (private state; ``[]``
    without FSDP2, or with an FSDP2 laid out otherwise)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []  # nothing was sharded in this process
    found = []
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            group = get_state()._fsdp_param_group
            found += list(group.fsdp_params) if group is not None else []
        except Exception:
            continue
    return found


@dataclass
class _Mesh:
    """The sharded parameters that share a device mesh and sharded mesh dimensions."""

    groups: tuple[Any, ...]  # process groups, one per mesh dimension the shards split
    device: torch.device  # where the collective runs (the mesh's device type)
    params: list[int] = field(default_factory=list)  # Probe parameter indices, in order


class ShardedNorms:
    """The sharded parameters of a Probe and their local squared norms of the step.

    ``record`` takes a batched result for some parameters: the unsharded ones go to the
    buffer at once, the sharded ones wait; ``reduce`` (at the step boundary) sums the
    waiting squares over the shards, in one collective per mesh, and records them.
    """

    def __init__(self, params: list[Tensor], model: nn.Module | None = None) -> None:
        self._meshes: list[_Mesh] = []
        self._where: dict[int, tuple[int, int]] = {}  # parameter -> (mesh, row)
        self.unsupported: dict[int, str] = {}  # parameter -> its placements (Partial)
        # FSDP2's records of the probed parameters (weakly: they hold the user's modules),
        # for the full parameters it creates at its first all-gather.
        ids = {id(p) for p in params}
        self._fsdp_params = [
            weakref.ref(fp)
            for fp in (_fsdp_params(model) if model is not None else [])
            if id(getattr(fp, "sharded_param", None)) in ids
        ]
        self._hooked: set[int] = set()
        self._indices: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
        # The step's waiting squares: mesh -> quantity -> [(rows, values)], and the
        # parameters measured, which the host knows: quantity -> [parameter indices].
        self._held: dict[int, dict[str, list[tuple[list[int], Tensor]]]] = {}
        self._measured: dict[int, dict[str, list[int]]] = {}
        dtensor = dtensor_type()
        if dtensor is None:
            return
        by_key: dict[tuple[int, tuple[int, ...]], int] = {}
        for i, p in enumerate(params):
            if not isinstance(p, dtensor):
                continue
            placements = tuple(p.placements)
            if any(pl.is_partial() for pl in placements):
                self.unsupported[i] = str(placements)
                continue
            dims = tuple(d for d, pl in enumerate(placements) if pl.is_shard())
            if not dims:
                continue  # replicated on every mesh dimension: the local tensor is whole
            mesh = p.device_mesh
            key = (id(mesh), dims)
            if key not in by_key:
                by_key[key] = len(self._meshes)
                self._meshes.append(
                    _Mesh(tuple(mesh.get_group(d) for d in dims), _mesh_device(mesh, p))
                )
            m = by_key[key]
            self._where[i] = (m, len(self._meshes[m].params))
            self._meshes[m].params.append(i)

    def __bool__(self) -> bool:
        """Whether any parameter is sharded (the step then takes one collective)."""
        return bool(self._meshes) or bool(self.unsupported)

    def is_sharded(self, i: int) -> bool:
        return i in self._where

    @property
    def awaiting_unsharded(self) -> bool:
        """Whether some of FSDP2's full parameters may still be unseen (see below)."""
        return len(self._hooked) < len(self._fsdp_params)

    def new_unsharded(self) -> Iterator[nn.Parameter]:
        """FSDP2's full (unsharded) parameters not yet returned, once each.

        Backward accumulates into these, and FSDP2 then reduce-scatters into the sharded
        ``.grad``; without gradient sync (``set_requires_gradient_sync(False)``) only into
        these. FSDP2 makes each at its first all-gather and keeps the same object after.
        """
        for i, ref in enumerate(self._fsdp_params):
            fsdp_param = ref()
            if i in self._hooked or fsdp_param is None:
                continue
            full = getattr(fsdp_param, "_unsharded_param", None)
            if isinstance(full, nn.Parameter):
                self._hooked.add(i)
                if full.requires_grad:
                    yield full

    def record(
        self, buffer: StepBuffer, device: torch.device, idx: list[int], name: str, values: Tensor
    ) -> None:
        """Per-parameter ``values`` for ``idx`` (norms, or NaN/Inf counts), measured on the
        local shards: unsharded parameters' go to ``buffer``, sharded ones' wait."""
        if not self:
            buffer.record_params(device, idx, name, values)  # nothing sharded: no cost
            return
        self._check(idx)
        plain = [j for j, i in enumerate(idx) if i not in self._where]
        if plain:
            buffer.record_params(device, [idx[j] for j in plain], name, self._take(values, plain))
        squared = name in _SQUARED
        for m, (rows, positions) in self._split(idx).items():
            part = self._take(values, positions).to(torch.float64)
            self._hold(m, name, rows, part.square() if squared else part)
            self._measured.setdefault(m, {}).setdefault(name, []).extend(idx[j] for j in positions)

    def record_ratio(
        self,
        buffer: StepBuffer,
        device: torch.device,
        idx: list[int],
        name: str,
        numerator: Tensor,
        denominator: Tensor,
    ) -> None:
        """A ratio of two norms (``update_ratio``): of the full tensors for sharded ones."""
        if not self:
            buffer.record_params(device, idx, name, numerator / denominator)
            return
        self._check(idx)
        plain = [j for j, i in enumerate(idx) if i not in self._where]
        if plain:
            buffer.record_params(
                device,
                [idx[j] for j in plain],
                name,
                self._take(numerator, plain) / self._take(denominator, plain),
            )
        for m, (rows, positions) in self._split(idx).items():
            self._hold(
                m, "update", rows, self._take(numerator, positions).to(torch.float64).square()
            )
            self._hold(
                m, "before", rows, self._take(denominator, positions).to(torch.float64).square()
            )
            self._measured.setdefault(m, {}).setdefault(name, []).extend(idx[j] for j in positions)

    def discard(self) -> None:
        """Forget the step's waiting values (a step the ``GradScaler`` skipped)."""
        self._held = {}
        self._measured = {}

    def drop(self, buffer: StepBuffer) -> None:
        """Leave the step's sharded parameters out, without a collective (ranks are not
        combined): a gap for each one measured, since a shard's norm is not its norm."""
        measured = self._measured
        self.discard()
        idx = sorted({i for names in measured.values() for ps in names.values() for i in ps})
        if idx:
            buffer.set_param_host(idx, "param_gap")

    def reduce(self, buffer: StepBuffer) -> None:
        """Sum the step's squares over the shards and record the full tensors' values.

        Every rank must call it at every recorded step: the collective's shape is fixed
        (every sharded parameter × every quantity, zeros where nothing was measured).
        """
        import torch.distributed as dist

        held, self._held = self._held, {}
        measured, self._measured = self._measured, {}
        for m, mesh in enumerate(self._meshes):
            n = len(mesh.params)
            flat = torch.zeros(len(QUANTITIES) * n, dtype=torch.float64, device=mesh.device)
            for quantity, parts in held.get(m, {}).items():
                offset = QUANTITIES.index(quantity) * n
                for rows, values in parts:
                    index = self._index(mesh.device, [offset + r for r in rows])
                    flat.index_copy_(0, index, values.to(mesh.device))
            for group in mesh.groups:
                # Deliberate collective, once per recorded step: the squares of every
                # sharded parameter's shards add up to the full tensor's.
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            totals = dict(zip(QUANTITIES, flat.view(len(QUANTITIES), n)))
            for name, params in measured.get(m, {}).items():
                rows = self._index(mesh.device, [self._where[i][1] for i in params])
                if name == "update_ratio":
                    values = totals["update"][rows].sqrt() / totals["before"][rows].sqrt()
                elif name in _SQUARED:
                    values = totals[name][rows].sqrt()
                else:
                    values = totals[name][rows]
                buffer.record_params(mesh.device, params, name, values)

    # ------------------------------------------------------------------ helpers
    def _check(self, idx: list[int]) -> None:
        bad = [i for i in idx if i in self.unsupported]
        if bad:
            raise ValueError(
                f"parameters with a Partial placement ({self.unsupported[bad[0]]}) have no "
                "norm from their shards"
            )

    def _split(self, idx: list[int]) -> dict[int, tuple[list[int], list[int]]]:
        """Sharded entries of ``idx`` by mesh: (rows in the mesh's vector, positions)."""
        parts: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for j, i in enumerate(idx):
            where = self._where.get(i)
            if where is not None:
                parts[where[0]][0].append(where[1])
                parts[where[0]][1].append(j)
        return parts

    def _take(self, values: Tensor, positions: list[int]) -> Tensor:
        """``values[positions]``: the whole tensor when that is all of it (no op)."""
        if len(positions) == values.numel():
            return values
        return values[self._index(values.device, positions)]

    def _index(self, device: torch.device, values: list[int]) -> Tensor:
        """An index tensor on ``device``, made once per layout: a host-to-device copy
        each step could wait for the device."""
        key = (device, tuple(values))
        index = self._indices.get(key)
        if index is None:
            index = torch.tensor(values, dtype=torch.long, device=device)
            self._indices[key] = index
        return index

    def _hold(self, m: int, quantity: str, rows: list[int], values: Tensor) -> None:
        self._held.setdefault(m, {}).setdefault(quantity, []).append((rows, values))


def _mesh_device(mesh: Any, param: Tensor) -> torch.device:
    """Where the mesh's collectives take tensors: the parameter's device if it is of the
    mesh's type (NCCL: the GPU), else the mesh's current device (CPU-offloaded shards)."""
    if param.device.type == mesh.device_type:
        return param.device
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)
