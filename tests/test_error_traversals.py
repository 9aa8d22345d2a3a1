"""Error signals when autograd traverses a tensor more than once in a step.

Rule (docs/recording.md): error_norm is ‖dL/d(output)‖ of the loss the step applies
(the sum of every .backward() of the step); torch.autograd.grad passes do not count;
a tensor traversed by two .backward() passes (a retained graph) is not recorded, with
one warning; error_gain's input side is the module's own share of dL/d(input).
Each case is checked against plain autograd on an un-probed twin.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning


def rows(frame, stat: str) -> dict[str, float]:
    sub = frame[(frame.step == 0) & (frame.stat == stat)]
    return dict(zip(sub.name, sub.value))


def reference(twin: nn.Module, names: list[str], total_loss) -> tuple[dict, dict]:
    """error_norm and error_gain by autograd on ``twin``: ``total_loss(twin)`` is the loss
    whose gradient the step applies. error_gain's input side is the module's own share,
    autograd.grad(y, x, grad_outputs=dL/dy)."""
    outs: dict[str, list[Tensor]] = defaultdict(list)
    ins: dict[str, list[Tensor]] = defaultdict(list)
    mods = dict(twin.named_modules())

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            outs[name].append(out)
            ins[name].append(args[0])

        return hook

    handles = [mods[n].register_forward_hook(keep(n)) for n in names]
    try:
        total = total_loss(twin)
    finally:
        for h in handles:
            h.remove()
    norm, gain = {}, {}
    for n in names:
        gys = torch.autograd.grad(total, outs[n], retain_graph=True, allow_unused=True)
        err = sum(float(g.double().pow(2).sum()) for g in gys if g is not None)
        share = 0.0
        for y, x, gy in zip(outs[n], ins[n], gys):
            if gy is not None and x.requires_grad:
                (gx,) = torch.autograd.grad(y, x, gy, retain_graph=True, allow_unused=True)
                share += 0.0 if gx is None else float(gx.double().pow(2).sum())
        norm[n] = math.sqrt(err)
        gain[n] = math.sqrt(share / err) if err > 0 and share > 0 else None
    return norm, gain


def probed(model: nn.Module, step) -> tuple[object, list[str]]:
    """Run ``step(model)`` (its backward calls) then optimizer.step() under the Probe."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Probe(model, opt) as probe:
            opt.zero_grad()
            step(model)
            opt.step()
            frame = probe.frame()
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    return frame, ours


def assert_matches(frame, norm: dict, gain: dict, names: list[str]) -> None:
    got_norm, got_gain = rows(frame, "error_norm"), rows(frame, "error_gain")
    for n in names:
        assert got_norm[n] == pytest.approx(norm[n], rel=1e-6), n
        if gain[n] is None:
            assert n not in got_gain, n
        else:
            assert got_gain[n] == pytest.approx(gain[n], rel=1e-6), n


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


NAMES = ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------- retained graph
def test_retained_graph_two_losses_is_not_recorded_with_one_warning():
    model, x = mlp(), torch.randn(6, 5)

    def step(m):
        out = m(x)
        out.pow(2).mean().backward(retain_graph=True)
        out[:, 0].sum().backward()

    frame, warned = probed(model, step)
    assert not rows(frame, "error_norm") and not rows(frame, "error_gain")
    assert len(warned) == 1 and "retain_graph" in warned[0]
    assert rows(frame, "act_std") and rows(frame, "grad_norm")  # the rest is recorded


def test_retained_graph_through_separate_heads_records_what_one_pass_saw():
    """Two heads on a trunk, a loss each, backward(retain_graph=True) then backward():
    each head is traversed once (right), the trunk twice (not recorded)."""
    torch.manual_seed(1)
    model = nn.ModuleDict(
        {"trunk": nn.Linear(5, 8), "act": nn.Tanh(), "a": nn.Linear(8, 2), "b": nn.Linear(8, 4)}
    )
    x = torch.randn(7, 5)

    def losses(m):
        h = m["act"](m["trunk"](x))
        return m["a"](h).pow(2).sum(), m["b"](h).sin().sum()

    norm, gain = reference(copy.deepcopy(model), ["a", "b"], lambda m: sum(losses(m)))

    def step(m):
        la, lb = losses(m)
        la.backward(retain_graph=True)
        lb.backward()

    frame, warned = probed(model, step)
    assert_matches(frame, norm, gain, ["a", "b"])
    assert "trunk" not in rows(frame, "error_norm") and "act" not in rows(frame, "error_norm")
    assert len(warned) == 1


def test_a_single_backward_after_a_retained_step_is_recorded_again():
    model, x = mlp(), torch.randn(6, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Probe(model, opt) as probe:
            for retained in (True, False):
                opt.zero_grad()
                out = model(x)
                if retained:
                    out.sum().backward(retain_graph=True)
                out.pow(2).sum().backward()
                opt.step()
            frame = probe.frame()
    steps = set(frame[frame.stat == "error_norm"].step)
    assert steps == {1}


# ---------------------------------------------------------------- autograd.grad
def penalty_loss(m: nn.Module, x: Tensor) -> Tensor:
    """WGAN-GP style: loss + (‖dloss/dx‖ − 1)², the inner gradient with create_graph."""
    x = x.clone().requires_grad_(True)
    loss = m(x).pow(2).mean()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + 10 * (gx.norm() - 1) ** 2


def test_gradient_penalty_counts_the_backward_of_the_penalised_loss():
    model, x = mlp(), torch.randn(6, 5)
    norm, gain = reference(copy.deepcopy(model), NAMES, lambda m: penalty_loss(m, x))
    frame, warned = probed(model, lambda m: penalty_loss(m, x).backward())
    assert_matches(frame, norm, gain, NAMES)
    assert not warned


def test_gradient_penalty_on_parameter_gradients():
    """A gradient-norm regulariser (as in meta-learning): autograd.grad over the
    parameters with create_graph, then backward of the regularised loss."""
    model, x = mlp(), torch.randn(6, 5)

    def total(m):
        loss = m(x).pow(2).mean()
        grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        return loss + 0.5 * sum(g.pow(2).sum() for g in grads)

    norm, gain = reference(copy.deepcopy(model), NAMES, total)
    frame, warned = probed(model, lambda m: total(m).backward())
    assert_matches(frame, norm, gain, NAMES)
    assert not warned


def test_a_saliency_map_does_not_count():
    model, x = mlp(), torch.randn(6, 5)

    def loss_of(m):
        return m(x).pow(2).mean()

    norm, gain = reference(copy.deepcopy(model), NAMES, loss_of)

    def step(m):
        xi = x.clone().requires_grad_(True)
        saliency = torch.autograd.grad(m(xi).sum(), xi)[0]  # no .grad touched
        assert saliency.shape == x.shape
        loss_of(m).backward()

    frame, warned = probed(model, step)
    assert_matches(frame, norm, gain, NAMES)
    assert not warned


# ---------------------------------------------------------------- shared inputs
class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.trunk, self.act = nn.Linear(5, 8), nn.Tanh()
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.trunk(x))
        return self.a(h).pow(2).sum() + self.b(h).sin().sum()


class Residual(nn.Module):
    """x + f(x): f's first layer reads x, and so does the skip."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.inp, self.f1, self.act, self.f2 = (
            nn.Linear(5, 8),
            nn.Linear(8, 8),
            nn.ReLU(),
            nn.Linear(8, 8),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return (h + self.f2(self.act(self.f1(h)))).pow(2).sum()


class InnerSkip(nn.Module):
    """One module that reads its input through two of its own nodes: x + lin(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.tensor(0.7))  # a parameter of its own: probed

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.lin(x) * x


class SharedCalls(nn.Module):
    """A module called twice on the same tensor, and an inner-skip module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.inp, self.shared, self.skip = nn.Linear(5, 8), nn.Linear(8, 8), InnerSkip()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return (self.shared(h) * self.shared(h).sigmoid()).sum() + self.skip(h).pow(2).sum()


@pytest.mark.parametrize(
    ("factory", "names"),
    [
        (TwoHeads, ["trunk", "act", "a", "b"]),
        (Residual, ["inp", "f1", "act", "f2"]),
        (SharedCalls, ["inp", "shared", "skip", "skip.lin"]),
    ],
)
def test_error_gain_is_the_modules_own_share_of_a_shared_input(factory, names):
    model, x = factory(), torch.randn(6, 5)
    norm, gain = reference(copy.deepcopy(model), names, lambda m: m(x))
    frame, warned = probed(model, lambda m: m(x).backward())
    assert_matches(frame, norm, gain, names)
    assert not warned


# ---------------------------------------------------------------- checkpointing
class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.reentrant = reentrant
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_block_error_signals_are_those_of_the_plain_model(reentrant):
    names = ["inp", "block.0", "block.1", "block.2", "out"]
    model, x = Checkpointed(reentrant), torch.randn(6, 5)
    plain = copy.deepcopy(model)
    plain.forward = lambda x: plain.out(plain.block(plain.inp(x)))  # same maths, no checkpoint
    norm, gain = reference(plain, names, lambda m: m(x).pow(2).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        frame, _ = probed(model, lambda m: m(x).pow(2).sum().backward())
    assert_matches(frame, norm, gain, names)


# ---------------------------------------------------------------- accumulation
def test_micro_batches_still_add_up_with_a_penalty_in_each():
    """Two micro-batches, each a penalised loss: per module, the signals of the two
    forward passes add in squares (separate tensors), the inner autograd.grad never."""
    model = mlp()
    xs = [torch.randn(4, 5), torch.randn(3, 5)]
    per = [reference(copy.deepcopy(model), NAMES, lambda m, x=x: penalty_loss(m, x)) for x in xs]

    def step(m):
        for x in xs:
            penalty_loss(m, x).backward()

    frame, warned = probed(model, step)
    got = rows(frame, "error_norm")
    for n in NAMES:
        expected = math.sqrt(sum(norm[n] ** 2 for norm, _ in per))
        assert got[n] == pytest.approx(expected, rel=1e-6), n
    assert not warned
