"""The test's own record of a model's trained calls, to check the Probe against: outputs
kept as float64 by plain forward hooks, ‖dL/d(output)‖² by ``autograd.grad``, per step."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn


class Recorder:
    """The test's own record of every trained call of the leaf modules: outputs as float64
    and ‖dL/d(output)‖² by autograd.grad, per step; calls inside a transform skipped."""

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, m in model.named_modules() if not list(m.children())]
        self.outputs: dict[str, list[Tensor]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)
        self.err_sq: dict[str, float] = defaultdict(float)
        self.empty: dict[str, int] = defaultdict(int)
        self.mixed = 0  # (step, module)s with an empty call beside one with entries
        self._live: list[tuple[str, Tensor]] = []
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def keep(module, args, out):
            if torch._C._functorch.peek_interpreter_stack() is not None:
                return
            self.calls[name] += 1
            self.empty[name] += out.numel() == 0
            if out.numel():
                self.outputs[name].append(out.detach().double())
            if out.requires_grad:
                self._live.append((name, out))

        return keep

    def backward(self, loss: Tensor) -> None:
        live, self._live = self._live, []
        tensors = [t for _, t in live]
        grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
        for (name, t), g in zip(live, grads):
            if t.numel() and g is not None:  # (None: no gradient reached it, as argmax's)
                self.err_sq[name] += float(g.double().pow(2).sum())
        loss.backward()

    def step_stats(self) -> dict[tuple[str, str], float | None]:
        """The step's statistics; ``None`` where the Probe must have no row."""
        ref: dict[tuple[str, str], float | None] = {}
        for name in self.names:
            outs = self.outputs.get(name, [])
            self.mixed += bool(outs) and self.empty[name] > 0
            flat = torch.cat([o.reshape(-1) for o in outs]) if outs else None
            ref[(name, "calls")] = float(self.calls[name]) if self.calls[name] else None
            ref[(name, "act_mean")] = float(flat.mean()) if flat is not None else None
            ref[(name, "act_std")] = float(flat.std(unbiased=False)) if flat is not None else None
            ref[(name, "zero_frac")] = float((flat == 0).double().mean()) if outs else None
            reached = name in self.err_sq
            ref[(name, "error_norm")] = math.sqrt(self.err_sq[name]) if reached else None
            if outs and outs[0].dim() == 2:  # features: dead if 0 in every row of every call
                alive = torch.stack([(o != 0).any(dim=0) for o in outs]).any(dim=0)
                ref[(name, "dead_frac")] = float((~alive).double().mean())
        self.outputs.clear()
        self.empty.clear()
        self.calls.clear()
        self.err_sq.clear()
        return ref

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
