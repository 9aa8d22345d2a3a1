"""pyplot on first use, with a backend that suits where it runs.

One small leaf (it imports nothing of gradprobe) so that every module that draws
(plots, report, explain, theory's summary, the lab's figures) reaches matplotlib the
same way without importing the plots module, and none of them at import time.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot``, imported now; Agg unless a backend was already chosen."""
    import matplotlib

    # Agg only where nothing chose a backend: a Jupyter kernel sets MPLBACKEND to its
    # inline backend, and forcing Agg there would make every figure print as text.
    chosen = getattr(matplotlib.rcParams, "_get_backend_or_none", lambda: None)()
    if "matplotlib.pyplot" not in sys.modules and chosen is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
