"""What the hooks capture: kept at this path; the work is in :mod:`gradprobe.recording`.

The module hooks' work is the forward capture (:mod:`gradprobe.recording.forward`: gates,
output statistics, held outputs reduced in batches), the units' layouts
(:mod:`gradprobe.recording.units`) and the error-signal capture
(:mod:`gradprobe.recording.errors`); what is measured of a call is in the site reducers
(:mod:`gradprobe.sites`). This module keeps the names others import from it.
"""

from __future__ import annotations

from .recording.bindings import Slot as _Slot
from .recording.context import inside_backward as _inside_backward
from .recording.errors import ErrorCapture
from .recording.forward import ForwardCapture
from .recording.tensors import first_float_tensor as _first_float_tensor
from .recording.tensors import first_input as _first_input

__all__ = ["ErrorCapture", "ForwardCapture"]

# The old private names, for code that imported them from here.
_Slot = _Slot
_inside_backward = _inside_backward
_first_float_tensor = _first_float_tensor
_first_input = _first_input
