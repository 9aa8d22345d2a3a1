"""Partials: what hooks accumulate during a step, and how two of them combine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

# A unit is *saturated* where its gate's magnitude |f'(z)| is below this fraction of the
# activation's largest |f'|: at 1% the error signal through it is cut a hundredfold.
SAT_THRESHOLD = 0.01

# A step is *clipped* where the gradient the optimizer saw is shorter than the one
# backward produced by more than float rounding (AMP's unscale differs by ~1e-7).
CLIP_RTOL = 1e-5

# The pseudo-name of the model-scope rows (no module or parameter can be called that).
MODEL_NAME = "(model)"

Combine = Literal["sum", "max", "same"]
Where = Literal["device", "host", "params", "series"]
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
    ``where="series"``: derived on the host at the flush, after the cross-rank
    combination, from a per-time-step series (:mod:`.series`). ``shard`` (parameter partials): how a sharded (FSDP2) parameter's shards combine into
    it: ``sumsq`` for a norm (its squares add up, the root after the sum), ``count`` for a
    count (added as it is); :mod:`gradprobe.shards` reads it.
    """

    name: str
    scope: Scope
    combine: Combine
    where: Where
    doc: str
    loss_degree: int = 0
    shard: Literal["sumsq", "count"] | None = None
    # Its value before anything is folded in: 0, or −∞ for the largest of values that
    # may be negative (``logit_max``), so that a ``max`` over calls and ranks is exact.
    initial: float = 0.0


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
        Partial(
            "out_absmax",
            "module",
            "max",
            "device",
            "largest |output| entry among the finite ones (0 if none is)",
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
        # module, attention calls (gradprobe.attention; recording/attention_capture.py): the
        # step's calls of a module summarised once at the step's close. Device "max"
        # partials start at -inf (a logit may be negative); the entropy minimum is kept
        # negated so that it folds, and combines over ranks, by max.
        Partial(
            "attn_logit_max",
            "module",
            "max",
            "device",
            "largest attention logit",
            initial=-np.inf,
        ),
        Partial("attn_entropy_sum", "module", "sum", "device", "Σ weight·entropy over rows"),
        Partial("attn_weight", "module", "sum", "device", "query rows the entropies stand for"),
        Partial(
            "attn_neg_entropy_min",
            "module",
            "max",
            "device",
            "−(the lowest per-head mean entropy): the most collapsed head",
            initial=-np.inf,
        ),
        # module, sequences (issue 25, gradprobe/sequence.py): token geometry of a block's
        # output, the final projection's logits, the error signal spread over time
        Partial("cos_sum", "module", "sum", "device", "cosines between distinct sampled tokens"),
        Partial("cos_count", "module", "sum", "device", "token pairs whose cosine was summed"),
        Partial(
            "logit_max",
            "module",
            "max",
            "device",
            "largest logit of the final projection",
            initial=-np.inf,
        ),
        Partial("logit_z_sum", "module", "sum", "device", "logsumexp over classes, summed"),
        Partial("logit_z_count", "module", "sum", "device", "positions whose logsumexp was summed"),
        Partial("time_calls", "module", "sum", "host", "error-over-time series recorded"),
        Partial(
            "time_sq",
            "module",
            "sum",
            "device",
            "‖dL/dy[:, t]‖² per time step: a series [T] per module and step (Drained.series), "
            "added position by position; its column holds the series' total",
            2,
        ),
        Partial(
            "time_first",
            "module",
            "same",
            "series",
            "mean ‖dL/dy[:, t]‖ over the first quarter of the time steps",
        ),
        Partial(
            "time_last",
            "module",
            "same",
            "series",
            "mean ‖dL/dy[:, t]‖ over the last quarter of the time steps",
        ),
        Partial(
            "time_slope",
            "module",
            "same",
            "series",
            "least-squares slope of log10 ‖dL/dy[:, t]‖ per time step",
        ),
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
        Partial(
            "grad_norm",
            "parameter",
            "same",
            "device",
            "‖grad‖ (gradients are in sync)",
            shard="sumsq",
        ),
        Partial("param_norm", "parameter", "same", "device", "‖w‖ before the step", shard="sumsq"),
        Partial(
            "grad_nonfinite",
            "parameter",
            "same",
            "device",
            "NaN/Inf entries of grad",
            shard="count",
        ),
        Partial("update_ratio", "parameter", "same", "device", "‖w_after − w_before‖ / ‖w_before‖"),
        Partial("has_preclip", "parameter", "same", "host", "1 if backward's norm was measured"),
        Partial(
            "preclip_norm",
            "parameter",
            "same",
            "device",
            "‖grad‖ when the step's last backward finished: before clipping, unscaled",
            shard="sumsq",
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
