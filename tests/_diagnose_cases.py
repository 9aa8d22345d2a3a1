"""Built-to-fail and built-to-pass training runs for the diagnosis, plots and report tests.

Each case trains a small model for a few steps under a real Probe (widths of 32, batches
of 32, single-threaded), so a case costs well under a second. Cases are cached per
process: several test files read the same runs.

Also: :func:`synthetic_run`, a Run built from a hand-written frame, for detector edge
cases that no training produces on demand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.lab.data import adding_split, digits
from gradprobe.lab.models import RecurrentModel, cnn, mlp, residual_mlp
from gradprobe.run import Run

torch.set_num_threads(1)

ce = nn.functional.cross_entropy
mse = nn.functional.mse_loss


@functools.lru_cache(maxsize=1)
def _digits() -> Any:
    return digits(seed=0)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *,
    steps: int = 6,
    lr: float = 0.1,
    batch: int = 32,
    stats: str = "default",
    dead_window: int = 10,
    store: Any = None,
    label: str | None = None,
    before_step: Callable[[int, nn.Module], None] | None = None,
) -> Run:
    """Plain SGD on consecutive batches under a Probe; the recorded Run."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with Probe(model, opt, stats=stats, dead_window=dead_window, store=store, label=label) as probe:
        for s in range(steps):
            if before_step is not None:
                before_step(s, model)
            idx = torch.arange(s * batch, (s + 1) * batch) % len(x)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return probe.run()


def _digits_run(model: nn.Module, **kw: Any) -> Run:
    d = _digits()
    x = d.x_train.reshape(-1, 1, 8, 8) if kw.pop("images", False) else d.x_train
    return train(model, x, d.y_train, ce, **kw)


@functools.cache
def case(name: str) -> Run:
    """The run of a named case (see CASES)."""
    torch.manual_seed(0)
    return CASES[name]()


def _nan_at(step: int, layer: str) -> Callable[[int, nn.Module], None]:
    def inject(s: int, model: nn.Module) -> None:
        if s == step:
            with torch.no_grad():
                getattr(model, layer).weight[0, 0] = float("nan")

    return inject


def _dead_channel(channel: int) -> nn.Module:
    model = cnn(channels=8, depth=3, activation="relu", init="he")
    with torch.no_grad():  # a bias this negative keeps the channel below 0 everywhere
        model.conv2.bias[channel] = -100.0
    return model


def _exploding_rnn() -> Run:
    data = adding_split(256, 64, 40)
    model = RecurrentModel("rnn", 2, 32, 1, nonlinearity="tanh")
    with torch.no_grad():  # an orthogonal matrix ×3: the largest recurrent weight we could want
        nn.init.orthogonal_(model.rnn.weight_hh_l0, gain=3.0)
    return train(model, data.x_train, data.y_train, mse, steps=8, lr=0.01)


CASES: dict[str, Callable[[], Run]] = {
    # built to fail
    "sigmoid30": lambda: _digits_run(mlp(64, 10, depth=30, width=32, activation="sigmoid")),
    "tanh30_var4": lambda: _digits_run(
        mlp(64, 10, depth=30, width=32, activation="tanh", weight_var=4.0)
    ),
    "tanh_saturated": lambda: _digits_run(
        mlp(64, 10, depth=4, width=32, activation="tanh", weight_var=25.0)
    ),
    "rnn_large": _exploding_rnn,
    "relu_bias_dead": lambda: _digits_run(
        mlp(64, 10, depth=4, width=32, activation="relu", init="he", bias=-10.0), steps=12
    ),
    "cnn_dead_channel": lambda: _digits_run(_dead_channel(3), images=True, steps=12),
    "nan_injected": lambda: _digits_run(
        mlp(64, 10, depth=6, width=32, activation="relu", init="he"), before_step=_nan_at(3, "fc4")
    ),
    # built to pass
    "relu30_he": lambda: _digits_run(
        mlp(64, 10, depth=30, width=32, activation="relu", init="he"), steps=12
    ),
    "residual30": lambda: _digits_run(
        residual_mlp(64, 10, depth=30, width=32, activation="relu", init="he"), steps=12
    ),
    "cnn_healthy": lambda: _digits_run(
        cnn(channels=8, depth=3, activation="relu", init="he"), images=True, steps=12
    ),
}


def synthetic_run(
    rows: list[tuple[int, str, str, float]],
    modules: list[dict[str, Any]],
    parameters: list[dict[str, Any]] | None = None,
    **meta: Any,
) -> Run:
    """A Run from hand-written (step, name, stat, value) rows and module descriptions."""
    frame = pd.DataFrame(rows, columns=["step", "name", "stat", "value"])
    frame["step"] = frame["step"].astype(np.int64)
    frame["value"] = frame["value"].astype(np.float64)
    full_modules = [
        {"type": "Linear", "activation": None, "parameters": 10, "layout": "last", **m}
        for m in modules
    ]
    return Run(
        {
            "label": meta.pop("label", "synthetic"),
            "model": {"class": "Synthetic", "summary": meta.pop("summary", "")},
            "modules": full_modules,
            "parameters": parameters or [],
            "execution_order": [m["name"] for m in full_modules],
            "probe": {"dead_window": 10},
            "config": meta.pop("config", {}),
            **meta,
        },
        frame,
    )


def profile_rows(
    errors: list[float], steps: int = 3, stat: str = "error_norm"
) -> list[tuple[int, str, str, float]]:
    """Rows giving layer ``fc{i}`` the error ``errors[i]`` at every step."""
    return [(s, f"fc{i}", stat, e) for s in range(steps) for i, e in enumerate(errors)]


def linear_modules(n: int) -> list[dict[str, Any]]:
    return [{"name": f"fc{i}"} for i in range(n)]


def validate(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """The errors of ``instance`` against the JSON-schema subset FINDINGS_JSON_SCHEMA uses
    (type, required, properties, additionalProperties, items, enum, minLength)."""
    types = {
        "object": dict,
        "array": list,
        "string": str,
        "number": (int, float),
        "integer": int,
        "boolean": bool,
        "null": type(None),
    }
    errors: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        ok = isinstance(instance, types[expected]) and not (
            expected in ("number", "integer") and isinstance(instance, bool)
        )
        if not ok:
            return [f"{path}: expected {expected}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "minLength" in schema and len(instance) < schema["minLength"]:
        errors.append(f"{path}: shorter than {schema['minLength']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{path}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors
