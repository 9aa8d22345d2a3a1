"""Theory of signal propagation: what gradients *should* do at initialisation.

One module per theory; every public name is importable from ``gradprobe.theory``:

* :mod:`.meanfield` — plain fully connected nets in the wide limit: the length map, q*,
  χ₁, c*, depth scales, the critical σ_w² and the predicted error profile
  (Poole et al. 2016; Schoenholz et al. 2017).
* :mod:`.residual` — residual branches of scale α: E‖x_L‖²/‖x_0‖² = (1 + α²g)^L
  (Hanin & Rolnick 2018; Marion et al. 2025).
* :mod:`.finite_width` — the seed-to-seed spread at finite width: E[R²] = (1 + 5/n)^L
  (Hanin & Rolnick 2018).
* :mod:`.isometry` — the spread of the input-output Jacobian's spectrum, Gaussian vs
  orthogonal weights (Pennington, Schoenholz & Ganguli 2017).
* :mod:`.gated` — the memory of a gated recurrent unit, T = 1 + e^(b_f) (Tallec & Ollivier 2018).
* :mod:`.model` — all of the above read off the user's own model: :func:`predict`, and
  :func:`compare` against a recorded run's first steps.
* :mod:`.inits`, :mod:`.summary`, :mod:`.montecarlo` — rules of thumb, the CLI's summary,
  and the Monte Carlo check of the mean-field prediction.

scipy (Brent's root finder) is imported on first use only.
"""

from __future__ import annotations

from .finite_width import ratio_moment, width_spread
from .gated import chrono_forget_bias, gated_memory, gated_memory_efold
from .inits import InitVariance, he_init, pytorch_default_init, xavier_init
from .isometry import JacobianMoments, jacobian_moments, jacobian_spread, spectrum_moments
from .meanfield import (
    c_star,
    chi1,
    chi_c,
    correlation_map,
    critical_weight_var,
    depth_scale,
    fixed_point,
    gaussian_expectation,
    length_map,
    length_map_slope,
    predict_error_profile,
    predict_error_ratio,
    predict_log10_error_ratio,
)
from .model import Comparison, LayerPrediction, Prediction, compare, describe, predict
from .montecarlo import ErrorRatioMeasurement, build_mlp, measure_error_ratio
from .residual import branch_gain, residual_growth
from .summary import TheorySummary, plot_error_profiles, render_summary, summary

__all__ = [
    "Comparison",
    "ErrorRatioMeasurement",
    "InitVariance",
    "JacobianMoments",
    "LayerPrediction",
    "Prediction",
    "TheorySummary",
    "branch_gain",
    "build_mlp",
    "c_star",
    "chi1",
    "chi_c",
    "chrono_forget_bias",
    "compare",
    "correlation_map",
    "critical_weight_var",
    "depth_scale",
    "describe",
    "fixed_point",
    "gated_memory",
    "gated_memory_efold",
    "gaussian_expectation",
    "he_init",
    "jacobian_moments",
    "jacobian_spread",
    "length_map",
    "length_map_slope",
    "measure_error_ratio",
    "plot_error_profiles",
    "predict",
    "predict_error_profile",
    "predict_error_ratio",
    "predict_log10_error_ratio",
    "pytorch_default_init",
    "ratio_moment",
    "render_summary",
    "residual_growth",
    "spectrum_moments",
    "summary",
    "width_spread",
    "xavier_init",
]
