"""Every threshold of the detectors, as named data with its reason.

One table, :data:`THRESHOLDS` (name → value, and why it is that value), gathered from
the definitions below, so that a value and its reason are written once. Each one is a
number (a :class:`Threshold` is a ``float``, a :class:`Count` an ``int``): the detectors
compare and compute with them as with the plain numbers they replace, and any result
of arithmetic on them is a plain number. ``docs/findings.md`` lists them; the severity
cut-offs (``*_CRITICAL*``: where a finding becomes critical) are here too, not inline.
"""

from __future__ import annotations

from typing import Any

from .. import spikes

__all__ = ["THRESHOLDS", "Count", "Threshold", "table"]


class _Reasoned:
    """A number that carries why it has its value (``why``) and its ``name`` in the table."""

    why: str
    name: str = ""

    def __new__(cls, value: Any, why: str) -> Any:
        self = super().__new__(cls, value)  # type: ignore[call-arg]  # float's or int's
        self.why = why
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickle and copy: the value and the reason
        return (self.real, self.why)  # type: ignore[attr-defined]


class Threshold(_Reasoned, float):
    """A threshold: a float (compares and computes as one), with ``why`` and ``name``."""


class Count(_Reasoned, int):
    """A threshold that counts (steps, layers, a window): an int, with ``why`` and ``name``."""


# ---------------------------------------------------------------- depth and time
VANISHING_RATIO = Threshold(
    1e-2,
    "Vanishing: the first layer with weights receives less than 1/100 of the error signal of "
    "the last one, two decades lost. Healthy 30-layer nets (He-init ReLU, critical tanh, "
    "residual ReLU) measure 0.2–1.6; a 20-layer default-init sigmoid net ~1e-12.",
)
VANISHING_FACTOR = Threshold(
    0.9,
    "... and the fitted per-layer factor is below 0.9: the loss is a steady shrinkage over "
    "depth (10% or more per layer), not one bottleneck layer.",
)
VANISHING_CRITICAL_RATIO = Threshold(
    1e-6,
    "Vanishing is critical when six decades are lost from the last layer to the first: the "
    "first layers' updates are then below float32 rounding of their weights at any usual "
    "learning rate.",
)
CARRY_MEMORY_STEPS = Threshold(
    0.5,
    "Vanishing through time, in a gated recurrent module (LSTM, GRU, their cells): the error "
    "carried back along the cell (LSTM) or leaky (GRU) path is multiplied by the carry gate "
    "at every step, so its memory is −1/mean(log f) steps (stat ``memory_steps``). It "
    "vanishes when that memory is under half a step (the carried error cut by e² ≈ 7 or more "
    "per step: forget bias 0, PyTorch's default, gives ≈1.4 steps, +1 ≈3, −20 ≈0.05) ...",
)
CARRY_GATE_MEAN = Threshold(
    0.1,
    "... the arithmetic mean gate is below 0.1 too (units that keep their state, f ≈ 1, lift "
    "it: a model that carries its memory in a few units is not flagged for the many that "
    "forget), and across the sequence (seq_len − 1 steps back) the carried error falls below "
    "VANISHING_RATIO, as over depth: two decades lost between the last position and the first.",
)
CARRY_CRITICAL_LOG10 = Threshold(
    -6.0,
    "Vanishing through time is critical when the error carried across the sequence is cut "
    "by six decades (log10 of the carried fraction ≤ −6), as over depth.",
)
MIN_DEPTH_LAYERS = Count(
    4,
    "Depth profiles need at least this many layers with a positive error signal to fit a "
    "per-layer factor; fewer, and a line through them says nothing about depth.",
)

# ---------------------------------------------------------------- explosion
EXPLODING_RATIO = Threshold(
    10.0,
    "Exploding over depth: the first layer receives 10× the last one's error signal (and the "
    "fitted factor grows it by ≥ 5% per layer). A healthy net does not amplify the signal on "
    "its way down; a 30-layer tanh net with σ_w² = 4 measures ×1.13/layer, ~40×.",
)
EXPLODING_FACTOR = Threshold(
    1.05,
    "... and the fitted per-layer factor grows the error signal by ≥ 5% per layer toward the "
    "input: a steady amplification over depth, not one layer.",
)
EXPLODING_CRITICAL_RATIO = Threshold(
    1e6,
    "Exploding over depth (now or at initialisation) is critical at six decades gained from "
    "the last layer to the first.",
)
EXPLODING_GROWTH = Threshold(
    1e3,
    "Exploding over steps: the total gradient norm rises 1000-fold above its level in the "
    "first quarter of the run. Training noise moves it by a few times, not by decades.",
)
EXPLODING_CRITICAL_GROWTH = Threshold(
    1e6,
    "Exploding over steps is critical when the total gradient norm has grown a million-fold.",
)
UPDATE_RATIO_EXPLODING = Threshold(
    1.0,
    "An update as large as the weight itself (‖Δw‖/‖w‖ ≥ 1) replaces the weight in one step.",
)
UPDATE_RATIO_CRITICAL = Threshold(
    10.0,
    "Updates ten times the weight's size are critical: the weight is overwritten by the "
    "step, whatever it had learned.",
)

# ---------------------------------------------------------------- units
SATURATION_FRAC = Threshold(
    0.25,
    "A layer is saturated when ≥ 25% of its entries have |f'(z)| < 1% of max |f'| "
    "(stats.SAT_THRESHOLD): a quarter of its error signal is cut a hundredfold or more.",
)
SATURATION_CRITICAL = Threshold(
    0.75,
    "Saturation is critical when three quarters of a layer's entries pass almost no error signal.",
)
DEAD_UNIT_FRAC = Threshold(
    0.5,
    "Dead units: ≥ 50% of a layer's features output 0 for every sample over the dead window. "
    "He-init 30-layer ReLU nets measure up to ~30% per layer (inputs become correlated with "
    "depth), a ReLU net with bias −10 measures 100%.",
)
DEAD_CHANNEL_FRAC = Threshold(
    0.0,
    "Dead channels (strictly above: any dead channel): a channel is zero at every position of "
    "every sample (thousands of entries per batch), which chance does not produce, so one "
    "dead channel is a finding.",
)
DEAD_CRITICAL_FRAC = Threshold(
    0.9,
    "Dead units or channels are critical when 90% of the worst layer's are dead: the layer "
    "passes almost nothing forward and no error back.",
)
NEGATIVE_PREACT_SIGMAS = Threshold(
    5.0,
    "Every pre-activation negative: the mean lies this many standard deviations below 0 (for "
    "a Gaussian, 1 entry in 3.5 million above 0 at 5σ): a ReLU after it outputs 0.",
)

# ---------------------------------------------------------------- the optimizer's side
UNSTABLE_UPDATE_RATIO = Threshold(
    0.1,
    "Updates of ≥ 10% of a weight per step are far above the ~1e-3 that trains stably "
    "(Karpathy's rule of thumb): the learning rate is too high for that layer.",
)
STALL_FACTOR = Threshold(
    1e-3,
    "Stalled: a weight's update ratio is below 1/1000 of that of the network's active layers: "
    "that layer learns a thousand times more slowly than the rest.",
)
STALL_REFERENCE_QUANTILE = Threshold(
    0.9,
    "The active layers' update ratio is the 90th percentile over weights, so that the "
    "reference holds when most layers are stalled.",
)
STALLED_CRITICAL_SHARE = Threshold(
    0.5,
    "Stalling is critical when at least half of the weights are stalled: most of the network "
    "does not learn.",
)
SKIPPED_FRAC = Threshold(
    0.1,
    "Mixed precision: a GradScaler skips the step when the scaled gradients overflow, then "
    "lowers its scale. A few early skips are how it finds the scale; more than 10% of the "
    "recorded steps means the gradients themselves overflow.",
)
SKIPPED_STREAK = Count(
    5,
    "... as do 5 skipped steps in a row: the scaler has lowered its scale five times and the "
    "gradients still overflow.",
)
SKIPPED_CRITICAL_FRAC = Threshold(
    0.5,
    "Skipped steps are critical when more than half of the recorded steps were skipped: "
    "the model mostly does not train.",
)
CLIPPED_FRAC = Threshold(
    0.5,
    "Clipping that cuts the norm on more than half of the steps sets the step size itself: "
    "the optimizer mostly sees max_norm, not the gradient.",
)
UNUSED_FRAC = Threshold(
    0.5,
    "A parameter the optimizer trains that gets no gradient on more than half of the recorded "
    "steps: a branch taken now and then (mixture of experts, stochastic depth) misses some "
    "steps; one that misses most, or all, is cut off from the loss.",
)

# ---------------------------------------------------------------- unstable training
# Read from the logged loss and the global gradient norm over steps.
SPIKE_WINDOW = Count(
    spikes.SPIKE_WINDOW,  # the rule itself: gradprobe/spikes.py
    "Running medians are taken over the SPIKE_WINDOW recorded steps before each one (at least "
    "a quarter of it must be there): long enough that one odd batch does not move them.",
)
GRAD_SPIKE_FACTOR = Threshold(
    spikes.GRAD_SPIKE_FACTOR,
    "A gradient-norm spike: the pre-clip global norm ≥ 10× its running median. Minibatch noise "
    "moves it by 2–5× in healthy runs (a 20-layer He-init ReLU MLP at a stable rate: ≤ 5×); a "
    "deep ReLU net at too high a rate jumps 10–100×.",
)
GRAD_SPIKE_CRITICAL_FACTOR = Threshold(
    100.0,
    "Gradient-norm spikes are critical when the worst is 100× its running median (two "
    "decades: past what a too-high rate alone gives) ...",
)
GRAD_SPIKE_CRITICAL_COUNT = Count(
    5,
    "... or when 5 or more steps spiked: not an odd batch, a run that keeps jumping.",
)
LOSS_SPIKE_FACTOR = Threshold(
    3.0,
    "A loss spike: the loss ≥ 3× its running median (and ≥ LOSS_SPIKE_MADS median absolute "
    "deviations above it). Minibatch losses are skewed (a hard batch doubles the loss of a "
    "well-trained model), so the factor alone would flag noise near 0.",
)
LOSS_SPIKE_MADS = Threshold(
    10.0,
    "... and ≥ 10 median absolute deviations above the running median: the deviation bound "
    "alone would flag the noise of a flat run, the factor alone noise near 0.",
)
LOSS_WINDOW = Count(
    5,
    "The loss is judged on medians of LOSS_WINDOW recorded steps: odd batches do not count.",
)
MIN_LOSS_STEPS = Count(
    20,
    "Loss-based findings need MIN_LOSS_STEPS recorded losses: fewer say nothing about a trend.",
)
DIVERGENCE_FACTOR = Threshold(
    1.5,
    "Divergence: the smoothed loss ends ≥ 1.5× its best level (and has given back at least "
    "DIVERGENCE_GIVEBACK of its gain): noise at a low loss moves it a few percent, a run that "
    "diverges loses what it learned.",
)
DIVERGENCE_GIVEBACK = Threshold(
    0.5,
    "... and has given back at least half of what it had gained from the start (or is above "
    "the start).",
)
OSCILLATION_AUTOCORR = Threshold(
    -0.5,
    "Oscillation: the loss, less its trend (a running mean of 2·LOSS_WINDOW+1 steps), is "
    "anti-correlated with itself at some lag ≤ LOSS_WINDOW (autocorrelation ≤ −0.5: it goes up "
    "and down in a rhythm). Minibatch noise is uncorrelated (|autocorrelation| ≲ 0.25 over 40+ "
    "steps), so it does not read as oscillation.",
)
OSCILLATION_AMPLITUDE = Threshold(
    0.1, "... with swings ≥ 10% of the loss's level: a rhythm too small to matter is not one."
)
PLATEAU_DECREASE = Threshold(
    0.02,
    "Plateau: over the last half of the run the loss did not decrease by 2% (medians of its "
    "two quarters) ...",
)
PLATEAU_LEVEL = Threshold(
    0.5,
    "... while it is still at ≥ 50% of its starting level: a run that has not learned, not "
    "one that converged.",
)
INSTABILITY_LEARNED = Threshold(
    0.25,
    "Loss instability: the loss keeps jumping back towards where it started. A setback counts "
    "once the smoothed loss (LOSS_WINDOW medians) had gained ≥ 25% of its start ...",
)
INSTABILITY_GIVEBACK = Threshold(0.7, "... and then gives back ≥ 70% of what it had gained ...")
INSTABILITY_RECOVER = Threshold(
    0.25, "... and ends when the loss comes back within 25% of the gain of its best."
)
INSTABILITY_SETBACKS = Count(
    2,
    "Two setbacks or more make the finding. Calibrated on a 20-layer He-init ReLU MLP on "
    "digits (SGD, batch 32, 300 steps, 5 seeds each): at lr 0.005 and 0.01 ≤ 1 setback per "
    "run; at 0.05, 1–2 (4 of 5 runs with 2).",
)
INSTABILITY_CRITICAL_SETBACKS = Count(
    2 * INSTABILITY_SETBACKS,
    "Loss instability is critical at twice the setbacks that make the finding.",
)

# ---------------------------------------------------------------- inside the Transformer
# Read from the attention statistics (attn_logit_max, attn_entropy, attn_entropy_min), the
# token geometry of a block's output (token_cosine) and the model's output logits
# (logit_max, logit_z), per module over steps.
ATTN_LOGIT_LARGE = Threshold(
    100.0,
    "Attention-logit growth: the largest attention logit q·k/√d of a module reaches 100 "
    "(median of the last half of the steps) ... A softmax row whose largest logit stands "
    "e^17 above the others is one-hot in float32; healthy small models stay at 5–30 (lab "
    "`attention`: 26 at the best rate, 6–15 with QK-layernorm), and Wortsman et al. 2023 "
    "measure ~1e2 for stable runs, 1e3–1e4 for the ones that diverge.",
)
ATTN_LOGIT_GROWTH = Threshold(
    10.0,
    "... having grown at least tenfold over its level in the first quarter of the run "
    "(q·k/√d starts at a few units at any usual init): the logits grew in training, "
    "not by design (an attention sink built into the model).",
)
ATTN_LOGIT_CRITICAL = Threshold(
    1e3,
    "Attention-logit growth is critical at a largest logit of 1000: bfloat16 spaces numbers "
    "near 1000 by 8, so differences between keys are rounded away before the softmax, "
    "and the softmax is one-hot in any precision (lab `attention`: the plain model reaches "
    "6e3 at the rate where its loss goes back to a uniform guess).",
)
ENTROPY_COLLAPSE_NATS = Threshold(
    0.1,
    "Attention entropy collapse: a module's attention entropy, averaged over its heads and "
    "query rows (attn_entropy), falls to 0.1 nats or less (median of the last half of the "
    "steps): on average ≥ 98% of each row's weight on one key. The threshold is absolute "
    "because the number of keys is not recorded with the statistic (under a causal mask "
    "each query row has its own, from 1 to the context), so log(keys) cannot scale it; "
    "0.1 nats is one-hot at any key count (uniform attention over only 2 keys is 0.69).",
)
ENTROPY_FALL = Threshold(
    0.25,
    "... and that mean is at most a quarter of its level in the first quarter of the run: "
    "it collapsed during training (Zhai et al. 2023), it was not low from the start (a "
    "sequence of one token has entropy 0 at every step).",
)
ENTROPY_LOSS_LEVEL = Threshold(
    0.5,
    "... while the logged loss (median of the last half) stays at 50% or more of its start "
    "(median of its first LOSS_WINDOW): heads that became one-hot while the model learned "
    "have found what to attend to (a previous-token or copy head: the lab's recurrence "
    "x[t] = x[t−1] + x[t−2] is solved by one-hot heads at 0.07 nats); the collapse of Zhai "
    "et al. 2023 comes with training that stalls or diverges. Without a logged loss the "
    "finding is only `info`.",
)
ENTROPY_CRITICAL_NATS = Threshold(
    0.01,
    "Entropy collapse is critical at 0.01 nats: ≥ 99.9% of every row's weight on one key, "
    "so the other keys' values and their gradients are cut a thousandfold.",
)
RANK_COLLAPSE_COSINE = Threshold(
    0.95,
    "Rank collapse: the mean cosine similarity between the token vectors of a block's "
    "output (token_cosine) reaches 0.95 at depth, at the first recorded step or as the "
    "median of the last half, while the first block's is lower: the tokens converge to one "
    "direction with depth, which makes the query and key gradients vanish (Dong et al. "
    "2021; Noci et al. 2022). Token vectors of a pre-LN model keep cosines well below it.",
)
RANK_LOSS_LEVEL = Threshold(
    0.5,
    "... while the logged loss (median of the last half) stays at 50% or more of its start, "
    "as for entropy collapse: trained language models' token vectors are anisotropic (GPT-2's "
    "last layers have mean cosines near 0.99 between any two tokens, Ethayarajh 2019) and "
    "learn well; tokens that are one vector in a model that does not learn are the collapse "
    "of Dong et al. 2021. Without a logged loss the finding is only `info`.",
)
RANK_COLLAPSE_CRITICAL = Threshold(
    0.99,
    "Rank collapse is critical at a mean token cosine of 0.99: the tokens differ in 1% of "
    "their direction, and attention over them averages to one vector.",
)
LOGIT_Z_DRIFT = Threshold(
    20.0,
    "Output-logit divergence: the log-partition log Z = logsumexp of the output logits "
    "(logit_z, mean over positions) moves 20 nats or more from its level in the first "
    "quarter of the run (it starts near ln(classes) and a confident prediction moves it by "
    "the winning logit, ~10): the logits drift together, which the softmax ignores and "
    "float precision does not (Wortsman et al. 2023; the z-loss of Chowdhery et al. 2022) ...",
)
LOGIT_MAX_LARGE = Threshold(
    100.0,
    "... or the largest output logit (logit_max) reaches 100 (median of the last half) ...",
)
LOGIT_MAX_GROWTH = Threshold(
    10.0,
    "... having grown tenfold over its level in the first quarter of the run: the output "
    "layer's weights grow without bound.",
)
LOGIT_CRITICAL = Threshold(
    1e3,
    "Output-logit divergence is critical when log Z has moved 1000 nats or the largest "
    "logit reached 1000 (bfloat16 spaces numbers near 1000 by 8: the logits' differences "
    "are lost).",
)
TIME_ERROR_DECAY = Threshold(
    0.1,
    "Vanishing through time, from the error signal of a recurrent output over its positions "
    "(error_time_first, error_time_last, error_time_slope): the fitted slope of "
    "log10 ‖dL/dy[:, t]‖ loses 0.1 decade or more per step back (a decade every 10 steps: "
    "a dependency 20 steps back receives 1/100 of the error), or the mean over the first "
    "quarter of the positions is below VANISHING_RATIO of the mean over the last quarter "
    "(two decades lost, as over depth). `critical` at VANISHING_CRITICAL_RATIO.",
)

# The one table: every threshold above, in the order written, each knowing its name.
THRESHOLDS: dict[str, Threshold | Count] = {
    name: value for name, value in globals().items() if isinstance(value, (Threshold, Count))
}
for _name, _value in THRESHOLDS.items():
    _value.name = _name
del _name, _value


def table() -> list[tuple[str, float, str]]:
    """The thresholds as rows (name, value, why), for docs and for reading."""
    return [(name, t.real, t.why) for name, t in THRESHOLDS.items()]
