"""docs/concepts.md §6 worked out: [batch, channels, height, width] and a dead channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GradprobeError


@dataclass(frozen=True)
class ChannelsExample:
    """A conv layer's ``[batch, channels, height, width]`` output and its per-channel view.

    ``channel_stats`` has one dict per output channel (after ReLU): ``filter``,
    ``mean``, ``std``, ``zero_frac`` and ``dead`` (0 at every position of every
    sample). ``dead_channels`` lists the dead ones; channel ``built_dead`` was built
    to die (a large negative bias before the ReLU).
    """

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    labels: list[int]
    channel_stats: list[dict[str, Any]]
    dead_channels: list[int]
    built_dead: int
    per_channel_input: dict[str, float] = field(default_factory=dict)


def _digits(batch: int) -> tuple[torch.Tensor, list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:batch], dtype=torch.float32) / 16.0
    return images.unsqueeze(1), [int(t) for t in digits.target[:batch]]


def channels(batch: int = 8, dead_bias: float = -100.0) -> ChannelsExample:
    """Concepts §6 computed: 8×8 digit images through Conv2d(1, 4, 3, padding=1) → ReLU.

    The four filters are set by hand so their meaning is visible: a vertical-edge and a
    horizontal-edge (Sobel) filter, a 3×3 average, and the same average with bias
    ``dead_bias``, which no [0, 1] pixel can overcome: that channel is dead.
    """
    if batch < 1:
        raise GradprobeError(f"batch must be at least 1, got {batch}")
    x, labels = _digits(batch)
    conv = torch.nn.Conv2d(1, 4, kernel_size=3, padding=1)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    average = torch.full((3, 3), 1.0 / 9.0)
    names = ["vertical edge", "horizontal edge", "average", f"average, bias {dead_bias:g}"]
    with torch.no_grad():
        conv.weight.copy_(torch.stack([sobel, sobel.T, average, average]).unsqueeze(1))
        conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, dead_bias]))
        out = torch.relu(conv(x))
    stats = []
    for c in range(out.shape[1]):
        ch = out[:, c]
        stats.append(
            {
                "channel": c,
                "filter": names[c],
                "mean": float(ch.mean()),
                "std": float(ch.std(correction=0)),
                "zero_frac": float((ch == 0).double().mean()),
                "dead": bool((ch == 0).all()),
            }
        )
    return ChannelsExample(
        input_shape=tuple(x.shape),
        weight_shape=tuple(conv.weight.shape),
        output_shape=tuple(out.shape),
        labels=labels,
        channel_stats=stats,
        dead_channels=[s["channel"] for s in stats if s["dead"]],
        built_dead=3,
        per_channel_input={"mean": float(x.mean()), "std": float(x.std(correction=0))},
    )


def render_channels(ch: ChannelsExample) -> list[Any]:
    """Rich renderables for :func:`channels`."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    t = Table(title=escape("tensor shapes [batch, channels, height, width] (docs/concepts.md §6)"))
    t.add_column("tensor")
    t.add_column("shape")
    t.add_row(f"input: digits {ch.labels}, 1 grey channel", str(list(ch.input_shape)))
    t.add_row("Conv2d(1, 4, 3, padding=1) weight [out, in, kh, kw]", str(list(ch.weight_shape)))
    t.add_row("output after ReLU: one channel per filter", str(list(ch.output_shape)))
    s_tab = Table(title="per-channel statistics over batch, height and width")
    for col in ("channel", "filter", "mean", "std", "zero frac", "dead"):
        s_tab.add_column(col)
    for st in ch.channel_stats:
        s_tab.add_row(
            str(st["channel"]),
            st["filter"],
            f"{st['mean']:.4f}",
            f"{st['std']:.4f}",
            f"{st['zero_frac']:.3f}",
            "DEAD" if st["dead"] else "",
        )
    note = Text(
        f"dead channels: {ch.dead_channels} — zero at every position of every sample,"
        " so no gradient reaches their filter."
    )
    return [t, s_tab, note]
