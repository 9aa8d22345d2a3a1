"""What memory an operation makes, without timing it: a TorchDispatchMode that records
the largest new storage any op under it allocates (views and ``out=`` results share an
input's storage: not new). For tests of a reduction's structure, e.g. that it makes no
copy of a large tensor's size, on any CPU and without ``torch.cuda``."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestNew(TorchDispatchMode):
    """``largest``: the most entries of any new storage made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                entries = t.untyped_storage().nbytes() // t.element_size()
                self.largest = max(self.largest, entries)
        return out
