"""What the framework callbacks share: the Probe's keyword options, checked up front."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import GradprobeError
from ..probe import Probe

# Chosen by the callbacks themselves from the framework's objects.
_OWN = {"model", "optimizer", "scaler", "store", "every"}


def check_probe_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown Probe options at construction, not at the first training step."""
    known = set(inspect.signature(Probe.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - known)
    own = sorted(set(options) & _OWN)
    if unknown:
        raise GradprobeError(
            f"{where}: unknown Probe options {unknown}", f"choose from {sorted(known - _OWN)}"
        )
    if own:
        raise GradprobeError(
            f"{where}: {own} are taken from the trainer",
            "pass store and every as arguments, not options",
        )
    return dict(options)
