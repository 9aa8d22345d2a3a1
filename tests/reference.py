"""Independent computations the Probe is checked against: plain autograd, no hooks of ours."""

from __future__ import annotations

import copy
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


def recurrent_carry_gates(module: nn.Module, x: Tensor, hx: object = None) -> list[Tensor]:
    """Every carry gate of a gated recurrent module's call, by a hand-written float64 loop.

    The LSTM's forget gates f and the GRU's update gates z, one tensor ``[T, B, H]`` per
    layer and direction (input layer first, forward before reverse), computed by running
    the whole recurrence step by step from the module's parameters: no torch kernel of
    the module, nothing of gradprobe. ``x`` is ``[T, B, F]`` (sequence first); ``hx`` as
    the module takes it, sequence-first shapes, or ``None``.
    """
    p = {n: w.detach().double() for n, w in module.named_parameters()}
    lstm = isinstance(module, (nn.LSTM, nn.LSTMCell))
    cell = isinstance(module, (nn.LSTMCell, nn.GRUCell))
    layers = 1 if cell else module.num_layers
    directions = 2 if (not cell and module.bidirectional) else 1
    hidden = module.hidden_size
    h_out = getattr(module, "proj_size", 0) or hidden
    length, batch = x.shape[0], x.shape[1]
    if hx is None:
        h0 = torch.zeros(layers * directions, batch, h_out, dtype=torch.float64)
        c0 = torch.zeros(layers * directions, batch, hidden, dtype=torch.float64)
    elif lstm:
        h0, c0 = (t.detach().double().reshape(layers * directions, batch, -1) for t in hx)
    else:
        h0 = hx.detach().double().reshape(layers * directions, batch, -1)
        c0 = None
    gates: list[Tensor] = []
    layer_in = x.detach().double()
    for layer in range(layers):
        outs = []
        for d in range(directions):
            sfx = "" if cell else f"_l{layer}" + ("_reverse" if d else "")

            def w(kind: str, _sfx: str = sfx) -> Tensor:
                return p.get(f"{kind}{_sfx}", torch.zeros(()))

            h = h0[layer * directions + d]
            c = c0[layer * directions + d] if c0 is not None else None
            order = range(length) if d == 0 else reversed(range(length))
            hs = [torch.zeros(0)] * length
            fs = [torch.zeros(0)] * length
            for t in order:
                a = layer_in[t] @ w("weight_ih").T + w("bias_ih")
                b = h @ w("weight_hh").T + w("bias_hh")
                if lstm:
                    i, f, g, o = (a + b).chunk(4, dim=-1)
                    f = torch.sigmoid(f)
                    c = f * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    if f"weight_hr{sfx}" in p:
                        h = h @ p[f"weight_hr{sfx}"].T
                    fs[t] = f
                else:
                    ar, az, an = a.chunk(3, dim=-1)
                    br, bz, bn = b.chunk(3, dim=-1)
                    r, z = torch.sigmoid(ar + br), torch.sigmoid(az + bz)
                    n = torch.tanh(an + r * bn)
                    h = (1 - z) * n + z * h
                    fs[t] = z
                hs[t] = h
            gates.append(torch.stack(fs))
            outs.append(torch.stack(hs))
        layer_in = torch.cat(outs, dim=-1)
    return gates


def leaf_error_norms(model: nn.Module, x: Tensor, float64: bool = False) -> dict[str, tuple[float, float]]:
    """‖dL/d(output)‖ and ‖dL/d(input)‖ of every leaf module for the loss mean(model(x)²),
    by autograd on a twin (float64 if asked) whose ReLUs do not work in place (the same
    function; its tensors stay readable). NaN for an input that needs no gradient."""
    twin = copy.deepcopy(model)
    if float64:
        twin, x = twin.double(), x.double()
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    names = [n for n, m in twin.named_modules() if n and not list(m.children())]
    ins: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}

    def keep(name):
        def hook(m, args, y):
            if args[0].requires_grad:
                args[0].retain_grad()
                ins[name] = args[0]
            y.retain_grad()
            outs[name] = y

        return hook

    modules = dict(twin.named_modules())
    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    twin(x).pow(2).mean().backward()
    for h in handles:
        h.remove()
    return {
        n: (
            float(outs[n].grad.double().norm()),
            float(ins[n].grad.double().norm()) if n in ins else float("nan"),
        )
        for n in names
    }
