"""Is this pass trained? Decided once per pass, from the probed model, not per submodule.

Issue 11 §7 and the recomputation side of §3 (docs/recording.md, "Training passes and
eval()"): a pass is recorded when gradients are enabled and the probed model is in
train() mode, whatever its submodules' own flags; a forward that activation
checkpointing runs again inside backward adds nothing to calls, activation or unit
statistics, and error signals are counted once.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning

MODULE_STATS = ("calls", "act_mean", "act_std", "zero_frac", "dead_frac", "error_norm", "error_gain")


class Block(nn.Module):
    """A ResNet-ish block: conv → BN → ReLU → conv → BN, plus the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.backbone = nn.Sequential(Block(4), Block(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.backbone(self.stem(x))).flatten(1))


def _error_norms(model: nn.Module, names: list[str], x: Tensor, y: Tensor) -> dict[str, float]:
    """‖dL/d(output)‖ of each named module by autograd on ``model`` (un-probed)."""
    outputs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out))
        for n in names
    ]
    loss = nn.functional.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    return {n: float(torch.linalg.vector_norm(g.double())) for n, g in zip(names, grads)}


def _train_probed(model: nn.Module, x: Tensor, y: Tensor, steps: int = 2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt) as probe:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        frame = probe.frame()
    return frame


def _value(frame, name: str, stat: str, step: int = 0) -> float:
    rows = frame[(frame.name == name) & (frame.stat == stat) & (frame.step == step)]
    assert len(rows) == 1, (name, stat, step)
    return float(rows.value.iloc[0])


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


@pytest.mark.parametrize(
    "freeze", [_freeze_batchnorm, lambda m: m.backbone.eval()], ids=["frozen_bn", "backbone_eval"]
)
def test_submodules_in_eval_inside_a_training_pass_are_recorded(freeze):
    torch.manual_seed(0)
    model = Net()
    model.train()
    freeze(model)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    names = ["backbone.0.bn1", "backbone.1.bn2", "backbone.0.conv1", "head"]
    expected = _error_norms(copy.deepcopy(model), names, x, y)
    frame = _train_probed(model, x, y)
    for name in names:
        assert _value(frame, name, "calls") == 1
        assert _value(frame, name, "error_norm") == pytest.approx(expected[name], rel=1e-5)
    assert not frame[(frame.name == "backbone.0.bn1") & (frame.stat == "act_mean")].empty
    # The frozen BatchNorm's running statistics stayed as they were (we changed nothing).
    assert torch.equal(model.backbone[0].bn1.running_mean, torch.zeros(4))


def test_validation_in_eval_under_no_grad_is_not_recorded():
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt) as probe:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        model.eval()
        with torch.no_grad():
            model(x)  # validation between backward and step: not in the step's rows
            model(x)
        model.train()
        opt.step()
        frame = probe.frame()
    assert _value(frame, "head", "calls") == 1
    assert _value(frame, "backbone.0.conv1", "calls") == 1


def test_eval_with_grad_for_saliency_is_not_recorded_and_training_in_eval_is_said_once():
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt) as probe, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A saliency map in eval(): gradients enabled, a backward, no optimizer step.
        model.eval()
        image = x.clone().requires_grad_()
        model(image)[:, 0].sum().backward()
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert not [w for w in caught if issubclass(w.category, GradprobeWarning)]
        # Trained in eval() mode: not recorded, and said once.
        model.eval()
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        frame = probe.frame()
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(ours) == 1 and "eval()" in ours[0]
    calls = frame[frame.stat == "calls"]
    assert set(calls.step) == {0} and set(calls.value) == {1.0}  # the saliency pass left none
    assert set(frame[frame.stat == "grad_norm"].step) == {0, 1, 2, 3}  # parameters: every step


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU())
        self.out = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        if self.reentrant is None:
            h = self.body(h)
        else:
            h = checkpoint(self.body, h, use_reentrant=self.reentrant)
        return self.out(h)


class CheckpointedBlocks(nn.Module):
    """A transformer-ish stack with each block checkpointed, a sequence input."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
            for _ in range(2)
        )
        self.out = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            if self.reentrant is None:
                h = h + block(h)
            else:
                h = h + checkpoint(block, h, use_reentrant=self.reentrant)
        return self.out(h.mean(1))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize(
    "make, shape", [(Checkpointed, (6, 5)), (CheckpointedBlocks, (4, 7, 5))], ids=["mlp", "blocks"]
)
def test_checkpoint_recomputation_gives_the_statistics_of_the_plain_model(make, shape, reentrant):
    torch.manual_seed(0)
    plain = make(None)
    checkpointed = make(reentrant)
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    expected = _train_probed(plain, x, y)
    got = _train_probed(checkpointed, x, y)
    compared = (*MODULE_STATS, "gate_mean", "sat_frac", "grad_norm")
    expected, got = expected[expected.stat.isin(compared)], got[got.stat.isin(compared)]
    merged = expected.merge(got, on=["step", "name", "stat"], how="outer", suffixes=("_plain", "_ckpt"))
    assert not merged.isna().any().any(), merged[merged.isna().any(axis=1)]
    for row in merged.itertuples():
        assert math.isclose(row.value_ckpt, row.value_plain, rel_tol=1e-5, abs_tol=1e-9), row
    assert set(merged[merged.stat == "calls"].value_plain) == {1.0}
