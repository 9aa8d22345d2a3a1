"""Measures: what the hooks take at each site of a step, and how it folds into partials."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Measure:
    """Something the hooks measure for a statistic, at one site of the step.

    ``site`` is where: a module's ``output`` (forward), its ``error`` signal dL/d(output)
    and ``input`` share dL/d(input) (backward), an activation's ``gate`` f'(z), the carry
    gates of a gated recurrent module (``carry``), the attention calls made inside a module
    (``attention``: gradprobe.attention's watch, summarised at the step's close), a
    sequence block's output (``block``), the model's final projection (``head``), a
    recurrent module's error signal per time step (``time``: its input's error for a fused
    module, each call's output error for a cell; :mod:`gradprobe.recording.sequences`),
    each ``parameter`` at the step, its
    ``update`` across the optimizer step, or the whole ``step`` (backward's gradient
    norms before clipping). ``kind`` is the :data:`gradprobe.buffer.FIELDS` entry its
    site reducer (:mod:`gradprobe.sites`) records per call, its fields named by
    :data:`FOLDS` (``None``: measured at the step, not per call), and
    ``partials`` what it is folded into (:data:`FOLDS` says how).
    """

    name: str
    site: Literal[
        "output",
        "error",
        "input",
        "gate",
        "carry",
        "attention",
        "parameter",
        "update",
        "step",
        "block",
        "head",
        "time",
    ]
    doc: str
    kind: str | None = None
    partials: tuple[str, ...] = ()


MEASURES: dict[str, Measure] = {
    m.name: m
    for m in [
        Measure(
            "output",
            "output",
            "sum, squared norm, non-zero count and NaN/Inf of the output",
            "out",
            ("out_sum", "out_sumsq", "out_zeros", "out_nonfinite"),
        ),
        Measure(
            "nonfinite",
            "output",
            "NaN/Inf of the output (alone where its moments are not wanted)",
            "nonfinite",
            ("out_nonfinite",),
        ),
        Measure(
            "absmax",
            "output",
            "the largest finite |y| of the output",
            "absmax",
            ("out_absmax",),
        ),
        Measure(
            "units",
            "output",
            "units all zero in the step",
            None,
            ("dead_units", "dead_window_units"),
        ),
        Measure(
            "gate",
            "gate",
            "f'(z) summed, and its saturated entries",
            "gate",
            ("gate_sum", "sat_count"),
        ),
        Measure(
            "error",
            "error",
            "‖dL/d(output)‖² and its NaN/Inf",
            "err",
            ("err_sumsq", "err_nonfinite"),
        ),
        Measure(
            "input_error",
            "input",
            "‖dL/d(input)‖², the module's own share",
            "in_err",
            ("in_err_sumsq",),
        ),
        Measure(
            "carry",
            "carry",
            "carry gates f (or z) summed, and log f",
            "carry",
            ("carry_gate_sum", "carry_log_sum"),
        ),
        Measure(
            "attention",
            "attention",
            "attention logits and entropies of the module's SDPA calls, summarised per step",
            "attn",
            ("attn_logit_max", "attn_entropy_sum", "attn_weight", "attn_neg_entropy_min"),
        ),
        Measure(
            "tokens",
            "block",
            "cosines between distinct sampled token vectors of a block's output, and their count",
            "cos",
            ("cos_sum", "cos_count"),
        ),
        Measure(
            "logits",
            "head",
            "the largest logit, and logsumexp over classes summed over positions, with its count",
            "logit",
            ("logit_max", "logit_z_sum", "logit_z_count"),
        ),
        Measure(
            "time",
            "time",
            "‖dL/dy[:, t]‖² per time step (a series, placed at the call's time offset)",
            "time",
            ("time_sq",),
        ),
        Measure(
            "params",
            "parameter",
            "‖grad‖, ‖w‖ and NaN/Inf of grad at the step",
            None,
            ("grad_norm", "param_norm", "grad_nonfinite"),
        ),
        Measure("update", "update", "‖w_after − w_before‖ / ‖w_before‖", None, ("update_ratio",)),
        Measure(
            "preclip",
            "step",
            "‖grad‖ as backward left it, before clipping",
            None,
            ("preclip_norm",),
        ),
    ]
}

# How a site's per-call fields fold into partials: (partial, field, how), where ``how`` is
# ``sum`` (add the field), ``sumsq`` (add its square: norms, whose squares add up),
# ``series`` (a vector per call, added position by position from the call's offset into
# the module's series of the step: gradprobe/buffer/drain.py; the column gets its total),
# ``uncounted`` (add the entries the field does not count: zeros from non-zeros) or
# ``max`` (keep the largest). Repeated calls of a module in one step fold this way; the
# partial's own ``combine`` then says how micro-batches and ranks combine.
FOLDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "out": (
        ("out_sum", "sum", "sum"),
        ("out_sumsq", "norm", "sumsq"),
        ("out_zeros", "nonzero", "uncounted"),
        ("out_nonfinite", "nonfinite", "sum"),
    ),
    "nonfinite": (("out_nonfinite", "nonfinite", "sum"),),
    "absmax": (("out_absmax", "absmax", "max"),),
    "gate": (("gate_sum", "sum", "sum"), ("sat_count", "saturated", "sum")),
    "err": (("err_sumsq", "norm", "sumsq"), ("err_nonfinite", "nonfinite", "sum")),
    "in_err": (("in_err_sumsq", "norm", "sumsq"),),
    "carry": (("carry_gate_sum", "sum", "sum"), ("carry_log_sum", "log_sum", "sum")),
    "attn": (
        ("attn_logit_max", "logit_max", "max"),
        ("attn_entropy_sum", "entropy_sum", "sum"),
        ("attn_weight", "weight", "sum"),
        ("attn_neg_entropy_min", "neg_entropy_min", "max"),
    ),
    "cos": (("cos_sum", "sum", "sum"), ("cos_count", "count", "sum")),
    "logit": (
        ("logit_max", "max", "max"),
        ("logit_z_sum", "sum", "sum"),
        ("logit_z_count", "count", "sum"),
    ),
    "time": (("time_sq", "sq", "series"),),
}

# Measures a forward hook reads the output for.
FORWARD_MEASURES = frozenset(n for n, m in MEASURES.items() if m.site in ("output", "gate"))
