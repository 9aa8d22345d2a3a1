"""What the experiment-tracker writers share: metric names and rows grouped by step.

A row ``(stat, name)`` becomes the metric ``gradprobe/<stat>/<name>``, and a ``(model)``
row becomes ``gradprobe/<stat>``: slashes group the charts into sections in both W&B and
MLflow. MLflow accepts only letters, digits and ``_ - . space / :`` in a key, so every
other character becomes ``_`` (``blocks[0]`` becomes ``blocks_0_``); W&B gets the same
names so that one run reads alike in both. Activation-histogram bins (``hist_00`` ...)
are not scalars and are left to TensorBoard.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pandas as pd

PREFIX = "gradprobe"
MODEL = "(model)"
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_key(stat: str, name: str) -> str:
    """The tracker key of one statistic of one module, parameter or the model."""
    key = f"{PREFIX}/{stat}" if name == MODEL else f"{PREFIX}/{stat}/{name}"
    return _NOT_ALLOWED.sub("_", key)


def steps_of(frame: pd.DataFrame) -> Iterator[tuple[int, dict[str, float]]]:
    """The scalar rows of a flush as ``(step, {key: value})``, steps in order.

    The rows are already host NumPy values at a flush: no device sync here.
    """
    scalars = frame[~frame["stat"].str.match(r"hist_\d+$")]
    if scalars.empty:
        return
    keys = [metric_key(str(s), str(n)) for s, n in zip(scalars["stat"], scalars["name"])]
    table = pd.DataFrame(
        {"step": scalars["step"].to_numpy(), "key": keys, "value": scalars["value"].to_numpy()}
    )
    for step, rows in table.groupby("step", sort=True):
        yield int(step), {k: float(v) for k, v in zip(rows["key"], rows["value"])}


def rank() -> int:
    """This process's rank under torch.distributed, 0 without it."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
