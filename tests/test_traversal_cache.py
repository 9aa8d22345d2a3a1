"""error_gain's graph walk kept per module while the graph repeats (gradprobe/traversals.py).

The kept walk must give what a fresh walk gives, step after step: checked against a twin
whose Probe walks at every call (``keep_walks(False)``) and against autograd's own share
of dL/d(input) on an un-probed twin, on models whose graph does not repeat (a branch
taken on some steps, with or without a change of the signature; train → eval; a module
swapped mid-run). Training stays bit-identical. A count of the full walks (the walk
function wrapped, not the cache's own counters) shows one walk per graph signature.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict

import pytest
import torch
from torch import Tensor, nn

from gradprobe import Probe
from gradprobe import traversals as traversals_module

STEPS = 6


class Block(nn.Module):
    """Reads its input once or twice, depending on ``mode`` (set by the test's loop):

    - "residual": tanh(lin(x)) + x, "plain": tanh(lin(x)) — another node count, so
      another signature;
    - "gated": tanh(lin(x)) * x, "detached": tanh(lin(x)) * x.detach() — the same node
      count and output node type: only following the kept paths sees the difference.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = nn.Dropout(0.25)
        self.mode = "residual"

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(self.drop(x)))
        if self.mode == "residual":
            return h + x
        if self.mode == "gated":
            return h * x
        if self.mode == "detached":
            return h * x.detach()
        return h


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = Block()
        self.head: nn.Module = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.inp(x)))


def own_share_gains(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """error_gain by autograd on an un-probed copy: ‖dL/dx along the module's own graph‖
    / ‖dL/dy‖, the module's share read as autograd.grad(out, x, dL/d(out))."""
    outs: dict[str, Tensor] = {}
    ins: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            outs[name], ins[name] = out, args[0]

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        torch.manual_seed(1234)  # the probed twins' dropout masks: the same seed per step
        loss = nn.functional.mse_loss(model(x), y)
    finally:
        for h in handles:
            h.remove()
    gains = {}
    for n, out in outs.items():
        if not ins[n].requires_grad:
            continue
        (gy,) = torch.autograd.grad(loss, out, retain_graph=True)
        (gx,) = torch.autograd.grad(out, ins[n], gy, retain_graph=True)
        gains[n] = float(gx.norm()) / float(gy.norm())
    return gains


def swap_block(model: Net, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(7)
    model.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).double()
    opt.add_param_group({"params": list(model.block.parameters())})


def run(schedule, probe_kind: str | None, reference: bool = False):
    """Train ``STEPS`` steps; ``schedule(step, model, opt)`` changes the model before a
    step. ``probe_kind``: None (plain), "kept" or "walked" (no kept walks)."""
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # Every module but the root: the block too, whose graph is several nodes deep.
    probe = Probe(model, opt, every=1, modules=lambda n, m: n != "") if probe_kind else None
    if probe_kind == "walked":
        probe._engine.errors.traversals.keep_walks(False)
    gen = torch.Generator().manual_seed(3)
    expected = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GradprobeWarning either: nothing is a gap
        for step in range(STEPS):
            schedule(step, model, opt)
            x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
            y = torch.randn(16, 3, generator=gen, dtype=torch.float64)
            if reference:
                expected.append(own_share_gains(copy.deepcopy(model), x, y))
            opt.zero_grad()
            torch.manual_seed(1234)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    frame = None
    if probe is not None:
        frame = probe.frame()
        probe.close()
    return model, frame, probe, expected


def branches(step: int, model: Net, opt: torch.optim.Optimizer) -> None:
    model.block.mode = ["residual", "plain", "residual", "residual", "plain", "residual"][step]


def same_signature(step: int, model: Net, opt: torch.optim.Optimizer) -> None:
    model.block.mode = ["gated", "detached", "gated", "gated", "detached", "gated"][step]


def train_eval_train(step: int, model: Net, opt: torch.optim.Optimizer) -> None:
    """Steps 2-3 in eval mode (no dropout nodes; the Probe records nothing then), then
    training again: the walks kept at steps 0-1 must hold again."""
    model.block.mode = "gated"
    model.train(step not in (2, 3))


def swapped(step: int, model: Net, opt: torch.optim.Optimizer) -> None:
    model.block.mode = "residual"
    if step == 3:
        swap_block(model, opt)


SCHEDULES = {
    "branches": branches,
    "same_signature": same_signature,
    "train_eval_train": train_eval_train,
    "swapped": swapped,
}


def by_step(frame, stat: str) -> dict[tuple[int, str], float]:
    sub = frame[frame.stat == stat]
    return {(int(s), str(n)): float(v) for s, n, v in zip(sub.step, sub.name, sub.value)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_kept_walks_give_what_walking_gives_and_training_is_unchanged(schedule):
    plain, _, _, expected = run(SCHEDULES[schedule], None, reference=True)
    kept_model, kept, _, _ = run(SCHEDULES[schedule], "kept")
    walked_model, walked, _, _ = run(SCHEDULES[schedule], "walked")
    for other in (kept_model, walked_model):
        for a, b in zip(plain.state_dict().values(), other.state_dict().values()):
            assert torch.equal(a, b)
    for stat in ("error_gain", "error_norm"):
        # The same hooks on the same nodes: the same values, bit for bit.
        assert by_step(kept, stat) == by_step(walked, stat)
    gains = by_step(kept, "error_gain")
    training = [s for s in range(STEPS) if schedule != "train_eval_train" or s not in (2, 3)]
    assert {s for s, _ in gains} == set(training)
    for step in training:
        for name, value in expected[step].items():
            # float64 throughout: a norm's rounding error is a few ulps of the result.
            assert math.isclose(gains[(step, name)], value, rel_tol=1e-9), (step, name)


def count_walks(monkeypatch) -> dict[str, int]:
    """Wrap the walk: count the full walks, by the output node's type."""
    counts: dict[str, int] = defaultdict(int)
    walk = traversals_module._walk

    def counted(root, edge, top=None):
        counts[type(root).__name__] += 1
        return walk(root, edge, top)

    monkeypatch.setattr(traversals_module, "_walk", counted)
    return counts


def test_the_walk_runs_once_per_signature(monkeypatch):
    counts = count_walks(monkeypatch)
    _, frame, probe, _ = run(branches, "kept")
    # Counted by the output node's type. block.lin and head (AddmmBackward0): one walk each
    # in six steps. The block: one walk per signature, AddBackward0 on "residual" steps,
    # TanhBackward0 on "plain" ones, though they alternate. block.drop (MulBackward0, its
    # mask): a one-node walk, as cheap as checking a kept one, so not kept: six.
    assert dict(counts) == {
        "AddmmBackward0": 2,
        "AddBackward0": 1,
        "TanhBackward0": 1,
        "MulBackward0": STEPS,
    }
    caches = probe._engine.errors.traversals.walk_caches
    assert sum(c.walks + c.hits for c in caches.values()) == 4 * STEPS  # every call asked
    assert sum(c.walks for c in caches.values()) == sum(counts.values())
    assert len(by_step(frame, "error_gain")) == 4 * STEPS


def test_without_kept_walks_every_call_walks(monkeypatch):
    counts = count_walks(monkeypatch)
    run(branches, "walked")
    assert sum(counts.values()) == 4 * STEPS


def test_a_change_on_the_kept_path_walks_again(monkeypatch):
    """gated ↔ detached: the same signature; the kept print of the block's output node
    differs (it no longer reads the input): walked again at each switch."""
    counts = count_walks(monkeypatch)
    run(same_signature, "kept")
    # block.drop: 6 (not kept); the block: step 0 and the switches at steps 1, 2, 4, 5.
    assert counts["MulBackward0"] == STEPS + 5
    assert counts["AddmmBackward0"] == 2


def test_a_kept_walk_is_walked_again_after_its_uses(monkeypatch):
    monkeypatch.setattr(traversals_module, "REWALK_EVERY", 2)
    counts = count_walks(monkeypatch)
    run(lambda step, model, opt: None, "kept")  # "residual" throughout
    # block.lin, head, the block: walked at steps 0 and 3 (after 2 uses); block.drop: 6.
    assert dict(counts) == {"AddmmBackward0": 4, "AddBackward0": 2, "MulBackward0": STEPS}
