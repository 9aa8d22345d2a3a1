"""The catalogue: every statistic with its needs and finaliser, the presets, the plan."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .measures import FORWARD_MEASURES, MEASURES
from .partials import CLIP_RTOL, Arrays, Finalize, _ratio


def _clipped(p: Arrays) -> tuple[np.ndarray, np.ndarray]:
    shorter = np.sqrt(p["grad_sumsq"]) < np.sqrt(p["preclip_sumsq"]) * (1.0 - CLIP_RTOL)
    present = (p["any_grad"] > 0) & (p["any_preclip"] > 0) & (p["skipped"] == 0)
    return shorter.astype(np.float64), present


def logged_mean(p: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """A logged name's value at each step: the mean of what was logged for it (over the
    step's micro-batches and the ranks that logged it); absent where nothing was."""
    return _ratio(p["log_sum"], p["log_count"]), p["log_count"] > 0


def _memory_steps(p: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """−1 / mean(log f): after this many steps back the carried error has fallen by e
    (∏ f over k steps = exp(k · mean log f)); ∞ where every gate is exactly 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        memory = np.where(p["carry_log_sum"] < 0, -p["carry_count"] / p["carry_log_sum"], np.inf)
    return memory, _carried(p)


def _carried(p: Arrays) -> np.ndarray:
    return (p["carry_count"] > 0) & (p["carry_gap"] == 0)


def _attended(p: Arrays) -> np.ndarray:
    """Modules whose attention was measured in the step (some query row had weights)."""
    return p["attn_weight"] > 0


# The per-head table of a module's step (rows: the per-head statistics' ``heads``).
HEAD_COLUMNS = ("logit_max", "entropy", "entropy_min")


def _timed(p: Arrays) -> np.ndarray:
    """A series was recorded and its module's error signals were not left out."""
    return (p["time_calls"] > 0) & (p["err_gap"] < 2) & np.isfinite(p["time_first"])


def _act_std(p: Arrays) -> tuple[np.ndarray, np.ndarray]:
    mean = _ratio(p["out_sum"], p["count"])
    # Inf outputs make Inf − Inf: a NaN std, which is the answer; NumPy need not warn.
    with np.errstate(invalid="ignore", over="ignore"):
        var = _ratio(p["out_sumsq"], p["count"]) - mean * mean
        return np.sqrt(np.maximum(var, 0.0)), p["count"] > 0


@dataclass(frozen=True)
class Statistic:
    """A statistic of the frame: its name, and how combined partials make it.

    ``module``, ``parameter`` and ``model`` are its finalisers for each scope it exists
    in (``None`` where it does not): each maps combined partials (arrays of one shape)
    to the values and a mask of where the statistic exists (a module never run backward
    has no ``error_norm``; a frozen parameter has no ``grad_norm``). ``logged`` is the
    finaliser of a logged name (``(model)`` rows from ``log_sum``/``log_count``); a name
    logged with ``Probe.log`` that is not declared here is finalised by :func:`logged_mean`.
    """

    name: str
    doc: str
    module: Finalize | None = None
    parameter: Finalize | None = None
    model: Finalize | None = None
    logged: Finalize | None = None
    needs: tuple[str, ...] = ()  # the MEASURES it is made from
    # The first preset that records it (each preset holds the ones before: cheap, then
    # default, then full).
    preset: Literal["cheap", "default", "full"] = "default"
    # A per-head form (attention): its rows are ``<name>/<h>`` of a module, read from the
    # step's per-head table (``heads``: which of its columns; see :data:`HEAD_COLUMNS`),
    # not from partials.
    heads: int | None = None

    def finalizer(self, scope: str) -> Finalize | None:
        return {
            "module": self.module,
            "parameter": self.parameter,
            "model": self.model,
            "logged": self.logged,
        }[scope]


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in [
        Statistic(
            "grad_norm",
            "L2 norm of .grad at the step (after accumulation)",
            parameter=lambda p: (p["grad_norm"], p["has_grad"] > 0),
            needs=("params",),
            preset="cheap",
        ),
        Statistic(
            "grad_missing",
            "1 at a step where the optimizer held the parameter for training (requires_grad) "
            "but it received no gradient (.grad was None): a row only where it is 1",
            parameter=lambda p: (p["grad_missing"], p["grad_missing"] > 0),
            preset="cheap",
        ),
        Statistic(
            "param_norm",
            "L2 norm of the parameter, before the optimizer step",
            parameter=lambda p: (p["param_norm"], p["has_param_norm"] > 0),
            needs=("params",),
            preset="cheap",
        ),
        Statistic(
            "update_ratio",
            "‖w_after − w_before‖ / ‖w_before‖ across the optimizer step",
            parameter=lambda p: (p["update_ratio"], p["has_update"] > 0),
            needs=("params", "update"),
            preset="cheap",
        ),
        Statistic(
            "nonfinite",
            "NaN/Inf in .grad (parameters) or the output (modules): a flag (0/1 per call, "
            "summed over a step's calls) read from the norm computed anyway; the exact number "
            "of entries with stats='full'",
            parameter=lambda p: (p["grad_nonfinite"], p["has_grad"] > 0),
            module=lambda p: (p["out_nonfinite"], p["count"] > 0),
            needs=("params", "nonfinite"),
            preset="cheap",
        ),
        Statistic(
            "error_norm",
            "L2 norm of dL/d(output): the back-propagated error signal",
            module=lambda p: (np.sqrt(p["err_sumsq"]), (p["err_calls"] > 0) & (p["err_gap"] < 2)),
            needs=("error",),
            preset="cheap",
        ),
        Statistic(
            "error_gain",
            "‖dL/d(input)‖ / ‖dL/d(output)‖: how this module scales the error signal",
            module=lambda p: (
                np.sqrt(_ratio(p["in_err_sumsq"], p["err_sumsq"])),
                (p["in_err_calls"] > 0)
                & (p["err_calls"] > 0)
                & (p["err_sumsq"] > 0)
                & (p["err_gap"] == 0),
            ),
            needs=("error", "input_error"),
            preset="cheap",
        ),
        Statistic(
            "act_mean",
            "mean of the module's output",
            module=lambda p: (_ratio(p["out_sum"], p["count"]), p["count"] > 0),
            needs=("output",),
        ),
        Statistic(
            "act_std",
            "standard deviation (population) of the module's output",
            module=_act_std,
            needs=("output",),
        ),
        Statistic(
            "act_absmax",
            "largest |output| entry over the step's calls (micro-batches, ranks): the headroom "
            "before a bf16/fp16 overflow (65504 in fp16); over the finite entries only, NaN/Inf "
            "are counted by nonfinite; 0 if no entry is finite. Not in the default preset",
            module=lambda p: (p["out_absmax"], p["count"] > 0),
            needs=("absmax",),
            preset="full",
        ),
        Statistic(
            "zero_frac",
            "fraction of output entries exactly 0",
            module=lambda p: (_ratio(p["out_zeros"], p["count"]), p["count"] > 0),
            needs=("output",),
        ),
        Statistic(
            "dead_frac",
            "fraction of units (features; channels of conv outputs) 0 for the whole batch",
            module=lambda p: (_ratio(p["dead_units"], p["n_units"]), p["n_units"] > 0),
            needs=("units",),
        ),
        Statistic(
            "dead_window_frac",
            "fraction of units 0 in every recorded batch of the last `dead_window` steps",
            module=lambda p: (
                _ratio(p["dead_window_units"], p["n_units"]),
                (p["n_units"] > 0) & (p["window_ready"] > 0),
            ),
            needs=("units",),
        ),
        Statistic(
            "sat_frac",
            "saturating activations: fraction of entries with |f'(z)| < 1% of max |f'|",
            module=lambda p: (_ratio(p["sat_count"], p["sat_count_n"]), p["sat_count_n"] > 0),
            needs=("gate",),
        ),
        Statistic(
            "gate_mean",
            "mean of f'(z): the Hadamard factor applied to the error signal",
            module=lambda p: (_ratio(p["gate_sum"], p["gate_count"]), p["gate_count"] > 0),
            needs=("gate",),
        ),
        Statistic(
            "carry_gate_mean",
            "gated recurrent modules (LSTM, GRU, their cells): mean of the carry gate, the "
            "factor the carried error is multiplied by at each step back: the forget gate f "
            "(LSTM), the update gate z (GRU), over every sample, step, unit, layer, direction",
            module=lambda p: (_ratio(p["carry_gate_sum"], p["carry_count"]), _carried(p)),
            needs=("carry",),
        ),
        Statistic(
            "memory_steps",
            "gated recurrent modules: −1/mean(log f), the steps back after which the error "
            "carried along the cell (LSTM) or leaky (GRU) path has fallen by e",
            module=_memory_steps,
            needs=("carry",),
        ),
        Statistic(
            "seq_len",
            "gated recurrent modules: time steps per sequence, the longest way back the error "
            "can travel (a fused module: its input's length; a cell: its calls from a state "
            "that needs no grad, as after a detach, to the next)",
            module=lambda p: (
                _ratio(p["carry_steps"], p["carry_seqs"]),
                _carried(p) & (p["carry_seqs"] > 0),
            ),
            needs=("carry",),
        ),
        Statistic(
            "error_nonfinite",
            "NaN/Inf in dL/d(output) (backward): a flag as nonfinite, the exact number of "
            "entries with stats='full'",
            module=lambda p: (p["err_nonfinite"], p["err_calls"] > 0),
            needs=("error",),
            preset="cheap",
        ),
        Statistic(
            "calls",
            "forward calls of the module in the step (a shared block or an RNN cell > 1)",
            module=lambda p: (p["calls"], p["calls"] > 0),
            preset="cheap",
        ),
        # Attention (gradprobe.attention): from every scaled_dot_product_attention (and
        # F.multi_head_attention_forward) call made inside the module on a recorded step,
        # a fixed sample of query rows per head (docs/attention.md).
        Statistic(
            "attn_logit_max",
            "attention: the largest attention logit q·k·scale (+ an additive mask; masked "
            "positions out) over the module's calls, heads and sampled query rows of the "
            "step: logits that grow until the softmax is one-hot (Dehghani et al. 2023)",
            module=lambda p: (p["attn_logit_max"], _attended(p)),
            needs=("attention",),
            preset="cheap",
        ),
        Statistic(
            "attn_entropy",
            "attention: the mean entropy (nats) of the attention weights (before dropout) "
            "over the module's calls, heads and sampled query rows",
            module=lambda p: (_ratio(p["attn_entropy_sum"], p["attn_weight"]), _attended(p)),
            needs=("attention",),
        ),
        Statistic(
            "attn_entropy_min",
            "attention: the lowest per-head mean entropy, the most collapsed head (under "
            "DDP the lowest over the ranks of each rank's)",
            module=lambda p: (-p["attn_neg_entropy_min"], _attended(p)),
            needs=("attention",),
        ),
        Statistic(
            "attn_head_logit_max",
            "attention, per head: rows `attn_head_logit_max/<h>` (h: the head) of the module, "
            "the largest logit of head h; absent for a step whose calls had different head "
            "counts, and under DDP",
            needs=("attention",),
            preset="full",
            heads=0,
        ),
        Statistic(
            "attn_head_entropy",
            "attention, per head: rows `attn_head_entropy/<h>`, the mean entropy of head h",
            needs=("attention",),
            preset="full",
            heads=1,
        ),
        Statistic(
            "attn_head_entropy_min",
            "attention, per head: rows `attn_head_entropy_min/<h>`, the lowest entropy of a "
            "sampled query row of head h (for a causal head it depends on L/rows: the first "
            "row sampled sees about L/(2·rows) keys; docs/attention.md)",
            needs=("attention",),
            preset="full",
            heads=2,
        ),
        # ---- sequences (issue 25): where each is measured, docs/attention.md
        Statistic(
            "token_cosine",
            "sequence blocks (transformer layers): mean cosine similarity between distinct "
            "token vectors of the block's output, over a fixed sample of positions per "
            "sequence (gradprobe.sequence.POSITIONS); near 1 is rank collapse",
            module=lambda p: (_ratio(p["cos_sum"], p["cos_count"]), p["cos_count"] > 0),
            needs=("tokens",),
        ),
        Statistic(
            "logit_max",
            "the model's final projection (lm_head, output embeddings, the last Linear): its "
            "largest logit over the step's calls",
            module=lambda p: (p["logit_max"], p["logit_z_count"] > 0),
            needs=("logits",),
        ),
        Statistic(
            "logit_z",
            "the model's final projection: mean over positions of logsumexp over classes, the "
            "z of a z-loss (log Z)",
            module=lambda p: (
                _ratio(p["logit_z_sum"], p["logit_z_count"]),
                p["logit_z_count"] > 0,
            ),
            needs=("logits",),
        ),
        Statistic(
            "error_time_first",
            "recurrent modules (fused: the error at its input; a cell loop: each call's "
            "output error): mean of ‖dL/dy[:, t]‖ over the first quarter of the time steps",
            module=lambda p: (p["time_first"], _timed(p)),
            needs=("error", "time"),
        ),
        Statistic(
            "error_time_last",
            "recurrent modules: mean of ‖dL/dy[:, t]‖ over the last quarter of the time steps",
            module=lambda p: (p["time_last"], _timed(p)),
            needs=("error", "time"),
        ),
        Statistic(
            "error_time_slope",
            "recurrent modules: least-squares slope of log10 ‖dL/dy[:, t]‖ per time step "
            "(decades per step; > 0: larger towards the end, as when the error from a loss "
            "at the end dies going back)",
            module=lambda p: (p["time_slope"], _timed(p) & np.isfinite(p["time_slope"])),
            needs=("error", "time"),
        ),
        Statistic(
            "global_grad_norm",
            "(model) global L2 norm of the gradients the optimizer saw: after clipping",
            model=lambda p: (np.sqrt(p["grad_sumsq"]), (p["any_grad"] > 0) & (p["skipped"] == 0)),
            needs=("params",),
            preset="cheap",
        ),
        Statistic(
            "global_grad_norm_preclip",
            "(model) global L2 norm of the gradients as backward produced them: before clipping",
            model=lambda p: (
                np.sqrt(p["preclip_sumsq"]),
                (p["any_preclip"] > 0) & (p["skipped"] == 0),
            ),
            needs=("preclip",),
            preset="cheap",
        ),
        Statistic(
            "clipped",
            "(model) 1 if clipping shortened the gradient at this step, else 0",
            model=_clipped,
            needs=("params", "preclip"),
            preset="cheap",
        ),
        Statistic(
            "skipped",
            "(model) 1 if the GradScaler skipped the step (inf/NaN gradients), else 0",
            model=lambda p: (p["skipped"], p["scaler"] > 0),
            preset="cheap",
        ),
        Statistic(
            "loss",
            "(model) the loss handed to Probe.log(loss=...) (the Lightning and Hugging Face "
            "callbacks log it): the mean of the values logged for the step, i.e. over its "
            "micro-batches (log each micro-batch's own loss, not divided by the accumulation "
            "steps), then over the ranks that logged it",
            logged=logged_mean,
            preset="cheap",
        ),
        Statistic(
            "lr",
            "(model) the learning rate, read from the optimizer's param groups at its step; "
            "with groups at different rates the largest, and each group's as `lr/<i>` (i: "
            "its index in optimizer.param_groups)",
            logged=logged_mean,
            preset="cheap",
        ),
    ]
}

# Which statistics a Probe records, as plain lists (Cockpit's presets), from each entry's
# ``preset``. "full" adds activation histograms (stats `hist_00` ... with the bin edges in
# the run's meta). act_absmax is in "full" only: beside the ~10 passes over each output of
# the default forward statistics (stack, norm, sum, |y|, units, sign, count: reads and
# writes), it costs three more on a GPU (|y| masked to its finite entries, written, its max
# read), about a third more, and one more on a CPU where the norms said all was finite.
# attn_logit_max is in "cheap": logit growth is the first sign of a transformer's
# instability (Wortsman et al. 2023) and the lab's attention experiment reads it; its cost
# is bounded (batch × heads × rows × keys logits per call, recorded steps only) and the
# entropies come from the same logits, so "default" adds them at almost no more. The
# per-head forms are in "full": H rows per module each, for the same device work.
# The sequence statistics are in "default": each is measured at a few places only (the
# blocks of a sequence model, the final projection, the recurrent modules), at a bounded
# cost: token_cosine a Gram matrix of POSITIONS (32) sampled tokens per sequence
# ([N, 32, 32]·F multiply-adds per block), the logits one float32 pass over [N, T, V]
# (a max and a logsumexp, a slice at a time), the error through time one squared sum over
# the recurrent module's input error (or a 0-d one per cell call), on recorded steps only.
_PRESET_ORDER = ("cheap", "default", "full")
PRESETS: dict[str, tuple[str, ...]] = {
    preset: tuple(
        name
        for name, stat in STATISTICS.items()
        if _PRESET_ORDER.index(stat.preset) <= _PRESET_ORDER.index(preset)
    )
    for preset in _PRESET_ORDER
}


@dataclass(frozen=True)
class Plan:
    """What the hooks measure for a set of statistics: one plain bool per
    :data:`MEASURES` entry (the union of the statistics' ``needs``), computed once when
    a Probe is made, so the hot path reads attributes, not sets."""

    output: bool = False
    nonfinite: bool = False
    absmax: bool = False
    units: bool = False
    gate: bool = False
    error: bool = False
    input_error: bool = False
    carry: bool = False
    attention: bool = False
    tokens: bool = False
    logits: bool = False
    time: bool = False
    params: bool = False
    update: bool = False
    preclip: bool = False

    @classmethod
    def of(cls, stats: Iterable[str]) -> Plan:
        """The plan of the statistics named ``stats`` (names of :data:`STATISTICS`)."""
        needed = {m for name in stats for m in STATISTICS[name].needs}
        return cls(**{name: name in needed for name in MEASURES})

    @property
    def forward(self) -> bool:
        """Whether a forward hook reads the module's output at all."""
        return any(getattr(self, name) for name in FORWARD_MEASURES)

    def partials(self) -> set[str]:
        """The device partials this plan's measures fill."""
        return {p for name in MEASURES if getattr(self, name) for p in MEASURES[name].partials}


def finalize(
    partials: Arrays, stats: list[str], scope: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Turn combined partials into ``{stat: (values, present)}`` for one scope."""
    out = {}
    for name in stats:
        fn = STATISTICS[name].finalizer(scope)
        if fn is not None:
            out[name] = fn(partials)
    return out
