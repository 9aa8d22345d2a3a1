"""DDP: two real CPU processes (gloo, loopback) against one process on the same global batch.

Each rank takes half of the global batch and a batch-mean loss; DDP averages the
gradients, so the loss it optimises is the mean of the ranks' losses, which equals the
single process's batch-mean loss on the whole batch. Every statistic must then agree:
parameter statistics of the synchronised gradients, module statistics combined across
ranks (sums and counts; units dead only if dead on every rank; error signals of the
mean loss), the global norms before and after clipping. Only rank 0 writes the store.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradprobe
from gradprobe import Probe
from numerics import assert_within_float32_error

WORLD = 2
STEPS = 3


def rendezvous(out: Path) -> str:
    """Where one test's ranks meet: a file in the test's own folder. Not a TCP port: a
    "free" port found by binding port 0 can be taken at once by another test's ranks
    under xdist, and ranks of two tests then share collectives (a size mismatch)."""
    return f"file://{Path(out) / 'rendezvous'}"


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Sigmoid(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        # Unit 0 fires only where x0 > 0, which is rank 1's half of the batch: dead on
        # rank 0, alive globally. Unit 1 is dead everywhere.
        model[0].weight[0] = torch.tensor([10.0, 0.0, 0.0, 0.0])
        model[0].bias[0] = 0.0
        model[0].bias[1] = -100.0
        model[4].weight.mul_(6.0)  # some saturated sigmoid entries
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=g)
    x[:, 0] = torch.cat([-x[:8, 0].abs(), x[8:, 0].abs()])  # rank 0: x0 < 0, rank 1: x0 > 0
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def train(model: nn.Module, probed: nn.Module, rank: int, world: int, store: Path) -> pd.DataFrame:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = next(model.parameters()).dtype  # float64 for the float64 reference
    with Probe(probed, opt, store=store, stats="full", flush_every=2, dead_window=2) as probe:
        for step in range(STEPS):
            x, y = global_batch(step)
            x = x.to(dtype)
            n = len(x) // world
            x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            opt.step()
        return probe.frame()


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(build())
        frame = train(ddp, ddp, rank, WORLD, Path(out) / f"run{rank}")
        frame.to_parquet(Path(out) / f"frame{rank}.parquet")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(rendezvous(out), str(out)), nprocs=WORLD, join=True)
    model = build()
    single = train(model, model, 0, 1, out / "single")
    return single, out


@pytest.fixture(scope="module")
def single64(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The single process in float64: the exact values for float32's purposes."""
    model = build().double()
    return train(model, model, 0, 1, tmp_path_factory.mktemp("ddp64") / "single")


def _compare(got: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    keys = ["step", "name", "stat"]
    merged = got.merge(expected, on=keys, how="outer", suffixes=("_ddp", "_single"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head(20)
    return merged


def test_ddp_statistics_equal_one_process_on_the_global_batch(runs, single64):
    """Within float32's error of the single process's float64 values: DDP sums each half
    of the batch, then all-reduces; the size of float32's error for each statistic is
    measured on the single process (tests/numerics.py derives the tolerance)."""
    single, out = runs
    ddp = pd.read_parquet(out / "frame0.parquet")
    merged = _compare(ddp, single)
    calls = merged["stat"] == "calls"
    # A module runs once per rank: calls add up over ranks as over micro-batches.
    assert (merged.loc[calls, "value_ddp"] == WORLD * merged.loc[calls, "value_single"]).all()
    rest = merged[~calls]
    assert set(rest["stat"]) >= {
        "grad_norm",
        "param_norm",
        "update_ratio",
        "error_norm",
        "error_gain",
        "act_mean",
        "act_std",
        "act_absmax",  # the max over ranks: the single process's max on the global batch
        "zero_frac",
        "dead_frac",
        "dead_window_frac",
        "sat_frac",
        "gate_mean",
        "global_grad_norm",
        "global_grad_norm_preclip",
        "clipped",
        "hist_00",
    }
    assert_within_float32_error(ddp[ddp.stat != "calls"], single, single64, "ddp")


def test_a_unit_dead_on_one_rank_only_is_alive(runs):
    single, out = runs
    ddp = pd.read_parquet(out / "frame0.parquet")
    for frame in (single, ddp):
        dead = frame[(frame.name == "1") & (frame.stat == "dead_frac") & (frame.step == 0)]
        assert float(dead.value.iloc[0]) == pytest.approx(1 / 6)  # unit 1 only, not unit 0


def test_every_rank_holds_the_same_rows_and_only_rank_zero_writes(runs):
    _, out = runs
    a = pd.read_parquet(out / "frame0.parquet")
    b = pd.read_parquet(out / "frame1.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not (out / "run1").exists()
    stored = gradprobe.load(out / "run0")
    assert stored.meta["probe"]["world_size"] == WORLD
    names = set(stored.frame().name)
    assert "0.weight" in names and "1" in names  # the user's names, no "module." prefix
    assert not any(n.startswith("module.") for n in names)
    assert len(stored.frame()) == len(a)


def test_clipping_under_ddp_sees_the_synchronised_gradient(runs):
    single, out = runs
    ddp = pd.read_parquet(out / "frame0.parquet")
    for frame in (single, ddp):
        rows = frame[frame.name == gradprobe.stats.MODEL_NAME].pivot(
            index="step", columns="stat", values="value"
        )
        assert (rows["clipped"] == 1).all()
        # clip_grad_norm_ scales by 0.05 / (total + 1e-6): 2e-5 relative below 0.05,
        # plus float32's norm error (a few 1e-6 for these ~100 entries, numerics.norm_rtol).
        assert rows["global_grad_norm"].to_numpy() == pytest.approx(0.05, rel=1e-4)
        assert (rows["global_grad_norm_preclip"] > 0.05).all()


# ------------------------------------------- ranks that run different modules in a step
# find_unused_parameters=True models: rank 0 runs branch `a`, rank 1 branch `b` (on its half
# of the global batch), and branch `never` runs nowhere. Every collective the Probe issues
# must still have the same shape on every rank (a mismatch hangs or raises), and a module
# run on one rank only is combined like any other: its sums over the samples it saw, its
# error signal that of the mean of the ranks' losses, its units dead if 0 wherever it ran.


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.a = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU())
        self.never = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        h = self.trunk(x)
        return self.head(self.a(h) if branch == "a" else self.b(h))


def build_branches() -> TwoBranches:
    torch.manual_seed(1)
    model = TwoBranches()
    with torch.no_grad():
        model.a[0].bias[:2] = -100.0  # two dead units in branch a (rank 0 only)
        model.b[2].bias[:1] = -100.0  # one in branch b (rank 1 only)
    return model


def branch_loss(model, x, y, branch: str) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x, branch), y)


def train_branches(model, probed, rank: int, world: int) -> pd.DataFrame:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = next(model.parameters()).dtype
    with Probe(probed, opt, stats="default", flush_every=2, dead_window=2) as probe:
        for step in range(STEPS):
            x, y = global_batch(step)
            x = x.to(dtype)
            n = len(x) // 2
            opt.zero_grad()
            if world == 1:
                # One process, the same mean loss: (loss_a(first half) + loss_b(second half)) / 2
                loss = (
                    branch_loss(model, x[:n], y[:n], "a") + branch_loss(model, x[n:], y[n:], "b")
                ) / 2
            else:
                half = slice(rank * n, (rank + 1) * n)
                loss = branch_loss(model, x[half], y[half], "ab"[rank])
            loss.backward()
            opt.step()
        return probe.frame()


def _branch_worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(build_branches(), find_unused_parameters=True)
        frame = train_branches(ddp, ddp, rank, WORLD)
        frame.to_parquet(Path(out) / f"branches{rank}.parquet")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def branch_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    out = tmp_path_factory.mktemp("ddp_branches")
    ctx = mp.spawn(_branch_worker, args=(rendezvous(out), str(out)), nprocs=WORLD, join=False)
    # A collective of mismatched shape hangs: fail the test instead of the suite.
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # False while some process still runs
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the DDP branch run did not finish in 120 s (a hung collective)")
    model = build_branches()
    return train_branches(model, model, 0, 1), out


@pytest.fixture(scope="module")
def branch_single64() -> pd.DataFrame:
    model = build_branches().double()
    return train_branches(model, model, 0, 1)


@pytest.mark.slow
def test_ranks_running_different_modules_agree_and_match_one_process(
    branch_runs, branch_single64
):
    """Within float32's error of one float64 process (tests/numerics.py)."""
    single, out = branch_runs
    a = pd.read_parquet(out / "branches0.parquet")
    b = pd.read_parquet(out / "branches1.parquet")
    pd.testing.assert_frame_equal(a, b)  # every rank holds the same rows
    merged = _compare(a, single)
    trunk_calls = (merged["stat"] == "calls") & merged["name"].str.startswith("trunk")
    head_calls = (merged["stat"] == "calls") & (merged["name"] == "head")
    # The trunk and head ran on both ranks (once each) and twice in the single process
    # (once per half): equal. Branch modules ran once anywhere.
    assert (merged.loc[trunk_calls, "value_ddp"] == 2).all()
    assert (merged.loc[head_calls, "value_ddp"] == 2).all()
    one_rank = merged["name"].str.match(r"^(a|b)\.") & (merged["stat"] == "calls")
    assert (merged.loc[one_rank, "value_ddp"] == 1).all()
    assert_within_float32_error(a, single, branch_single64, "ddp branches")
    stats = set(merged.stat)
    assert {"dead_frac", "dead_window_frac", "error_norm", "grad_norm", "act_mean"} <= stats


@pytest.mark.slow
def test_modules_run_on_one_rank_only_have_their_own_units_and_signals(branch_runs):
    _, out = branch_runs
    frame = pd.read_parquet(out / "branches0.parquet")

    def value(name: str, stat: str, step: int = 0) -> float:
        sub = frame[(frame.name == name) & (frame.stat == stat) & (frame.step == step)]
        assert len(sub) == 1, (name, stat, step)
        return float(sub.value.iloc[0])

    assert value("a.1", "dead_frac") == pytest.approx(2 / 5)  # rank 0's branch
    assert value("b.3", "dead_frac") >= 1 / 5  # rank 1's branch: its dead unit, and any other
    assert value("a.1", "dead_window_frac", step=1) == pytest.approx(2 / 5)
    assert value("a.0", "error_norm") > 0 and value("b.0", "error_norm") > 0
    # The branch no rank ran has no module rows; its parameters got no gradient anywhere.
    assert frame[frame.name == "never"].empty
    missing = frame[frame.stat == "grad_missing"]
    assert set(missing.name) == {"never.weight", "never.bias"}
    assert sorted(set(missing.step)) == list(range(STEPS))
