"""The theory read off the user's own model, and set beside a recorded run.

:func:`predict` reads a model's structure and its actual weights — σ_w² = fan_in·E[W²]
and σ_b² = E[b²] measured from the tensors, each activation, orthogonal or Gaussian
weights (from WWᵀ), residual branches and their scale α — and predicts, at
initialisation, the error signal's norm at the output of every ``nn.Linear`` relative
to the last one (the read-out), from the output down:

* forward, the per-entry second moment m goes m ← σ_w² m + σ_b² through a Linear,
  m ← E[φ(√m z)²] through an activation and m ← m (1 + α²g) through a residual block
  (:mod:`.meanfield`, :mod:`.residual`);
* backward, the squared error norm is multiplied by σ_w² through a Linear (Wᵀ has
  fan_in·Var(W) = σ_w²), by E[φ'(√m z)²] through an activation (m the activation's
  input), and a residual block adds its branch's contribution α²·(branch gain) to the
  identity's 1 (the cross term has zero mean).

Where the model holds anything else (convolutions, normalisation, attention, recurrent
layers, a combination of tensors that is neither a chain nor x + α·f(x)), the prediction
says so and predicts nothing (``covered`` False, with the reason).

Two ways to read the structure:

* :func:`predict` with an example input runs one forward (no grad, the RNG restored) with
  hooks on every module, so custom ``forward`` methods, functional activations and
  residual blocks are seen as they run;
* :func:`describe` reads ``nn.Sequential`` trees without running anything: what the
  Probe stores in a run's meta (``meta["theory"]``) when it is built, so that
  :func:`compare` can set the prediction beside the run's first recorded steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..activations import activation_of, get_activation
from ..errors import GradprobeError
from .meanfield import _chi, _moments

__all__ = ["Comparison", "LayerPrediction", "Prediction", "compare", "describe", "predict"]

# WWᵀ (or WᵀW, the smaller) within this of c·I, relative to c, counts as orthogonal: float32
# rounding of an orthogonal matrix leaves ~1e-6·√n; a Gaussian one is off by ~1/√fan.
_ORTHO_RTOL = 1e-4
# Orthogonality is checked on this many rows (or columns) of each weight.
_ORTHO_ROWS = 64
# Modules that compute nothing at initialisation in eval and in train mode alike.
_IDENTITY = (nn.Identity, nn.Flatten)
# A residual fit y ≈ x + α·f(x), or a functional activation, holds to this (float32 rounding).
_FIT_RTOL = 1e-5


class _Outside(Exception):
    """The model holds something the theory does not cover (the message says what)."""


# ---------------------------------------------------------------- reading layers


def _mean_square(t: torch.Tensor) -> float:
    """E[t²] by a reduction (no float64 copy of a large weight on the user's device)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    norm = float(torch.linalg.vector_norm(t.detach(), dtype=acc))
    return norm * norm / max(t.numel(), 1)


def _linear_op(name: str, m: nn.Linear) -> dict[str, Any]:
    if type(m.weight).__name__ == "DTensor" or m.weight.is_meta:
        # reading a shard's statistics would take a collective: not done at construction
        raise _Outside(f"{name}: its weights are sharded or not materialised (not read)")
    fan_out, fan_in = m.weight.shape
    weight_var = fan_in * _mean_square(m.weight)
    bias_var = 0.0 if m.bias is None else _mean_square(m.bias)
    if not (math.isfinite(weight_var) and math.isfinite(bias_var)):
        raise _Outside(f"{name}: its weights or biases are not finite")
    if weight_var == 0.0:
        raise _Outside(f"{name}: its weights are all zero (no signal passes at init)")
    w = m.weight.detach()[:_ORTHO_ROWS].double() if fan_out <= fan_in else None
    if w is None:
        w = m.weight.detach()[:, :_ORTHO_ROWS].double().T
    orthogonal: bool | None = None
    k = w.shape[0]
    if k > 1:
        # The first k rows (columns of a tall W) of an orthogonal W are orthonormal times c;
        # a Gaussian W's are off by ~c/√fan. k ≤ 64 keeps the check at k²·fan flops.
        g = w @ w.T
        c = float(torch.diagonal(g).mean())
        orthogonal = bool(
            (g - c * torch.eye(k, dtype=g.dtype, device=g.device)).abs().max() <= _ORTHO_RTOL * c
        )
    return {
        "op": "linear",
        "name": name,
        "fan_in": int(fan_in),
        "fan_out": int(fan_out),
        "weight_var": weight_var,
        "bias_var": bias_var,
        "orthogonal": orthogonal,
    }


def _act_op(name: str, m: nn.Module) -> dict[str, Any] | None:
    act = activation_of(m)
    if act is None or act.name == "softmax":
        return None
    params = {k: float(v) for k, v in act.params(m).items() if isinstance(v, (int, float))}
    return {"op": "act", "name": name, "activation": act.name, "params": params}


def _leaf_op(name: str, m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return _linear_op(name, m)
    if isinstance(m, _IDENTITY) or (isinstance(m, nn.Dropout) and (m.p == 0 or not m.training)):
        return {"op": "identity", "name": name}
    op = _act_op(name, m)
    if op is not None:
        return op
    raise _Outside(
        f"{name or 'the model'} is a {type(m).__name__}: the theory here covers Linear layers, "
        "element-wise activations and residual branches"
    )


def _static(module: nn.Module, name: str) -> list[dict[str, Any]]:
    if isinstance(module, nn.Sequential):
        ops: list[dict[str, Any]] = []
        for child_name, child in module.named_children():
            ops += _static(child, f"{name}.{child_name}" if name else child_name)
        return ops
    if list(module.children()):
        raise _Outside(
            f"{name or 'the model'} ({type(module).__name__}) has its own forward: its structure "
            "is known only by running it (theory.predict(model, example_input))"
        )
    return [_leaf_op(name, module)]


def describe(model: nn.Module) -> dict[str, Any]:
    """The model's structure and init statistics as plain JSON, without running it.

    ``{"covered": True, "ops": [...]}`` for ``nn.Sequential`` trees of Linear layers,
    activations and identities; otherwise ``{"covered": False, "reason": ...}``.
    """
    try:
        with torch.no_grad():
            ops = _static(model, "")
        _check_ops(ops)
    except _Outside as out:
        return {"covered": False, "reason": str(out)}
    except Exception as exc:  # sharded or meta-device weights, say: no prediction, no error
        return {"covered": False, "reason": f"the weights could not be read ({type(exc).__name__})"}
    return {"covered": True, "ops": ops}


# ---------------------------------------------------------------- reading a forward


@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None
    children: list[_Call] = field(default_factory=list)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    return None


@contextlib.contextmanager
def _traced(model: nn.Module) -> Iterator[list[_Call]]:
    roots: list[_Call] = []
    stack: list[_Call] = []
    handles = []

    def pre(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            call = _Call(name, module, _first_tensor(args))
            (stack[-1].children if stack else roots).append(call)
            stack.append(call)

        return hook

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop().out = _first_tensor(output)

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post))
    try:
        yield roots
    finally:
        for h in handles:
            h.remove()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(a.detach().double().norm()) + float(b.detach().double().norm()) + 1e-300
    return float((a.detach().double() - b.detach().double()).norm()) <= _FIT_RTOL * scale


def _functional_act(src: torch.Tensor, dst: torch.Tensor) -> str | None:
    """The registered activation φ with dst = φ(src), if one is (F.relu in a forward)."""
    for name in ("relu", "tanh", "sigmoid", "gelu", "silu", "elu", "softplus", "softsign", "selu"):
        act = get_activation(name)
        if _close(act(src.detach().double()).to(dst.dtype), dst):
            return act.name
    return None


def _interpret(call: _Call) -> list[dict[str, Any]]:
    if call.inp is None or call.out is None:
        raise _Outside(f"{call.name or 'the model'}: no tensor input or output")
    if not call.children:
        return [_leaf_op(call.name, call.module)]
    ops: list[dict[str, Any]] = []
    cur = call.inp
    for child in call.children:
        if child.inp is None:
            raise _Outside(f"{child.name}: no tensor input")
        if not _same(child.inp, cur):
            act = _functional_act(cur, child.inp)
            if act is None:
                raise _Outside(
                    f"{child.name} does not take its predecessor's output: the forward combines "
                    "tensors in a way the theory does not cover (only chains and x + α·f(x))"
                )
            ops.append(
                {"op": "act", "name": f"{child.name}:input", "activation": act, "params": {}}
            )
        ops += _interpret(child)
        cur = child.out  # type: ignore[assignment]
    if _same(call.out, cur):
        return ops
    act = _functional_act(cur, call.out)
    if act is not None:
        return [*ops, {"op": "act", "name": f"{call.name}:output", "activation": act, "params": {}}]
    x, y, f = call.inp.detach().double(), call.out.detach().double(), cur.detach().double()
    if x.shape == y.shape == f.shape:
        alpha = float((f * (y - x)).sum() / (f * f).sum().clamp_min(1e-300))
        if _close(x + alpha * f, y):
            return [{"op": "residual", "name": call.name, "alpha": alpha, "branch": ops}]
    raise _Outside(
        f"{call.name or 'the model'} ({type(call.module).__name__}) returns neither its last "
        "submodule's output nor x + α·f(x): not covered"
    )


def _check_ops(ops: list[dict[str, Any]]) -> None:
    names = [op["name"] for op in _flat(ops) if op["op"] == "linear"]
    if not names:
        raise _Outside("the model has no Linear layer")
    if len(set(names)) < len(names):
        raise _Outside("a Linear layer is called more than once (shared weights): not covered")


def _flat(ops: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for op in ops:
        yield op
        if op["op"] == "residual":
            yield from _flat(op["branch"])


# ---------------------------------------------------------------- the prediction


def _summary_layers(ops: list[dict[str, Any]]) -> list[str]:
    """The Linears whose consecutive ratios make "per layer": the last Linear of each
    residual branch (one per block) where there are two or more blocks, else every Linear
    but the read-out (its few outputs make its own ratio noisy)."""
    branch_ends = []
    for op in _flat(ops):
        if op["op"] == "residual":
            inner = [o["name"] for o in _flat(op["branch"]) if o["op"] == "linear"]
            if inner:
                branch_ends.append(inner[-1])
    if len(branch_ends) > 1:
        return branch_ends
    names = [op["name"] for op in _flat(ops) if op["op"] == "linear"]
    return names[:-1] if len(names) > 2 else names


def _per_layer(rel: dict[str, float], ops: list[dict[str, Any]]) -> float | None:
    """The geometric mean factor ‖δ‖ lower / ‖δ‖ upper over :func:`_summary_layers`."""
    names = _summary_layers(ops)
    if len(names) < 2:
        return None
    return 10 ** ((rel[names[0]] - rel[names[-1]]) / (len(names) - 1))


@dataclass(frozen=True)
class LayerPrediction:
    """One ``nn.Linear``: its measured init statistics and its predicted error norm,
    log10 ‖δ‖ relative to the last Linear (the read-out); ``factor`` is ‖δ‖ here over ‖δ‖
    at the next Linear up (``None`` for the last)."""

    name: str
    weight_var: float
    bias_var: float
    orthogonal: bool | None
    log10_error: float
    factor: float | None


@dataclass(frozen=True)
class Prediction:
    """What the theory predicts for a model at init, or why it predicts nothing.

    ``per_layer``: the geometric mean factor per layer (per block in a residual net, see
    :func:`_summary_layers`); ``forward_growth``: predicted mean
    square of the output over that of the input; ``q0`` the input's mean square used.
    """

    covered: bool
    reason: str | None = None
    layers: tuple[LayerPrediction, ...] = ()
    per_layer: float | None = None
    forward_growth: float | None = None
    q0: float | None = None
    residual_blocks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if not self.covered:
            return f"theory: outside what it covers ({self.reason})"
        return f"theory: ×{self.per_layer:.3g} per layer" if self.per_layer else "theory: one layer"


def _walk_forward(ops: list[dict[str, Any]], m: float, q1: float | None) -> float:
    """Annotate each op with the mean square at its input (``_m``); returns the output's."""
    for op in ops:
        op["_m"] = m
        kind = op["op"]
        if kind == "linear":
            if q1 is not None:  # the first Linear's output as measured
                m, q1 = q1, None
            else:
                m = op["weight_var"] * m + op["bias_var"]
        elif kind == "act":
            act = get_activation(op["activation"])
            m = _moments(act, m, op.get("params") or None)[0]
        elif kind == "residual":
            branch_out = _walk_forward(op["branch"], m, q1)
            q1 = None
            m = m + op["alpha"] ** 2 * branch_out
    return m


def _walk_backward(ops: list[dict[str, Any]], log_e: float, at: dict[str, float]) -> float:
    """From ln‖δ‖² at the output of ``ops`` to that at their input, noting each Linear's."""
    for op in reversed(ops):
        kind = op["op"]
        if kind == "linear":
            at[op["name"]] = log_e
            log_e += math.log(op["weight_var"])
        elif kind == "act":
            act = get_activation(op["activation"])
            chi = _chi(act, 1.0, op["_m"], op.get("params") or None)
            if chi <= 0:
                raise _Outside(f"{op['name']}: φ' is 0 at init, no error signal passes")
            log_e += math.log(chi)
        elif kind == "residual":
            alpha2 = op["alpha"] ** 2
            if alpha2 == 0:
                continue
            branch = _walk_backward(op["branch"], log_e + math.log(alpha2), at)
            log_e = log_e + math.log1p(math.exp(branch - log_e))
    return log_e


def _from_ops(ops: list[dict[str, Any]], q0: float, q1: float | None = None) -> Prediction:
    import copy

    ops = copy.deepcopy(ops)
    out_m = _walk_forward(ops, q0, q1)
    at: dict[str, float] = {}
    _walk_backward(ops, 0.0, at)
    linears = [op for op in _flat(ops) if op["op"] == "linear"]
    last = at[linears[-1]["name"]]
    rel = [(at[op["name"]] - last) / (2 * math.log(10)) for op in linears]
    layers = tuple(
        LayerPrediction(
            name=op["name"],
            weight_var=op["weight_var"],
            bias_var=op["bias_var"],
            orthogonal=op["orthogonal"],
            log10_error=rel[i],
            factor=10 ** (rel[i] - rel[i + 1]) if i + 1 < len(rel) else None,
        )
        for i, op in enumerate(linears)
    )
    per_layer = _per_layer(dict(zip([op["name"] for op in linears], rel, strict=True)), ops)
    return Prediction(
        covered=True,
        layers=layers,
        per_layer=per_layer,
        forward_growth=out_m / q0 if q0 > 0 else None,
        q0=q0,
        residual_blocks=sum(op["op"] == "residual" for op in _flat(ops)),
    )


def predict(model: nn.Module, example_input: torch.Tensor | None = None) -> Prediction:
    """Predict the error signal at every ``nn.Linear`` of ``model`` at its current weights.

    With ``example_input`` the model is run once (under ``no_grad``, the RNG state restored,
    hooks removed after) to read its structure, and the input's mean square is q0;
    without, only ``nn.Sequential`` trees are read and q0 = 1 (standardised data).
    A model outside the theory gives ``covered=False`` and the reason; never raises for
    a model the theory does not cover.
    """
    if not isinstance(model, nn.Module):
        raise GradprobeError(f"expected an nn.Module, got {type(model).__name__}")
    try:
        if example_input is None:
            spec = describe(model)
            if not spec["covered"]:
                return Prediction(covered=False, reason=spec["reason"])
            ops, q0 = spec["ops"], 1.0
        else:
            if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
                raise GradprobeError("example_input must be a floating-point tensor")
            for name, m in model.named_modules():
                if list(m.buffers(recurse=False)) or isinstance(m, nn.modules.batchnorm._NormBase):
                    raise _Outside(
                        f"{name or 'the model'} ({type(m).__name__}) keeps buffers "
                        "(normalisation statistics): not covered"
                    )
            try:
                dev = example_input.device
                cuda = [dev.index if dev.index is not None else 0] if dev.type == "cuda" else []
                with torch.no_grad(), torch.random.fork_rng(devices=cuda), _traced(model) as roots:
                    model(example_input)
            except Exception as exc:
                raise GradprobeError(
                    f"the model's forward failed on example_input ({type(exc).__name__}: {exc})",
                    "pass an input the model takes, e.g. one batch of training data",
                ) from exc
            if len(roots) != 1:
                raise _Outside("the model's forward did not run as one call")
            with torch.no_grad():
                ops = _interpret(roots[0])
            _check_ops(ops)
            q0 = float(example_input.detach().double().pow(2).mean())
        return _from_ops(ops, q0)
    except _Outside as out:
        return Prediction(covered=False, reason=str(out))


# ---------------------------------------------------------------- beside a recorded run


@dataclass(frozen=True)
class Comparison:
    """Predicted beside measured: per Linear, log10 ‖δ‖ relative to the last Linear; the
    per-layer factors (geometric means over the hidden layers); ``step`` the recorded
    step measured, ``line`` the sentence for diagnose and the report."""

    covered: bool
    reason: str | None = None
    step: int | None = None
    names: tuple[str, ...] = ()
    predicted_log10: tuple[float, ...] = ()
    measured_log10: tuple[float, ...] = ()
    predicted_per_layer: float | None = None
    measured_per_layer: float | None = None
    line: str = ""


def compare(run: Any) -> Comparison:
    """The prediction stored in ``run.meta["theory"]`` beside the run's first recorded step.

    The first Linear's measured output mean square (``act_mean``² + ``act_std``² at that
    step, when recorded) sets q¹, so the input's scale need not be known; the error norms
    are the Probe's ``error_norm`` of each Linear at the first step that has them all.
    """
    spec = (getattr(run, "meta", None) or {}).get("theory")
    if not spec:
        return Comparison(False, "the run holds no theory prediction (recorded before it existed)")
    if not spec.get("covered"):
        return Comparison(
            False, spec.get("reason"), line=f"theory: not covered ({spec.get('reason')})"
        )
    ops = spec["ops"]
    names = [op["name"] for op in _flat(ops) if op["op"] == "linear"]
    stats = set(run.stats) if not run.empty else set()
    if "error_norm" not in stats:
        return Comparison(False, "the run recorded no error_norm")
    err = run.table("error_norm")
    if not set(names) <= set(err.columns):
        return Comparison(False, "the run's error_norm lacks some Linear layers")
    rows = err[names].dropna()
    rows = rows[(rows > 0).all(axis=1)]
    if rows.empty:
        return Comparison(False, "no recorded step has every Linear's error_norm")
    step = int(rows.index[0])
    q1 = None
    if {"act_mean", "act_std"} <= stats:
        mean, std = run.table("act_mean"), run.table("act_std")
        if names[0] in mean.columns and step in mean.index and step in std.index:
            q1 = float(mean.loc[step, names[0]] ** 2 + std.loc[step, names[0]] ** 2)
            q1 = q1 if math.isfinite(q1) and q1 > 0 else None
    try:
        pred = _from_ops(ops, 1.0, q1)
    except _Outside as out:
        return Comparison(False, str(out))
    norms = rows.iloc[0]
    measured = [math.log10(float(norms[n]) / float(norms[names[-1]])) for n in names]
    predicted = [lay.log10_error for lay in pred.layers]
    p = _per_layer(dict(zip(names, predicted, strict=True)), ops)
    m = _per_layer(dict(zip(names, measured, strict=True)), ops)
    line = (
        f"theory: ×{p:.3g} per layer; measured at step {step}: ×{m:.3g}"
        if p is not None and m is not None
        else ""
    )
    return Comparison(
        True,
        step=step,
        names=tuple(names),
        predicted_log10=tuple(predicted),
        measured_log10=tuple(measured),
        predicted_per_layer=p,
        measured_per_layer=m,
        line=line,
    )
