"""FSDP2 (``fully_shard``): two real CPU processes (gloo, loopback) against one process.

Every parameter and gradient is then a ``DTensor`` of which each rank holds a shard.
Each rank takes half of the global batch and a batch-mean loss; FSDP2 averages the
gradients (reduce-scatter), so the loss it optimises is the mean of the ranks' losses,
which equals the single process's batch-mean loss on the whole batch. Every statistic
must then agree with one unsharded process: parameter statistics of the *full* tensors
(not of the shards, and without FSDP's padding of uneven shards), module statistics
combined across ranks as under DDP, the global norms before and after clipping.

A second, independent reference is computed inside the sharded run itself, with
DTensor's own collectives: ``p.grad.full_tensor()`` and ``p.full_tensor()`` of every
parameter at every step, and the total norm ``torch.nn.utils.clip_grad_norm_`` returns
for the DTensor gradients. Mixed precision (bf16 compute) is checked against that one
exactly, and against the float32 single process within bf16's rounding.

All cases run in one spawn of two processes, then once more in one process: 50 to 80 s
in all on 2 shared CPU cores, hence `slow`.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradprobe
from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning
from numerics import assert_within_float32_error, norm_rtol
from test_ddp import rendezvous

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 16


# ------------------------------------------------------------------ models and data
def build_mlp() -> nn.Module:
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
        model[0].bias[1] = -100.0  # a unit dead everywhere
        model[4].weight.mul_(6.0)  # some saturated sigmoid entries
    return model


def build_uneven() -> nn.Module:
    """No dimension 0 divisible by 2: shards of 4+3, 2+1 and 1+0 rows (rank 1 holds an
    empty shard of the last layer): FSDP pads them, and padding must not enter a norm."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 1))


def build_conv() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),  # 5 output channels: shards of 3 and 2
        nn.ReLU(),
        nn.Conv2d(5, 3, 3),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": build_mlp,
    "uneven": build_uneven,
    "conv": build_conv,
}


def batch(model: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    if model == "conv":
        return torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g), torch.randint(
            0, 3, (GLOBAL_BATCH,), generator=g
        )
    if model == "uneven":
        return torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)
    return torch.randn(GLOBAL_BATCH, 4, generator=g), torch.randint(
        0, 3, (GLOBAL_BATCH,), generator=g
    )


def loss_of(model: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if output.dtype != torch.float64:  # bf16 compute: the loss in float32
        output = output.float()
    if model == "uneven":
        return nn.functional.mse_loss(output, target.to(output.dtype))
    return nn.functional.cross_entropy(output, target)


@dataclass(frozen=True)
class Case:
    model: str
    reshard: bool  # reshard_after_forward
    optimizer: str = "sgd"  # "sgd", "adam", or "none" (probe.step())
    max_norm: float = 1e9  # clip_grad_norm_'s bound (1e9: measured, never clipped)
    micro: int = 1  # micro-batches per step (gradient accumulation)
    late: bool = False  # the Probe attached after a no_grad forward left full parameters
    bf16: bool = False  # MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    replicas: int = 1  # hybrid sharding (HSDP): a (replicas, WORLD / replicas) mesh
    # Accumulate unsharded: gradients reduce-scattered at the last micro-batch only.
    no_sync: bool = False
    sync_ranks: bool | None = None  # Probe(sync_ranks=...)


CASES: dict[str, Case] = {
    "mlp_resharded_clipped": Case("mlp", reshard=True, max_norm=0.05),
    "mlp_kept_full": Case("mlp", reshard=False),
    "uneven_adam": Case("uneven", reshard=True, optimizer="adam"),
    "uneven_no_optimizer": Case("uneven", reshard=False, optimizer="none"),
    "conv_accumulated_clipped": Case("conv", reshard=False, micro=2, max_norm=0.1),
    "mlp_probe_attached_late": Case("mlp", reshard=False, late=True),
    "mlp_bf16": Case("mlp", reshard=True, bf16=True),
    # Two replicas of one shard: every parameter is (Replicate, Shard(0)); summing over
    # the replicas too would read each norm √2 too large.
    "mlp_hybrid_replicas_clipped": Case("mlp", reshard=True, replicas=2, max_norm=0.05),
    "conv_accumulated_without_sync": Case("conv", reshard=False, micro=2, no_sync=True),
    "uneven_ranks_not_combined": Case("uneven", reshard=True, sync_ranks=False),
}
COMBINED = [n for n, c in CASES.items() if c.sync_ranks is not False]
# Trained once more without a Probe: the weights must come out bit for bit the same.
UNPROBED_TWINS = ("mlp_kept_full", "conv_accumulated_without_sync", "mlp_bf16")


# ------------------------------------------------------------------ one training run
def train(
    case: Case, model: nn.Module, rank: int, world: int, store: Path | None, probed: bool = True
) -> tuple[pd.DataFrame | None, list[dict]]:
    """Train ``STEPS`` steps on this rank's share of each global batch under a Probe (or
    none: ``probed=False``); the frame, and per step the reference numbers from the full
    tensors (an independent computation: DTensor's ``full_tensor()`` collectives, torch's
    ``clip_grad_norm_``)."""
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype  # float64 for the float64 reference
    optimizer: torch.optim.Optimizer | None = None
    if case.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    elif case.optimizer == "adam":
        # eps well above the gradients' rounding: Adam's g/(|g| + eps) turns the 1e-7
        # rounding of a near-zero gradient entry into a full-size difference otherwise.
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    if case.late:
        model.eval()
        with torch.no_grad():  # with reshard_after_forward=False: full parameters stay registered
            model(batch(case.model, -1)[0][:2].to(dtype))
        model.train()
    references: list[dict] = []
    probe = (
        Probe(
            model,
            optimizer,
            store=store,
            stats="full",
            flush_every=2,
            dead_window=2,
            sync_ranks=case.sync_ranks,
        )
        if probed
        else None
    )
    with probe or contextlib.nullcontext():
        for step in range(STEPS):
            x, y = batch(case.model, step)
            x = x.to(dtype)
            share = len(x) // world
            x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
            for p in params.values():
                p.grad = None
            micro = len(x) // case.micro
            for i in range(case.micro):
                part = slice(i * micro, (i + 1) * micro)
                if case.no_sync and hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(i == case.micro - 1)
                (loss_of(case.model, model(x[part]), y[part]) / case.micro).backward()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=case.max_norm)
            ref = {"preclip": float(_full(total).double())}
            before = {n: _full(p).detach().double().clone() for n, p in params.items()}
            ref["grad_norm"] = {
                n: float(torch.linalg.vector_norm(_full(p.grad).double()))
                for n, p in params.items()
            }
            ref["param_norm"] = {n: float(torch.linalg.vector_norm(w)) for n, w in before.items()}
            if optimizer is not None:
                optimizer.step()
            else:
                with torch.no_grad():
                    for p in params.values():
                        p.sub_(0.05 * p.grad)
                if probe is not None:
                    probe.step()
            ref["update_ratio"] = {
                n: float(
                    torch.linalg.vector_norm(_full(p).detach().double() - before[n])
                    / torch.linalg.vector_norm(before[n])
                )
                for n, p in params.items()
            }
            references.append(ref)
        return (probe.frame() if probe is not None else None), references


def _full(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(case: Case, model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if case.replicas > 1:
        shape = (case.replicas, WORLD // case.replicas)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16) if case.bf16 else MixedPrecisionPolicy()
    )
    kw = dict(mesh=mesh, reshard_after_forward=case.reshard, mp_policy=policy)
    for module in model:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    return model


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD
    )
    try:
        for name, case in CASES.items():
            model = shard(case, MODELS[case.model]())
            store = Path(out) / f"{name}_run{rank}" if name == "mlp_resharded_clipped" else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", GradprobeWarning)
                frame, references = train(case, model, rank, WORLD, store)
            frame.to_parquet(Path(out) / f"{name}_{rank}.parquet")
            said = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
            (Path(out) / f"{name}_{rank}_warnings.json").write_text(json.dumps(said))
            if rank == 0:
                (Path(out) / f"{name}_reference.json").write_text(json.dumps(references))
            if name in UNPROBED_TWINS:
                twin = shard(case, MODELS[case.model]())
                train(case, twin, rank, WORLD, None, probed=False)
                same = all(
                    torch.equal(_full(p), _full(q))
                    for p, q in zip(model.parameters(), twin.parameters(), strict=True)
                )
                (Path(out) / f"{name}_{rank}_twin.json").write_text(json.dumps(same))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    ctx = mp.spawn(_worker, args=(rendezvous(out), str(out)), nprocs=WORLD, join=False)
    # A collective of mismatched shape hangs: fail the test instead of the suite.
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):  # False while some process still runs
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the FSDP2 run did not finish in 180 s (a hung collective)")
    return out


def _singles(dtype: torch.dtype) -> dict[str, pd.DataFrame]:
    frames = {}
    for name, case in CASES.items():
        model = MODELS[case.model]().to(dtype)
        frames[name] = train(case, model, 0, 1, None)[0]
    return frames


@pytest.fixture(scope="module")
def singles() -> dict[str, pd.DataFrame]:
    """Each case in one process on the whole batch, unsharded, in float32."""
    return _singles(torch.float32)


@pytest.fixture(scope="module")
def singles64() -> dict[str, pd.DataFrame]:
    """The same in float64: the exact values for float32's purposes (tests/numerics.py)."""
    return _singles(torch.float64)


def _merged(got: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    keys = ["step", "name", "stat"]
    merged = got.merge(
        expected, on=keys, how="outer", suffixes=("_fsdp", "_single"), indicator=True
    )
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head(20)
    return merged


PARAMETER_STATS = {"grad_norm", "param_norm", "update_ratio", "nonfinite"}
MODULE_STATS = {"error_norm", "act_mean", "act_std", "zero_frac", "dead_frac", "hist_00"}


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", [n for n in COMBINED if not CASES[n].bf16])
def test_every_statistic_equals_one_unsharded_process(runs, singles, singles64, name):
    """Within float32's error of the single process's float64 values: the sharded run
    sums in another order (each rank half the batch, then the reduce-scatter), and the
    size of float32's error for each statistic is measured (tests/numerics.py)."""
    fsdp = pd.read_parquet(runs / f"{name}_0.parquet")
    merged = _merged(fsdp, singles[name])
    calls = merged["stat"] == "calls"
    # A module runs once per rank and micro-batch: calls add up over ranks.
    assert (merged.loc[calls, "value_fsdp"] == WORLD * merged.loc[calls, "value_single"]).all()
    stats = set(merged.stat)
    assert stats >= PARAMETER_STATS | MODULE_STATS | {"global_grad_norm"}, stats
    assert_within_float32_error(
        fsdp[fsdp.stat != "calls"], singles[name], singles64[name], name
    )


@pytest.mark.parametrize("name", COMBINED)
def test_parameter_norms_are_those_of_the_full_tensors(runs, name):
    """Against DTensor's own full tensors and clip_grad_norm_'s total, in the same run.

    Both sides see the same float32 tensors; the Probe sums each shard's squares and then
    the shards', the reference sums the full tensor in float64: the tolerance is the
    float32 bound of a norm of that many entries (numerics.norm_rtol), whatever the order.
    """
    frame = pd.read_parquet(runs / f"{name}_0.parquet")
    sizes = {n: p.numel() for n, p in MODELS[CASES[name].model]().named_parameters()}
    total = sum(sizes.values())
    references = json.loads((runs / f"{name}_reference.json").read_text())
    table = frame.pivot_table(index=["step", "name"], columns="stat", values="value")
    for step, ref in enumerate(references):
        for stat in ("grad_norm", "param_norm", "update_ratio"):
            for param, expected in ref[stat].items():
                got = table.loc[(step, param), stat]
                rtol = norm_rtol(sizes[param])
                assert got == pytest.approx(expected, rel=rtol, abs=1e-12), (step, param, stat)
        preclip = table.loc[(step, gradprobe.stats.MODEL_NAME), "global_grad_norm_preclip"]
        assert preclip == pytest.approx(ref["preclip"], rel=norm_rtol(total)), step
        squares = sum(v**2 for v in ref["grad_norm"].values())
        assert table.loc[(step, gradprobe.stats.MODEL_NAME), "global_grad_norm"] == (
            pytest.approx(squares**0.5, rel=norm_rtol(total))
        )


def test_clipping_is_seen_on_the_full_gradient(runs, singles):
    for name in (
        "mlp_resharded_clipped",
        "conv_accumulated_clipped",
        "mlp_hybrid_replicas_clipped",
    ):
        frame = pd.read_parquet(runs / f"{name}_0.parquet")
        rows = frame[frame.name == gradprobe.stats.MODEL_NAME].pivot(
            index="step", columns="stat", values="value"
        )
        assert (rows["clipped"] == 1).all(), name
        bound = CASES[name].max_norm
        # clip_grad_norm_ scales by bound / (total + 1e-6): the clipped norm is below the
        # bound by 1e-6 / bound relative (2e-5 for 0.05), plus float32's norm error.
        assert rows["global_grad_norm"].to_numpy() == pytest.approx(bound, rel=1e-4)
        assert (rows["global_grad_norm_preclip"] > bound).all()


def test_a_local_shard_norm_would_have_been_wrong(runs):
    """The test can fail: on each rank the shard's norm is well below the full one."""
    frame = pd.read_parquet(runs / "uneven_adam_0.parquet")
    references = json.loads((runs / "uneven_adam_reference.json").read_text())
    grad = frame[(frame.stat == "grad_norm") & (frame.step == 0)].set_index("name").value
    # 4.weight is [1, 3]: rank 0 holds all of it, rank 1 an empty shard; 0.weight splits 4+3.
    assert grad["4.weight"] == pytest.approx(
        references[0]["grad_norm"]["4.weight"], rel=norm_rtol(3)
    )
    model = build_uneven()
    x, y = batch("uneven", 0)
    loss_of("uneven", model(x), y).backward()
    first_rows = torch.linalg.vector_norm(model[0].weight.grad[:4]).item()
    assert first_rows < 0.99 * grad["0.weight"]


def test_every_rank_holds_the_same_rows_and_only_rank_zero_writes(runs):
    for name in COMBINED:
        a = pd.read_parquet(runs / f"{name}_0.parquet")
        b = pd.read_parquet(runs / f"{name}_1.parquet")
        pd.testing.assert_frame_equal(a, b)
    assert not (runs / "mlp_resharded_clipped_run1").exists()
    stored = gradprobe.load(runs / "mlp_resharded_clipped_run0")
    assert stored.meta["probe"]["world_size"] == WORLD
    names = set(stored.frame().name)
    assert {"0.weight", "6.bias", "0", "5"} <= names  # the user's names, no FSDP prefix
    assert not any("fsdp" in n or "_checkpoint" in n for n in names)
    shapes = {p["name"]: p["shape"] for p in stored.meta["parameters"]}
    assert shapes["0.weight"] == [6, 4]  # the full shape, not a shard's
    pd.testing.assert_frame_equal(
        stored.frame(), pd.read_parquet(runs / "mlp_resharded_clipped_0.parquet")
    )


def test_mixed_precision_within_bf16_rounding_of_float32(runs, singles):
    """bf16 compute against the float32 single process.

    bf16 keeps 8 significant bits: each op rounds by up to 2^-9 ≈ 0.2%, the gradients are
    reduce-scattered in bf16 too, and three steps of training carry the differences into
    the float32 master weights. Measured on this case: at most 1.05% relative (grad_norm;
    error_norm 0.7%, update_ratio 0.9%, act_std 0.6%), and act_mean, a mean of signed
    entries near 0, at most 0.0064 absolute. So: 2% relative, 0.01 absolute, twice what
    was measured; the parameter norms at step 0 (float32 master weights, nothing rounded
    yet) to float32. Bins of the histograms and sat_frac (entries near a threshold) can
    move by one entry per rounding and are left out; zero_frac and dead_frac (exact zeros
    of ReLU) are kept.
    """
    fsdp = pd.read_parquet(runs / "mlp_bf16_0.parquet")
    merged = _merged(fsdp, singles["mlp_bf16"])
    merged = merged[merged.stat != "calls"]
    exact = merged[(merged.stat == "param_norm") & (merged.step == 0)]
    assert len(exact) == 8
    sizes = {n: p.numel() for n, p in build_mlp().named_parameters()}
    for row in exact.itertuples():
        rtol = norm_rtol(sizes[row.name])  # the same weights, summed in another order
        assert row.value_fsdp == pytest.approx(row.value_single, rel=rtol), row.name
    compared = merged[~merged.stat.str.startswith("hist_") & (merged.stat != "sat_frac")]
    assert set(compared.stat) >= {"grad_norm", "update_ratio", "error_norm", "act_std", "zero_frac"}
    for row in compared.itertuples():
        assert row.value_fsdp == pytest.approx(row.value_single, rel=0.02, abs=0.01), (
            row.step,
            row.name,
            row.stat,
        )


def test_error_signals_of_micro_batches_accumulated_without_sync(runs, singles, singles64):
    """Without gradient sync FSDP2 sets the sharded .grad (and calls its hooks) only at
    the last micro-batch: the earlier ones' backward passes must count all the same."""
    name = "conv_accumulated_without_sync"
    fsdp = pd.read_parquet(runs / f"{name}_0.parquet")
    errors = fsdp[fsdp.stat == "error_norm"]
    assert len(errors) > 0
    assert_within_float32_error(errors, singles[name], singles64[name], name)


def test_no_warning_and_no_gap_in_a_sharded_run(runs):
    for name in COMBINED:
        for rank in range(WORLD):
            assert json.loads((runs / f"{name}_{rank}_warnings.json").read_text()) == [], name


def test_ranks_not_combined_leave_sharded_norms_out_with_a_word(runs):
    """sync_ranks=False: no collective, so no norm of a sharded parameter (a shard's norm
    is not the parameter's) and no global norm; module rows are each rank's own."""
    name = "uneven_ranks_not_combined"
    for rank in range(WORLD):
        frame = pd.read_parquet(runs / f"{name}_{rank}.parquet")
        stats = set(frame.stat)
        assert not stats & {"grad_norm", "param_norm", "update_ratio", "global_grad_norm"}
        assert "global_grad_norm_preclip" not in stats and "clipped" not in stats
        assert {"error_norm", "act_mean"} <= stats
        said = json.loads((runs / f"{name}_{rank}_warnings.json").read_text())
        assert len(said) == 1 and "sync_ranks=False" in said[0], said


def test_the_probe_changes_nothing_in_sharded_training(runs):
    for name in UNPROBED_TWINS:
        for rank in range(WORLD):
            assert json.loads((runs / f"{name}_{rank}_twin.json").read_text()) is True, name
