"""Device tensors kept from step to step: small constants, index tensors, staging buffers.

A fresh tensor per step costs a host-to-device copy (an index) or page faults on every
touch (a stack of outputs: it was the dearest op of the batched reduction), so they are
made once per pattern and kept; the run's meta says how many bytes the staging buffers
hold (``probe.staging_bytes``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..reduce import _COUNT_CHUNK
from ..sites import HELD_NUMEL
from .context import Context

__all__ = ["HELD_NUMEL", "HELD_NUMEL_TOTAL", "Kept"]

# Outputs (and error signals) of at most this many entries wait for the end of the
# forward (of the backward), and are reduced there, shape by shape, a few ops for all of
# them (bench/: on a 12×256 MLP the per-module ops, not their size, were the cost). They
# are held, not copied; a hold is checked against the tensor's version counter before it
# is read. Read at each call (tests make them small). HELD_NUMEL is sites.HELD_NUMEL: one
# size for what is held and for what the site reducer counts in one pass.
HELD_NUMEL_TOTAL = 1 << 24  # 64 MiB of float32 at most: then reduce what is held


class Kept:
    """The kept tensors of one Probe (shared by the forward and error capture)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._constants: dict[tuple[torch.device, int], Tensor] = {}
        self._indices: dict[tuple[Any, ...], Tensor] = {}
        self._staging: dict[tuple[Any, ...], Tensor] = {}

    def constant(self, device: torch.device, value: int) -> Tensor:
        """A 0-d tensor of 0 or 1 to record (the buffer stacks copies: it is never written)."""
        constant = self._constants.get((device, value))
        if constant is None:
            constant = torch.full((), float(value), device=device)
            self._constants[(device, value)] = constant
        return constant

    def index(self, rows: list[int], device: torch.device) -> Tensor:
        """An index tensor, made once per pattern (no host-to-device copy per step)."""
        key = (tuple(rows), device)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= 256:  # patterns that do not repeat: keep a few
                self._indices.clear()
            index = self._indices[key] = torch.tensor(rows, device=device)
        return index

    def staging_for(self, like: Tensor, role: str) -> Tensor:
        """A buffer of ``like``'s shape, dtype and device for ``role``, kept from step to
        step (grown when more calls come)."""
        key = (role, tuple(like.shape[1:]), like.dtype, like.device)
        buffer = self._staging.get(key)
        if buffer is None or buffer.shape[0] < like.shape[0]:
            buffer = torch.empty(tuple(like.shape), dtype=like.dtype, device=like.device)
            self._keep(key, buffer)
        return buffer[: like.shape[0]]

    def count_buffer(self, per_row: int) -> Tensor:
        """The float buffer of the one-pass unit counts (gradprobe/reduce.py), of at least
        a chunk and one sample's slice, shared by every large CPU output."""
        need = max(_COUNT_CHUNK, per_row)
        key = ("count", torch.device("cpu"))
        buffer = self._staging.get(key)
        if buffer is None or buffer.numel() < need:
            buffer = torch.empty(need)
            self._keep(key, buffer)
        return buffer

    def _keep(self, key: tuple[Any, ...], buffer: Tensor) -> None:
        self._staging[key] = buffer
        held = sum(b.numel() * b.element_size() for b in self._staging.values())
        self.ctx.meta["probe"]["staging_bytes"] = held

    def close(self) -> None:
        self._staging = {}
