"""The short route of a step the "auto" cadence does not record (its sentinel).

At such a step the Probe measures the gradients' norms (before clipping, at the end of
backward, and as the optimizer applies them), their NaN/Inf flags and the learning rate,
and nothing else (docs/recording.md, "Cadence"). The general chain does that through the
events, guards and buffer entries every step goes through; on a model with short steps
that chain, not the one ``_foreach_norm``, was most of what the cadence cost (issue 26,
bench/PROFILE.md). :class:`SentinelRoute` does the same work on one short path, decided
when the step before closes:

- *armed* for a sentinel step of a plain run: not distributed or sharded, no enabled
  ``GradScaler`` watched, and the trainable parameters still in the model on one device
  in one dtype (the layout is looked at when the model is bound, or a parameter is found
  frozen or unfrozen, not at each step);
- at the end of a backward pass, one batched norm of the gradients, kept with their
  versions (:func:`.params.gradient_norms`, the function the general path calls: the
  rows are the same, bit for bit, as tests/test_sentinel_route.py checks against a
  Probe recording every step);
- at the optimizer step, those norms again if no gradient changed since (no clipping),
  else a new pass, written straight into the step's host arrays;
- anything else at an armed step (a gradient missing, a model that changed, a failure)
  hands what the route measured to :class:`.params.ParamStats` and goes the general way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..hooks import Site, at_backward_end
from ..reduce import float32_norms, nonfinite_flags
from .context import Context
from .params import grad_values, gradient_norms, nonfinite_counts, squared_total

__all__ = ["SentinelRoute"]

# The end of a backward pass at an armed step, queued by its first accumulation.
_BACKWARD_END_SITE = Site("the end of backward (the sentinel's norms)", "params")


def _backward_end_hook(owner: Any) -> None:
    owner.sentinel.backward_ended()


class SentinelRoute:
    """A sentinel step on one short path (see the module's docstring). ``params``: the
    general path (ParamStats), which takes over what the route cannot do; ``clock``: the
    spike watch and the burst after non-finite gradients."""

    def __init__(self, ctx: Context, params: Any, clock: Any) -> None:
        self.ctx = ctx
        self._params = params
        self._clock = clock
        self.armed = False  # this step goes the short route
        self.pending = False  # a backward's end is queued (read by the accumulation hook)
        # The bound parameters still in the model, when they allow the route (one device,
        # one dtype), their device and where in the buffer's arrays their rows go.
        self._plist: list[Tensor] | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._all: slice | list[int] = slice(0, 0)
        self._live: list[int] = []  # their places among the bound parameters
        self._frozen: list[Tensor] = []  # the others still in the model: no gradient expected
        self._stale = False  # the trainable set changed: laid out again (see _layout)
        # Norms of the last backward's gradients: (norms, finite, versions), or None.
        self._pre: tuple[Tensor, list[bool] | None, list[tuple[int, int]]] | None = None
        self._want_nonfinite = "nonfinite" in ctx.stats
        self._dense = False  # the gradients were seen dense (see _read)
        self._float32_cpu = False  # float32 on the CPU: the norms' screened path
        self._layout()
        ctx.on("step_closed", self._on_step_closed)
        ctx.on("step_discarded", self._on_step_discarded)
        ctx.on("model_rebound", self._on_model_rebound)

    # ------------------------------------------------------------ when it applies
    def _layout(self) -> None:
        """The parameters the route measures: those still in the model (not retired,
        follow.py) that are trainable now or hold a gradient (a frozen one's left over:
        the general path takes every parameter with a ``.grad``); the others must have no
        gradient. One device and one dtype, or no route."""
        ctx = self.ctx
        self._stale = False
        self._plist, self._live, self._frozen = None, [], []
        self._pre = None  # (norms of the former layout's parameters)
        retired = ctx.retired_params
        live = [i for i in range(len(ctx.params)) if i not in retired]
        params = ctx.params
        measured = [i for i in live if params[i].requires_grad or params[i].grad is not None]
        chosen = [params[i] for i in measured]
        if not chosen or len({(p.device, p.dtype) for p in chosen}) != 1:
            return
        self._plist = chosen
        self._live = measured
        taken = set(measured)
        self._frozen = [params[i] for i in live if i not in taken]
        self._dense = False
        self._device, self._dtype = chosen[0].device, chosen[0].dtype
        self._float32_cpu = self._device.type == "cpu" and self._dtype == torch.float32
        # Where their rows go: a slice while they are the first ones (numpy assigns a slice
        # without gathering indices), else their places.
        n = len(measured)
        self._all = slice(0, n) if measured[-1] == n - 1 else measured

    def close(self) -> None:
        """Let go of the parameters and norms held (the Probe is closed)."""
        self.armed = False
        self._plist, self._frozen, self._pre = None, [], None

    def _eligible(self) -> bool:
        ctx = self.ctx
        scaler = ctx.scaler()
        return (
            ctx.auto
            and not ctx.recording
            and not ctx.closed
            and not ctx.unfollowed
            and not ctx.distributed
            and not ctx.shards
            and (scaler is None or not scaler.is_enabled())  # GradScaler(enabled=use_amp)
            and ctx.plan.params
            and ctx.plan.preclip
            and self._plist is not None
        )

    def _on_step_closed(self, step: int) -> None:
        self.pending, self._pre = False, None
        if self._stale:  # a parameter frozen or unfrozen, found at the step
            self._layout()
        self.armed = self._eligible()  # ``recording`` is the next step's now

    def _on_step_discarded(self, step: int, skipped: bool) -> None:
        self._pre = None

    def _on_model_rebound(self, new_params: list[Tensor]) -> None:
        # As the general path forgets its pre-clip norms (ParamStats), and goes on the
        # general path for this step: its gradients may be of parameters bound just now.
        self._pre = None
        self._layout()
        self._disarm()

    def _disarm(self) -> None:
        """Go the general way for the rest of this step, with what was measured so far."""
        self.armed = False
        pre, self._pre = self._pre, None
        if pre is not None and self._plist is not None and self._device is not None:
            norms, finite, versions = pre
            self._params.adopt_preclip(self._device, self._live, norms, finite, versions)

    # ------------------------------------------------------------ backward
    def on_accumulated(self) -> None:
        """A parameter's ``.grad`` was accumulated: measure once, when this backward ends.
        (Not distributed: no collective writes the gradients after autograd's own end.)"""
        if not self.pending:
            self.pending = True
            at_backward_end(_backward_end_hook, self.ctx.owner_ref, _BACKWARD_END_SITE)

    def backward_ended(self) -> None:
        self.pending = False
        ctx = self.ctx
        if not self.armed:  # disarmed meanwhile: the general path's end of backward
            ctx.emit("backward_ended")
            return
        if ctx.closed or ctx.searching:
            return
        read = self._read()
        if read is None and self._stale:  # frozen or unfrozen since: measure those now
            self._layout()
            read = self._read()
        if read is None:  # a parameter without a gradient, or not a dense one
            self._disarm()
            ctx.emit("backward_ended")
            return
        grads, versions = read
        try:
            self._pre = (*self._norms(grads), versions)
        except Exception:  # (a layout it was not made for): the general path measures
            self._disarm()
            ctx.emit("backward_ended")

    def _read(self) -> tuple[list[Tensor], list[tuple[int, int]]] | None:
        """The bound parameters' gradients and their versions (:func:`.params.grad_versions`),
        if every one has a dense gradient (checked at the first step only: a parameter's
        gradient layout is its module's); else None."""
        grads = [p.grad for p in self._plist or ()]
        try:  # (a list comprehension, not grad_versions: each call here costs ~5 µs)
            versions = [(id(g), g._version) for g in grads]
        except AttributeError:  # None has no version: a parameter without a gradient
            self._stale = any(not p.requires_grad for p in self._plist or ())
            return None
        if self._frozen and any(p.grad is not None for p in self._frozen):
            self._stale = True  # a gradient where none was expected: unfrozen
            return None
        if grads[0].dtype != self._dtype or grads[0].device != self._device:
            self._stale = True  # the model moved or cast in place (model.to(...))
            return None
        if not self._dense:
            values = grad_values(grads)  # (the same tensors where they are dense)
            if values is not grads and any(a is not b for a, b in zip(values, grads)):
                return None  # sparse or sharded gradients: the general path's values
            self._dense = True
        return grads, versions

    def _norms(self, grads: list[Tensor]) -> tuple[Tensor, list[bool] | None]:
        """:func:`.params.gradient_norms` of the (dense) gradients."""
        if torch.is_grad_enabled():  # (a backward with create_graph: grads that require it)
            with torch.no_grad():
                return gradient_norms(grads, self._device)
        if self._float32_cpu:  # what gradient_norms comes to there, with fewer calls
            return float32_norms(grads)
        return gradient_norms(grads, self._device)

    # ------------------------------------------------------------ the step
    def at_step(self) -> None:
        """The optimizer step (or ``probe.step()``) of an armed step: the sentinel's rows,
        as :meth:`.params.ParamStats.record_sentinel` writes them. What the route cannot
        measure (a gradient missing, a layout it was not made for, a failure before any
        row is written) goes the general way, with the norms backward left."""
        ctx = self.ctx
        read = self._read() if self.armed and not ctx.unfollowed else None
        measured = None
        if read is not None:
            try:
                measured = self._measure(*read)
            except Exception:
                measured = None
        if measured is None:
            self._disarm()
            self._params.record_sentinel()
            return
        rows, device_rows, total, burst = measured
        buffer, every = ctx.buffer, self._all
        for name, values in device_rows:
            buffer.record_params(self._device, every, name, values)
        buffer.set_param_host_many(every, rows)
        if burst:
            self._clock.burst()  # non-finite gradients: the next steps in full
        self._clock.watch_spike([total])

    def _measure(
        self, grads: list[Tensor], versions: list[tuple[int, int]]
    ) -> tuple[dict[str, Any], list[tuple[str, Tensor]], Any, bool]:
        """The step's rows, nothing written yet: the host's (CPU values and flags, one
        call into the buffer), those for the device's arrays, the spike total, and
        whether non-finite gradients start a burst."""
        ctx = self.ctx
        device = self._device
        pre = self._pre
        if pre is not None and pre[2] == versions and not self._params.writes_unseen:
            norms, finite = pre[0], pre[1]  # the very gradients backward left
        else:
            norms, finite = self._norms(grads)
        all_finite = finite is not None and all(finite)
        rows: dict[str, Any] = {"has_grad": 1.0}
        device_rows: list[tuple[str, Tensor]] = []
        if pre is not None:
            rows["has_preclip"] = 1.0
        for name, values in self._norm_rows(pre, norms).items():
            if self._float32_cpu:
                rows[name] = values.numpy()
            else:
                device_rows.append((name, values))
        if self._want_nonfinite:  # as ParamStats records it
            if all_finite:
                rows["grad_nonfinite"] = 0.0
            elif ctx.exact_counts:
                with torch.no_grad():
                    device_rows.append(("grad_nonfinite", nonfinite_counts(device, grads)))
            else:
                device_rows.append(("grad_nonfinite", nonfinite_flags(norms, finite)))
        total = squared_total(pre[0] if pre is not None else norms)
        self._pre = None
        return rows, device_rows, total, finite is not None and not all_finite

    @staticmethod
    def _norm_rows(pre: Any, norms: Tensor) -> dict[str, Tensor]:
        """The step's norms by partial: the pre-clip ones (the same tensor as the step's
        where no gradient changed since) and the step's."""
        if pre is None:
            return {"grad_norm": norms}
        return {"preclip_norm": pre[0], "grad_norm": norms}
