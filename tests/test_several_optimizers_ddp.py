"""Issue 21.4 under DDP: two CPU processes (gloo) against one process on the global batch.

Two loops, each with DDP's ``gradient_as_bucket_view=True`` (after its first synchronised
iteration DDP swaps each ``.grad`` for a view of its rebuilt buckets: another tensor,
which must not read as a discarded gradient):

- accumulation of two micro-batches, each synchronised (no ``no_sync``), the rebuild
  falling between them: every micro-batch counts;
- a GAN, D and G each in DDP with a Probe each: D's step counts D's own passes, not G's
  backward through D, whose gradient ``d_opt.zero_grad()`` discards.

Each rank takes half of the global batch and a batch-mean loss, so the statistics equal
the single process's (tests/test_ddp.py), whose own numbers tests/test_several_optimizers.py
checks against autograd; calls add up over ranks. float64: the ranks' sums and the single
process's are the same sums in another order, so 1e-9 relative holds on any CPU.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradprobe import Probe

WORLD = 2
STEPS = 3
bce = nn.functional.binary_cross_entropy_with_logits


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    g = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    d = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return g, d


def batch(step: int, rank: int, world: int, part: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + part)
    z = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    real = torch.randn(8, 4, generator=gen, dtype=torch.float64) + 1
    n = 8 // world
    return z[rank * n : (rank + 1) * n], real[rank * n : (rank + 1) * n]


def wrap(model: nn.Module, world: int) -> nn.Module:
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)


def accumulate(rank: int, world: int) -> pd.DataFrame:
    _, d = models()
    model = wrap(d, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1) as probe:
        for step in range(STEPS):
            opt.zero_grad()
            for part in range(2):
                _, real = batch(step, rank, world, part)
                (model(real).pow(2).mean() / 2).backward()
            opt.step()
        return probe.frame()


def gan(rank: int, world: int) -> pd.DataFrame:
    g, d = models()
    g_run, d_run = wrap(g, world), wrap(d, world)
    g_opt = torch.optim.Adam(g_run.parameters(), lr=0.01)
    d_opt = torch.optim.SGD(d_run.parameters(), lr=0.1)
    with Probe(g_run, g_opt, every=1), Probe(d_run, d_opt, every=1) as d_probe:
        for step in range(STEPS):
            z, real = batch(step, rank, world)
            d_opt.zero_grad()
            fake = g_run(z)
            d_real, d_fake = d_run(real), d_run(fake.detach())
            loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            loss.backward()
            d_opt.step()
            g_opt.zero_grad()
            out = d_run(fake)
            bce(out, torch.ones_like(out)).backward()  # through D: D's gradient, discarded
            g_opt.step()
        return d_probe.frame()


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        accumulate(rank, WORLD).to_parquet(Path(out) / f"accumulate{rank}.parquet")
        gan(rank, WORLD).to_parquet(Path(out) / f"gan{rank}.parquet")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_several")
    mp.spawn(_worker, args=(f"file://{out / 'rendezvous'}", str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("case", ["accumulate", "gan"])
def test_ddp_counts_the_passes_the_step_applies_as_one_process(runs, case):
    single = accumulate(0, 1) if case == "accumulate" else gan(0, 1)
    got = pd.read_parquet(runs / f"{case}0.parquet")
    merged = got.merge(single, on=["step", "name", "stat"], how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head(20)
    calls = merged[merged.stat == "calls"]
    per_step = 2  # two micro-batches; D's real and generated samples
    assert (calls.value_y == per_step).all(), calls
    assert (calls.value_x == WORLD * per_step).all(), calls
    rest = merged[merged.stat != "calls"]
    assert {"grad_norm", "error_norm", "act_mean"} <= set(rest.stat)
    for row in rest.itertuples():
        assert row.value_x == pytest.approx(row.value_y, rel=1e-9, abs=1e-12), (
            row.step,
            row.name,
            row.stat,
        )
