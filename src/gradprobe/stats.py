"""Statistics, declared once as data, and the pure reductions behind them.

A *statistic* (``STATISTICS``) is what lands in the frame: ``error_norm`` of a
module, ``grad_norm`` of a parameter. It is finalised at flush time, on the host,
from *partials* (``PARTIALS``): sums and counts that hooks accumulate on the
device while a step runs. Each partial says how two partial values combine:
across repeated calls of a module in one step, across the micro-batches of a
gradient-accumulation step, and across data-parallel ranks. So a module called
twice, accumulation and DDP need no code of their own: they all ``sum`` (or
``max``) the same partials, and the statistic is a function of the combined sums.

Three scopes: ``module`` (a row per probed module), ``parameter`` (a row per
parameter) and ``model`` (one row per step under the pseudo-name :data:`MODEL_NAME`,
for what belongs to the whole step: the global gradient norm before and after
clipping, whether the step was clipped, whether a ``GradScaler`` skipped it).

*Logged* values are ``(model)`` rows too: the scalars a training loop hands to
``Probe.log`` (the loss), and each param group's learning rate, read at the optimizer
step. Each is kept as two partials per name (``log_sum``, ``log_count``), which add up
across the values logged in one step (micro-batches) and across ranks, and its
statistic is their ratio, the mean (:func:`logged_mean`).

What a hook reduces per call, and how those per-call values fold into the partials,
is in :mod:`gradprobe.buffer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "CLIP_RTOL",
    "MODEL_NAME",
    "PARTIALS",
    "PRESETS",
    "SAT_THRESHOLD",
    "STATISTICS",
    "Partial",
    "Statistic",
    "finalize",
    "logged_mean",
    "model_partials",
]

# A unit is *saturated* where its gate f'(z) is below this fraction of the activation's
# largest derivative: at 1% the error signal through it is cut a hundredfold.
SAT_THRESHOLD = 0.01

# A step is *clipped* where the gradient the optimizer saw is shorter than the one
# backward produced by more than float rounding (AMP's unscale differs by ~1e-7).
CLIP_RTOL = 1e-5

# The pseudo-name of the model-scope rows (no module or parameter can be called that).
MODEL_NAME = "(model)"

Combine = Literal["sum", "max", "same"]
Where = Literal["device", "host", "params"]
Scope = Literal["module", "parameter", "model"]


@dataclass(frozen=True)
class Partial:
    """A partial value accumulated during a step.

    ``combine`` says how two partial values make one: ``sum`` (calls, micro-batches
    and ranks add up), ``max`` (a flag: any call set it), or ``same`` (computed after
    the cross-rank combination, so every rank already holds the global value).
    ``where`` says whether hooks accumulate it on the tensor's device, or it is a count
    the host already knows (numbers of calls and of elements) and costs no device work,
    or (``params``, model scope) it is derived on the host from the parameter partials.
    ``loss_degree`` is how it scales with the loss: ``err_sumsq`` is quadratic in
    dL/d(output). Under DDP the loss whose gradient the optimizer applies is the *mean*
    of the ranks' losses (DDP averages gradients), so after the cross-rank sum a partial
    of degree d is multiplied by world_size^-d: statistics then describe that loss.
    """

    name: str
    scope: Scope
    combine: Combine
    where: Where
    doc: str
    loss_degree: int = 0


PARTIALS: dict[str, Partial] = {
    p.name: p
    for p in [
        # module, counted on the host
        Partial("calls", "module", "sum", "host", "forward calls of the module in the step"),
        Partial("count", "module", "sum", "host", "number of output entries seen"),
        Partial("gate_count", "module", "sum", "host", "number of activation inputs gated"),
        Partial("sat_count_n", "module", "sum", "host", "entries of a saturating activation"),
        Partial("err_calls", "module", "sum", "host", "backward passes through the output"),
        Partial("in_err_calls", "module", "sum", "host", "backward passes through the input"),
        Partial("n_units", "module", "same", "host", "units (features or channels)"),
        Partial("window_ready", "module", "same", "host", "1 once `dead_window` steps are seen"),
        Partial("gap", "module", "max", "host", "1 if a hook failed: the step is not recorded"),
        Partial(
            "err_gap",
            "module",
            "max",
            "host",
            "1: error_gain not recorded, 2: nor error_norm (autograd traversed a tensor "
            "twice in the step, or the module's own input share could not be found)",
        ),
        # module, accumulated on the device
        Partial("out_sum", "module", "sum", "device", "sum of output entries"),
        Partial("out_sumsq", "module", "sum", "device", "sum of squared output entries"),
        Partial("out_zeros", "module", "sum", "device", "output entries exactly 0"),
        Partial(
            "out_nonfinite",
            "module",
            "sum",
            "device",
            "NaN/Inf flags (full: entries) of the output",
        ),
        Partial("gate_sum", "module", "sum", "device", "sum of f'(z) over the activation input"),
        Partial("sat_count", "module", "sum", "device", "entries with |f'(z)| < 1% of max |f'|"),
        Partial("err_sumsq", "module", "sum", "device", "‖dL/d(output)‖² summed over passes", 2),
        Partial("err_nonfinite", "module", "sum", "device", "NaN/Inf flags (full: entries), dL/dy"),
        Partial("in_err_sumsq", "module", "sum", "device", "‖dL/d(input)‖² summed over passes", 2),
        Partial("dead_units", "module", "same", "device", "units 0 for the whole step"),
        Partial("dead_window_units", "module", "same", "device", "units 0 for `window` steps"),
        # module, gated recurrent modules only (gradprobe.recurrent): the carry gates
        Partial("carry_count", "module", "sum", "host", "carry-gate entries measured"),
        Partial("carry_steps", "module", "sum", "host", "time steps the carried state travelled"),
        Partial("carry_seqs", "module", "sum", "host", "sequences (carried states) started"),
        Partial(
            "carry_gap", "module", "max", "host", "1 if a call's carry gates were not measured"
        ),
        Partial("carry_gate_sum", "module", "sum", "device", "sum of the carry gates f (or z)"),
        Partial("carry_log_sum", "module", "sum", "device", "sum of log f (or log z)"),
        # parameter, computed at the step boundary on the device
        Partial("has_grad", "parameter", "same", "host", "1 if the parameter had a gradient"),
        Partial("has_update", "parameter", "same", "host", "1 if the update was measured"),
        # A step the "auto" cadence does not record has gradient norms only (its sentinel).
        Partial("has_param_norm", "parameter", "same", "host", "1 if ‖w‖ was measured"),
        Partial("param_gap", "parameter", "max", "host", "1 if the step hook failed"),
        Partial(
            "grad_missing",
            "parameter",
            "max",  # under DDP: missing on some rank (its ranks then update it differently)
            "host",
            "1 if the optimizer held the parameter (requires_grad) but it had no gradient",
        ),
        Partial("grad_norm", "parameter", "same", "device", "‖grad‖ (gradients are in sync)"),
        Partial("param_norm", "parameter", "same", "device", "‖w‖ before the step"),
        Partial("grad_nonfinite", "parameter", "same", "device", "NaN/Inf entries of grad"),
        Partial("update_ratio", "parameter", "same", "device", "‖w_after − w_before‖ / ‖w_before‖"),
        Partial("has_preclip", "parameter", "same", "host", "1 if backward's norm was measured"),
        Partial(
            "preclip_norm",
            "parameter",
            "same",
            "device",
            "‖grad‖ when the step's last backward finished: before clipping, unscaled",
        ),
        # model: one row per step
        Partial("skipped", "model", "max", "host", "1 if the GradScaler skipped the step"),
        Partial("scaler", "model", "same", "host", "1 if a GradScaler is watched"),
        Partial("any_grad", "model", "max", "params", "1 if some parameter had a gradient"),
        Partial("grad_sumsq", "model", "same", "params", "Σ‖grad‖² over parameters, at the step"),
        Partial("any_preclip", "model", "max", "params", "1 if backward's norms were measured"),
        Partial("preclip_sumsq", "model", "same", "params", "Σ‖grad‖² as backward left it"),
        # model, one pair per logged name (Probe.log, the learning rate), kept apart from
        # the tables above: names and steps need not agree across ranks (see buffer.Ranks)
        Partial("log_sum", "model", "sum", "device", "sum of the values logged under a name"),
        Partial("log_count", "model", "sum", "host", "number of values logged under a name"),
    ]
}

# Partials of one logged name each: not columns of the per-step model table.
LOGGED_PARTIALS = ("log_sum", "log_count")
MODULE_HOST_PARTIALS = [n for n, p in PARTIALS.items() if p.scope == "module" and p.where == "host"]
MODEL_HOST_PARTIALS = [
    n
    for n, p in PARTIALS.items()
    if p.scope == "model" and p.where == "host" and n not in LOGGED_PARTIALS
]

Arrays = Mapping[str, np.ndarray]
Finalize = Callable[[Arrays], tuple[np.ndarray, np.ndarray]]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def model_partials(params: Arrays) -> dict[str, np.ndarray]:
    """The model partials derived from parameter partials ``[rows, params]``: ``[rows, 1]``.

    The global norm is the root of the summed squared per-parameter norms, exactly as
    ``clip_grad_norm_`` computes it; before and after clipping it is summed the same
    way, so an unclipped step gives two bit-identical numbers.
    """
    has_grad = params["has_grad"] > 0
    has_pre = params["has_preclip"] > 0
    # A parameter left out of a step (a failed step hook) leaves its global norms out:
    # a sum over the other parameters would be a wrong number, not a gap.
    whole = ~(params["param_gap"] > 0).any(axis=1, keepdims=True)
    return {
        "any_grad": (has_grad.any(axis=1, keepdims=True) & whole).astype(np.float64),
        "grad_sumsq": np.where(has_grad, params["grad_norm"] ** 2, 0.0).sum(axis=1, keepdims=True),
        "any_preclip": (has_pre.any(axis=1, keepdims=True) & whole).astype(np.float64),
        "preclip_sumsq": np.where(has_pre, params["preclip_norm"] ** 2, 0.0).sum(
            axis=1, keepdims=True
        ),
    }


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
        ),
        Statistic(
            "grad_missing",
            "1 at a step where the optimizer held the parameter for training (requires_grad) "
            "but it received no gradient (.grad was None): a row only where it is 1",
            parameter=lambda p: (p["grad_missing"], p["grad_missing"] > 0),
        ),
        Statistic(
            "param_norm",
            "L2 norm of the parameter, before the optimizer step",
            parameter=lambda p: (p["param_norm"], p["has_param_norm"] > 0),
        ),
        Statistic(
            "update_ratio",
            "‖w_after − w_before‖ / ‖w_before‖ across the optimizer step",
            parameter=lambda p: (p["update_ratio"], p["has_update"] > 0),
        ),
        Statistic(
            "nonfinite",
            "NaN/Inf in .grad (parameters) or the output (modules): a flag (0/1 per call, "
            "summed over a step's calls) read from the norm computed anyway; the exact number "
            "of entries with stats='full'",
            parameter=lambda p: (p["grad_nonfinite"], p["has_grad"] > 0),
            module=lambda p: (p["out_nonfinite"], p["count"] > 0),
        ),
        Statistic(
            "error_norm",
            "L2 norm of dL/d(output): the back-propagated error signal",
            module=lambda p: (np.sqrt(p["err_sumsq"]), (p["err_calls"] > 0) & (p["err_gap"] < 2)),
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
        ),
        Statistic(
            "act_mean",
            "mean of the module's output",
            module=lambda p: (_ratio(p["out_sum"], p["count"]), p["count"] > 0),
        ),
        Statistic(
            "act_std", "standard deviation (population) of the module's output", module=_act_std
        ),
        Statistic(
            "zero_frac",
            "fraction of output entries exactly 0",
            module=lambda p: (_ratio(p["out_zeros"], p["count"]), p["count"] > 0),
        ),
        Statistic(
            "dead_frac",
            "fraction of units (features; channels of conv outputs) 0 for the whole batch",
            module=lambda p: (_ratio(p["dead_units"], p["n_units"]), p["n_units"] > 0),
        ),
        Statistic(
            "dead_window_frac",
            "fraction of units 0 in every recorded batch of the last `dead_window` steps",
            module=lambda p: (
                _ratio(p["dead_window_units"], p["n_units"]),
                (p["n_units"] > 0) & (p["window_ready"] > 0),
            ),
        ),
        Statistic(
            "sat_frac",
            "saturating activations: fraction of entries with |f'(z)| < 1% of max |f'|",
            module=lambda p: (_ratio(p["sat_count"], p["sat_count_n"]), p["sat_count_n"] > 0),
        ),
        Statistic(
            "gate_mean",
            "mean of f'(z): the Hadamard factor applied to the error signal",
            module=lambda p: (_ratio(p["gate_sum"], p["gate_count"]), p["gate_count"] > 0),
        ),
        Statistic(
            "carry_gate_mean",
            "gated recurrent modules (LSTM, GRU, their cells): mean of the carry gate, the "
            "factor the carried error is multiplied by at each step back: the forget gate f "
            "(LSTM), the update gate z (GRU), over every sample, step, unit, layer, direction",
            module=lambda p: (_ratio(p["carry_gate_sum"], p["carry_count"]), _carried(p)),
        ),
        Statistic(
            "memory_steps",
            "gated recurrent modules: −1/mean(log f), the steps back after which the error "
            "carried along the cell (LSTM) or leaky (GRU) path has fallen by e",
            module=_memory_steps,
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
        ),
        Statistic(
            "error_nonfinite",
            "NaN/Inf in dL/d(output) (backward): a flag as nonfinite, the exact number of "
            "entries with stats='full'",
            module=lambda p: (p["err_nonfinite"], p["err_calls"] > 0),
        ),
        Statistic(
            "calls",
            "forward calls of the module in the step (a shared block or an RNN cell > 1)",
            module=lambda p: (p["calls"], p["calls"] > 0),
        ),
        Statistic(
            "global_grad_norm",
            "(model) global L2 norm of the gradients the optimizer saw: after clipping",
            model=lambda p: (np.sqrt(p["grad_sumsq"]), (p["any_grad"] > 0) & (p["skipped"] == 0)),
        ),
        Statistic(
            "global_grad_norm_preclip",
            "(model) global L2 norm of the gradients as backward produced them: before clipping",
            model=lambda p: (
                np.sqrt(p["preclip_sumsq"]),
                (p["any_preclip"] > 0) & (p["skipped"] == 0),
            ),
        ),
        Statistic(
            "clipped",
            "(model) 1 if clipping shortened the gradient at this step, else 0",
            model=_clipped,
        ),
        Statistic(
            "skipped",
            "(model) 1 if the GradScaler skipped the step (inf/NaN gradients), else 0",
            model=lambda p: (p["skipped"], p["scaler"] > 0),
        ),
        Statistic(
            "loss",
            "(model) the loss handed to Probe.log(loss=...) (the Lightning and Hugging Face "
            "callbacks log it): the mean of the values logged for the step, i.e. over its "
            "micro-batches (log each micro-batch's own loss, not divided by the accumulation "
            "steps), then over the ranks that logged it",
            logged=logged_mean,
        ),
        Statistic(
            "lr",
            "(model) the learning rate, read from the optimizer's param groups at its step; "
            "with groups at different rates the largest, and each group's as `lr/<i>` (i: "
            "its index in optimizer.param_groups)",
            logged=logged_mean,
        ),
    ]
}

# Which statistics a Probe records, as plain lists (Cockpit's presets). "full" adds
# activation histograms (stats `hist_00` ... with the bin edges in the run's meta).
PRESETS: dict[str, tuple[str, ...]] = {
    "cheap": (
        "grad_norm",
        "grad_missing",
        "param_norm",
        "update_ratio",
        "nonfinite",
        "error_norm",
        "error_gain",
        "error_nonfinite",
        "calls",
        "global_grad_norm",
        "global_grad_norm_preclip",
        "clipped",
        "skipped",
        "loss",
        "lr",
    ),
    "default": tuple(STATISTICS),
    "full": tuple(STATISTICS),
}


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
