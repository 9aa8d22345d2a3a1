"""Independent computations the Probe is checked against: plain autograd, no hooks of ours."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn


def first_tensor(out: object) -> Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    assert isinstance(out, Tensor)
    return out


def capture_outputs(model: nn.Module, names: list[str], run) -> tuple[Tensor, dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """Run ``run()`` (returns the loss) while keeping each named module's outputs and inputs.

    Uses temporary forward hooks that only *store* tensors (no statistics), then removes them.
    """
    outputs: dict[str, list[Tensor]] = defaultdict(list)
    inputs: dict[str, list[Tensor]] = defaultdict(list)
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def hook(m, args, out, _name=name):
            outputs[_name].append(first_tensor(out))
            if args and isinstance(args[0], Tensor):
                inputs[_name].append(args[0])
        handles.append(modules[name].register_forward_hook(hook))
    try:
        loss = run()
    finally:
        for h in handles:
            h.remove()
    return loss, outputs, inputs


def error_norms(loss: Tensor, outputs: dict[str, list[Tensor]]) -> dict[str, float]:
    """‖dL/d(output)‖ per module (root of the summed squares over its calls), by autograd.grad."""
    names = [n for n, outs in outputs.items() if any(o.requires_grad for o in outs)]
    flat = [o for n in names for o in outputs[n]]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    result: dict[str, float] = {}
    i = 0
    for n in names:
        total = 0.0
        for _ in outputs[n]:
            g = grads[i]
            i += 1
            if g is not None:
                total += float(torch.linalg.vector_norm(g.double()) ** 2)
        result[n] = total**0.5
    return result


def param_grad_norms(model: nn.Module) -> dict[str, float]:
    """torch.linalg.vector_norm of each parameter's .grad, where there is one."""
    return {
        n: float(torch.linalg.vector_norm(p.grad))
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """How many hooks of each kind every module has (to check close() leaves none)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return {n: tuple(len(getattr(m, k, {})) for k in kinds) for n, m in model.named_modules()}
