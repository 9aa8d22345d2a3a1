"""The tensor of a module's output or input: the first floating-point one, in pytree order.

See docs/recording.md ("Inputs and outputs").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor
from torch.utils import _pytree

__all__ = ["first_float_tensor", "first_input"]

# A mapping output (a dict, a transformers ModelOutput) is read at these keys first: the
# tensor the module computes. A "loss" entry is never "the" output: it is a function of it.
_PREFERRED_KEYS = ("logits", "last_hidden_state")
_SKIPPED_KEYS = frozenset({"loss"})
_MAX_NESTING = 32  # deeper than any real output; guards against self-referencing objects


def first_float_tensor(value: Any, depth: int = 0) -> Tensor | None:
    """ "The" tensor of a module's output (or input): the first floating-point tensor in
    pytree order, see docs/recording.md ("Inputs and outputs").

    Tuples and lists in order; mappings at ``logits``, then ``last_hidden_state``, then
    their other values in insertion order, never at ``loss``; dataclasses in field order;
    any other type registered with ``torch.utils._pytree`` in its flattening order.
    """
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    if value is None or depth > _MAX_NESTING or isinstance(value, (str, bytes, int, float)):
        return None
    if isinstance(value, (tuple, list)):
        children: Iterable[Any] = value
    elif isinstance(value, Mapping):
        first = [value[key] for key in _PREFERRED_KEYS if key in value]
        rest = [
            v for key, v in value.items() if key not in _PREFERRED_KEYS and key not in _SKIPPED_KEYS
        ]
        children = first + rest
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
        children = [c for c in children if c is not None]
    else:
        node = _pytree.SUPPORTED_NODES.get(type(value))
        if node is None:
            return None
        children, _context = node.flatten_fn(value)
    for item in children:
        found = first_float_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """:func:`first_float_tensor` of a call's arguments, positional before keywords; the
    common call (a float tensor first) without the walk."""
    if args:
        first = args[0]
        if isinstance(first, Tensor) and first.is_floating_point():
            return first
    return first_float_tensor((args, kwargs))
