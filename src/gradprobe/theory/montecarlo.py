"""Monte Carlo check of the mean-field error-ratio prediction on real float64 networks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..activations import Activation
from ..errors import GradprobeError
from .meanfield import (
    ActivationLike,
    Params,
    _check_depth,
    _check_q0,
    _check_variances,
    _resolve,
    predict_log10_error_ratio,
)

__all__ = ["ErrorRatioMeasurement", "build_mlp", "measure_error_ratio"]
# ---------------------------------------------------------------- theory against measurement


@dataclass(frozen=True)
class ErrorRatioMeasurement:
    """Predicted and measured log10 ‖δ^1‖/‖δ^depth‖ for one configuration at init.

    ``measured_log10`` is the mean over seeds of each seed's log10 ratio;
    ``measured_std`` their standard deviation (finite-width fluctuation).
    """

    activation: str
    weight_var: float
    bias_var: float
    depth: int
    width: int
    predicted_log10: float
    measured_log10: float
    measured_std: float
    per_seed: tuple[float, ...]


class _Elementwise(torch.nn.Module):
    """A registered activation with explicit parameters, as a module."""

    def __init__(self, act: Activation, params: Mapping[str, Any]) -> None:
        super().__init__()
        self.act, self.act_params = act, dict(params)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(z, self.act_params)


def build_mlp(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    depth: int,
    width: int = 256,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    params: Params = None,
) -> torch.nn.Sequential:
    """``depth`` × (Linear(width, width) → φ), then Linear(width, 1), initialised as in the theory.

    Weights ~ N(0, σ_w²/fan_in), biases ~ N(0, σ_b²). The hidden Linears are the
    modules named "0", "2", …, "2·(depth−1)" in ``named_modules()``.
    """
    act = _resolve(activation)
    _check_variances(weight_var, bias_var)
    _check_depth(depth)
    layers: list[torch.nn.Module] = []
    for i in range(depth + 1):
        lin = torch.nn.Linear(width, 1 if i == depth else width, dtype=dtype)
        with torch.no_grad():
            lin.weight.normal_(0.0, math.sqrt(weight_var / width), generator=generator)
            lin.bias.normal_(0.0, math.sqrt(bias_var), generator=generator)
        layers.append(lin)
        if i < depth:
            layers.append(_Elementwise(act, params) if params else act.module_types[0]())
    return torch.nn.Sequential(*layers).to(dtype)


def measure_error_ratio(
    activation: ActivationLike,
    weight_var: float,
    bias_var: float,
    depth: int,
    width: int = 256,
    batch: int = 16,
    seeds: Sequence[int] = (0, 1, 2, 3),
    q0: float = 1.0,
    *,
    params: Params = None,
) -> ErrorRatioMeasurement:
    """Monte Carlo check of :func:`predict_log10_error_ratio` with plain autograd.

    For each seed: build :func:`build_mlp` (float64), feed inputs with entries
    ~ N(0, q0), take loss = sum of the read-out, and measure ‖dL/dh^1‖/‖dL/dh^depth‖
    at the outputs of the first and last hidden Linears (norms over the whole batch,
    as the Probe's ``error_norm``). Returns the mean and spread of the seeds' log10
    ratios beside the prediction.
    """
    act = _resolve(activation)
    _check_depth(depth)
    _check_q0(q0)
    if len(seeds) == 0:
        raise GradprobeError("need at least one seed", "pass e.g. seeds=(0, 1, 2, 3)")
    predicted = predict_log10_error_ratio(act, weight_var, bias_var, depth, q0, params=params)
    logs = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        model = build_mlp(act, weight_var, bias_var, depth, width, generator=gen, params=params)
        x = torch.randn(batch, width, generator=gen, dtype=torch.float64) * math.sqrt(q0)
        outputs: dict[int, torch.Tensor] = {}
        h = x
        for i, layer in enumerate(model):
            h = layer(h)
            if isinstance(layer, torch.nn.Linear) and i < 2 * depth:
                h.retain_grad()
                outputs[i] = h
        h.sum().backward()
        first = outputs[0].grad
        last = outputs[2 * (depth - 1)].grad
        assert first is not None and last is not None
        logs.append(float(torch.log10(first.norm() / last.norm())))
    arr = np.array(logs)
    return ErrorRatioMeasurement(
        activation=act.name,
        weight_var=float(weight_var),
        bias_var=float(bias_var),
        depth=depth,
        width=width,
        predicted_log10=predicted,
        measured_log10=float(arr.mean()),
        measured_std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        per_seed=tuple(logs),
    )
