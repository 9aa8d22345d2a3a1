"""The sequence statistics from the Probe (issue 25 §2-3): ``token_cosine`` on the blocks of
a sequence model, ``logit_max``/``logit_z`` on its final projection, ``error_time_*`` on
recurrent modules, each against an independent computation (numpy cosines, float64
logsumexp, float64 autograd), under gradient accumulation, at every step and on a cadence,
training bit-identical with and without the Probe; and the findings that read them.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe, diagnose

STATS = ["token_cosine", "logit_max", "logit_z", "error_time_first", "error_time_last"]
TIME_STATS = ["error_time_first", "error_time_last", "error_time_slope"]


def _value(frame, step: int, name: str, stat: str) -> float:
    rows = frame[(frame.step == step) & (frame.name == name) & (frame.stat == stat)]
    assert len(rows) == 1, (step, name, stat, len(rows))
    return float(rows.value.iloc[0])


# ---------------------------------------------------------------- independent references
def _cosines(y: np.ndarray) -> tuple[float, float]:
    """Sum and count of cosines over ordered pairs of distinct positions, per sequence:
    ``y`` [sequences, T, F] in float64 (every position: T ≤ 32 here, so the Probe samples
    them all)."""
    unit = y / np.linalg.norm(y, axis=-1, keepdims=True)
    gram = np.einsum("ntf,nsf->nts", unit, unit)
    t = y.shape[1]
    off = ~np.eye(t, dtype=bool)
    return float(gram[:, off].sum()), float(y.shape[0] * t * (t - 1))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def _summary(sq: np.ndarray) -> tuple[float, float, float]:
    """First/last quarter means of the norms and the slope of log10 norm (np.polyfit)."""
    norms = np.sqrt(sq)
    q = max(1, len(norms) // 4)
    slope = np.polyfit(np.arange(len(norms)), np.log10(norms), 1)[0]
    return norms[:q].mean(), norms[-q:].mean(), slope


# ---------------------------------------------------------------- a small transformer
class Encoder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens if self.batch_first else tokens.T)
        return self.head(self.encoder(x))  # [N, T, V] or [T, N, V]


@pytest.mark.parametrize("batch_first", [True, False])
def test_token_cosine_and_logits_equal_numpy_under_accumulation(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = Encoder(batch_first)
    twin = copy.deepcopy(model)
    data = [torch.randint(0, 20, (4, 10)) for _ in range(6)]  # 3 steps × 2 micro-batches
    outputs: list[dict[str, np.ndarray]] = []

    def keep(name: str):
        def hook(_m, _i, out):
            outputs[-1][name] = out.detach().double().numpy()

        return hook

    for name in ("encoder.layers.0", "encoder.layers.1", "head"):
        twin.get_submodule(name).register_forward_hook(keep(name))

    def train(m: nn.Module, probed: bool = False, record: bool = False) -> Probe | None:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        probe = Probe(m, opt, every=1) if probed else None
        for i, tokens in enumerate(data):
            if record:
                outputs.append({})
            logits = m(tokens)
            target = tokens if batch_first else tokens.T
            loss = nn.functional.cross_entropy(logits.reshape(-1, 20), target.reshape(-1)) / 2
            loss.backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
        return probe

    probe = train(model, probed=True)
    assert probe is not None
    frame = probe.frame()
    probe.close()
    train(twin, record=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # training bit-identical with and without the Probe
    for step in range(3):
        calls = outputs[2 * step : 2 * step + 2]
        for block in ("encoder.layers.0", "encoder.layers.1"):
            sums = [
                _cosines(c[block] if batch_first else c[block].transpose(1, 0, 2)) for c in calls
            ]
            expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
            # float32 cosines of 16-wide vectors: each within ~16·6e-8; their mean too
            assert _value(frame, step, block, "token_cosine") == pytest.approx(expected, abs=1e-5)
        logits = np.concatenate([c["head"].reshape(-1, 20) for c in calls])
        # the maximum is exact: the largest float32 logit, read in float64
        assert _value(frame, step, "head", "logit_max") == logits.max()
        # logsumexp in float32 per position: relative error ~1e-6 of z ≈ 3
        z = _logsumexp(logits).mean()
        assert _value(frame, step, "head", "logit_z") == pytest.approx(z, rel=1e-5)
    # blocks are not probed modules: only the sequence statistics are recorded there
    assert set(frame[frame.name == "encoder.layers.0"].stat) == {"token_cosine"}
    assert "encoder.layers.0" not in [m["name"] for m in probe.meta["modules"]]


def test_explicit_modules_choose_the_sites() -> None:
    model = Encoder(True)
    with Probe(model, modules=["head"], every=1) as probe:
        model(torch.randint(0, 20, (2, 5))).sum().backward()
        probe.step()
        frame = probe.frame()
    assert set(frame[frame.stat == "logit_z"].name) == {"head"}
    assert frame[frame.stat == "token_cosine"].empty  # no block selected: none measured


# ---------------------------------------------------------------- recurrent: error through time
class Fused(nn.Module):
    def __init__(self, cls: type[nn.Module], batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, 8)
        self.rnn = cls(8, 12, batch_first=batch_first)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, T, 3]
        u = self.inp(x if self.batch_first else x.transpose(0, 1))
        out, _ = self.rnn(u)
        return self.head(out[:, -1] if self.batch_first else out[-1])  # loss on the last step


class CellLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.cell = nn.LSTMCell(8, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], 12)
        for t in range(x.shape[1]):
            h, c = self.cell(self.inp(x[:, t]), (h, c))
            if keep is not None:
                keep.append(h)
        return self.head(h)


def _reference_time(model: nn.Module, batches) -> np.ndarray:
    """Σ over micro-batches of ‖dL/d(error site)[:, t]‖², by float64 autograd on a copy of
    the model's current weights: the recurrent module's input (fused) or each cell call's
    output h_t (a cell loop)."""
    ref = copy.deepcopy(model).double()
    total = 0.0
    for x, y in batches:
        x = x.double()
        if isinstance(ref, CellLoop):
            hs: list[torch.Tensor] = []
            loss = nn.functional.cross_entropy(ref(x, hs), y) / len(batches)
            grads = torch.autograd.grad(loss, hs)
            sq = np.array([float(g.square().sum()) for g in grads])
        else:
            site: list[torch.Tensor] = []
            handle = ref.rnn.register_forward_pre_hook(lambda _m, a, site=site: site.append(a[0]))
            loss = nn.functional.cross_entropy(ref(x), y) / len(batches)
            handle.remove()
            (g,) = torch.autograd.grad(loss, site)
            time_dim = 1 if ref.batch_first else 0
            dims = tuple(d for d in range(3) if d != time_dim)
            sq = g.square().sum(dim=dims).numpy()
        total = total + sq
    return total


@pytest.mark.parametrize(
    "make",
    [
        lambda: Fused(nn.LSTM, True),
        lambda: Fused(nn.GRU, False),
        lambda: Fused(nn.RNN, True),
        CellLoop,
    ],
    ids=["lstm", "gru_seq_first", "rnn", "lstm_cell_loop"],
)
def test_error_through_time_equals_float64_autograd(make) -> None:
    torch.manual_seed(1)
    model = make()
    twin = copy.deepcopy(model)
    name = "cell" if isinstance(model, CellLoop) else "rnn"
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 16, 3, generator=gen), torch.randint(0, 4, (5,), generator=gen))]
    batches += [(torch.randn(5, 16, 3, generator=gen), torch.randint(0, 4, (5,), generator=gen))]
    steps = 3
    references = []
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with Probe(model, opt, every=1) as probe:
        for _ in range(steps):
            references.append(_reference_time(model, batches))  # the weights of this step
            for x, y in batches:  # two micro-batches per step
                (nn.functional.cross_entropy(model(x), y) / 2).backward()
            opt.step()
            opt.zero_grad()
        frame = probe.frame()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    for _ in range(steps):
        for x, y in batches:
            (nn.functional.cross_entropy(twin(x), y) / 2).backward()
        twin_opt.step()
        twin_opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for step, sq in enumerate(references):
        first, last, slope = _summary(sq)
        # float32 backward through 16 steps against float64: relative error ≲ 1e-5 per
        # norm; the slope (decades) then within 1e-5/ln 10 per point
        assert _value(frame, step, name, "error_time_first") == pytest.approx(first, rel=1e-4)
        assert _value(frame, step, name, "error_time_last") == pytest.approx(last, rel=1e-4)
        assert _value(frame, step, name, "error_time_slope") == pytest.approx(slope, abs=1e-4)


def test_cadence_leaves_unrecorded_steps_without_rows() -> None:
    torch.manual_seed(0)
    model = Fused(nn.LSTM, True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 8, 3), torch.randint(0, 4, (4,))
    with Probe(model, opt) as auto:  # the default cadence, "auto"
        for _ in range(22):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        frame = auto.frame()
    for stat in [*TIME_STATS, "logit_z"]:
        steps = sorted(frame[frame.stat == stat].step)
        assert steps == list(range(20)), stat  # "auto": the first 20 steps, then every 50th
    model3 = Fused(nn.LSTM, True)
    opt3 = torch.optim.SGD(model3.parameters(), lr=0.1)
    with Probe(model3, opt3, every=3) as probe:
        for _ in range(7):
            nn.functional.cross_entropy(model3(x), y).backward()
            opt3.step()
            opt3.zero_grad()
        frame3 = probe.frame()
    for stat in [*TIME_STATS, "logit_max"]:
        assert sorted(frame3[frame3.stat == stat].step) == [0, 3, 6], stat


# ---------------------------------------------------------------- Hugging Face GPT-2
def test_hugging_face_gpt2_blocks_and_lm_head() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 50, (3, 12))
    with Probe(model, every=1) as probe:
        model(tokens, labels=tokens).loss.backward()
        probe.step()
        frame = probe.frame()
    assert set(frame[frame.stat == "token_cosine"].name) == {"transformer.h.0", "transformer.h.1"}
    assert set(frame[frame.stat == "logit_z"].name) == {"lm_head"}
    out = twin(tokens, labels=tokens, output_hidden_states=True)
    # hidden_states[1] is block 0's output (the last one has ln_f applied after the block)
    total, count = _cosines(out.hidden_states[1].detach().double().numpy())
    assert _value(frame, 0, "transformer.h.0", "token_cosine") == pytest.approx(
        total / count, abs=1e-5
    )
    logits = out.logits.detach().double().numpy().reshape(-1, 50)
    assert _value(frame, 0, "lm_head", "logit_max") == logits.max()
    assert _value(frame, 0, "lm_head", "logit_z") == pytest.approx(
        _logsumexp(logits).mean(), rel=1e-5
    )


# ---------------------------------------------------------------- findings from real probed stats
def _rnn(length: int) -> tuple[Probe, nn.Module]:
    """A vanilla tanh RNN whose recurrent weight is 0.95 × orthogonal, the loss on the last
    step only: the error loses a little at each step back (0.95 × tanh'), below
    TIME_ERROR_DECAY over 4 steps, but more than two decades over 64."""
    torch.manual_seed(0)
    model = Fused(nn.RNN, True)
    with torch.no_grad():
        nn.init.orthogonal_(model.rnn.weight_hh_l0)
        model.rnn.weight_hh_l0.mul_(0.95)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = Probe(model, opt, every=1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        x, y = torch.randn(8, length, 3, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        probe.log(loss=loss)
        opt.step()
        opt.zero_grad()
    return probe, model


def test_vanishing_through_time_found_on_a_long_sequence_not_a_short_one() -> None:
    long_probe, _ = _rnn(64)
    found = diagnose(long_probe).of("vanishing")
    long_probe.close()
    assert found is not None and "time_error" in found.evidence["modes"]
    evidence = found.evidence["time_error"]["rnn"]
    assert evidence["first_last_ratio"] < 1e-2
    short_probe, _ = _rnn(4)
    short = diagnose(short_probe).of("vanishing")
    short_probe.close()
    assert short is None or "time_error" not in short.evidence["modes"]


class AttentionOnly(nn.Module):
    """Attention without residuals or norms (Dong et al. 2021): tokens collapse with depth."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_rank_collapse_found_at_init_in_a_deep_attention_only_stack() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *[AttentionOnly() for _ in range(12)], nn.Linear(16, 5))
    with Probe(model, every=1) as probe:
        model(torch.randn(4, 20, 8)).pow(2).mean().backward()
        probe.step()
        frame = probe.frame()
        found = diagnose(probe).of("rank_collapse")
    cos = frame[frame.stat == "token_cosine"].set_index("name").value
    assert cos["1"] < cos["12"]  # the tokens converge through the blocks
    assert found is not None and "init" in found.evidence["modes"]
    assert found.evidence["blocks"][-1] == "12"
    assert math.isclose(found.evidence["token_cosine_init"][-1], cos["12"])


def test_packed_sequence_input_has_no_series() -> None:
    """A PackedSequence's rows interleave the sequences' time steps: no series (a gap),
    and the module's other rows as before."""
    torch.manual_seed(0)
    inp, lstm = nn.Linear(3, 8), nn.LSTM(8, 6, batch_first=True)
    model = nn.ModuleDict({"inp": inp, "lstm": lstm})
    x = torch.randn(3, 7, 3)
    with Probe(model, every=1) as probe:
        packed = nn.utils.rnn.pack_padded_sequence(inp(x), [7, 5, 2], batch_first=True)
        _, (h, _) = lstm(packed)
        h[-1].sum().backward()
        probe.step()
        frame = probe.frame()
    assert frame[frame.stat.isin(TIME_STATS)].empty
    assert not frame[(frame.name == "lstm") & (frame.stat == "calls")].empty


def test_micro_batches_of_different_lengths_align_at_the_first_step() -> None:
    """A step of a 12-step and an 8-step micro-batch: the series is their squares added
    position by position from t = 0 (the shorter one as if padded with zeros)."""
    torch.manual_seed(3)
    model = Fused(nn.LSTM, True)
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(4, 12, 3, generator=gen), torch.randint(0, 4, (4,), generator=gen)),
        (torch.randn(4, 8, 3, generator=gen), torch.randint(0, 4, (4,), generator=gen)),
    ]
    # each loss / 2, as trained: its squared error norms / 4
    parts = [_reference_time(model, [b]) / 4 for b in batches]
    sq = parts[0] + np.pad(parts[1], (0, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1) as probe:
        for x, y in batches:
            (nn.functional.cross_entropy(model(x), y) / 2).backward()
        opt.step()
        frame = probe.frame()
    first, last, slope = _summary(sq)
    assert _value(frame, 0, "rnn", "error_time_first") == pytest.approx(first, rel=1e-4)
    assert _value(frame, 0, "rnn", "error_time_last") == pytest.approx(last, rel=1e-4)
    assert _value(frame, 0, "rnn", "error_time_slope") == pytest.approx(slope, abs=1e-4)


# ---------------------------------------------------------------- DDP: series summed over ranks
def _ddp_train(model: nn.Module, rank: int, world: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1, stats=[*TIME_STATS, "logit_max", "logit_z"]) as probe:
        for step in range(2):
            g = torch.Generator().manual_seed(10 + step)
            x, y = torch.randn(8, 10, 3, generator=g), torch.randint(0, 4, (8,), generator=g)
            n = len(x) // world
            x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return probe.frame()


def _ddp_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(5)
        ddp = nn.parallel.DistributedDataParallel(Fused(nn.LSTM, True))
        _ddp_train(ddp, rank, 2).to_parquet(f"{out}/frame{rank}.parquet")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_series_add_up_over_ranks_as_one_process_on_the_global_batch(tmp_path) -> None:
    """Each rank's half of the batch, a mean loss: DDP applies the mean of the ranks'
    losses, the single process's loss on the whole batch; the per-step squares add up
    over the ranks (then × world⁻², as err_sumsq) to the single process's."""
    import pandas as pd
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    torch.manual_seed(5)
    single = _ddp_train(Fused(nn.LSTM, True), 0, 1)
    ddp = pd.read_parquet(tmp_path / "frame0.parquet")
    assert ddp.equals(pd.read_parquet(tmp_path / "frame1.parquet"))  # every rank: the same rows
    keys = ["step", "name", "stat"]
    merged = ddp.merge(single, on=keys, suffixes=("_ddp", "_one"), how="outer")
    assert set(merged.stat) == {*TIME_STATS, "logit_max", "logit_z"}
    assert merged.value_ddp.notna().all() and merged.value_one.notna().all()
    # float32 sums in another order: relative differences of ~1e-6 (slopes: absolute)
    slope = merged.stat == "error_time_slope"
    assert np.allclose(merged.value_ddp[~slope], merged.value_one[~slope], rtol=1e-5, atol=0)
    assert np.allclose(merged.value_ddp[slope], merged.value_one[slope], rtol=0, atol=1e-5)


def test_a_failing_measurement_is_a_warning_and_a_gap(monkeypatch) -> None:
    import gradprobe.recording.sequences as sequences
    from gradprobe.hooks import GradprobeWarning

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sequences, "token_cosine", broken)
    torch.manual_seed(0)
    model = Encoder(True)
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 20, (2, 6))
    with pytest.warns(GradprobeWarning, match="sequence statistics"), Probe(model, every=1) as p:
        model(tokens).sum().backward()
        p.step()
        frame = p.frame()
    twin(tokens).sum().backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert frame[frame.stat == "token_cosine"].empty
    assert not frame[(frame.name == "head") & (frame.stat == "logit_z")].empty


# ---------------------------------------------------------------- which modules are sites
class NanoAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in self.c_attn(x).split(c, 2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class NanoBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), NanoAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 30, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, d),
                "h": nn.ModuleList([NanoBlock(d) for _ in range(layers)]),
                "ln_f": nn.LayerNorm(d),
            }
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as nanoGPT

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _sites(model: nn.Module) -> tuple[list[str], str | None, list[str]]:
    from gradprobe.recording.bindings import select_modules
    from gradprobe.recording.sequences import sequence_sites

    slots = select_modules(model, None)
    extra, sites = sequence_sites(model, slots, explicit=False)
    names = [s.name for s in slots + extra]
    blocks = [names[k] for k in sorted(sites.blocks)]
    recurrent = sorted(names[k] for k in [*sites.fused, *sites.cells])
    return blocks, (names[sites.head] if sites.head is not None else None), recurrent


def test_sites_of_common_models() -> None:
    assert _sites(NanoGPT()) == (
        ["transformer.h.0", "transformer.h.1", "transformer.h.2"],
        "lm_head",
        [],
    )
    assert _sites(Encoder(True)) == (["encoder.layers.0", "encoder.layers.1"], "head", [])
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert _sites(mlp) == ([], "2", [])
    assert _sites(Fused(nn.GRU, True)) == ([], "head", ["rnn"])
    assert _sites(CellLoop()) == ([], "head", ["cell"])
    # a Sequential around an encoder: its layers are the blocks, not the encoder
    wrapped = nn.Sequential(Encoder(True).encoder, nn.Linear(16, 5))
    assert _sites(wrapped) == (["0.layers.0", "0.layers.1"], "1", [])
    # an encoder without a head: no final projection (not a layer's linear2)
    assert _sites(Encoder(True).encoder)[1] is None


def test_nanogpt_token_cosine_and_logits_through_a_tied_head() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    twin = copy.deepcopy(model)
    idx = torch.randint(0, 30, (3, 9))
    with Probe(model, every=1) as probe:
        model(idx, idx)[1].backward()
        probe.step()
        frame = probe.frame()
    seen: dict[str, np.ndarray] = {}
    for name in ("transformer.h.2", "lm_head"):
        twin.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach().double().numpy())
        )
    twin(idx, idx)
    total, count = _cosines(seen["transformer.h.2"])
    assert _value(frame, 0, "transformer.h.2", "token_cosine") == pytest.approx(
        total / count, abs=1e-5
    )
    logits = seen["lm_head"].reshape(-1, 30)
    assert _value(frame, 0, "lm_head", "logit_z") == pytest.approx(
        _logsumexp(logits).mean(), rel=1e-5
    )


def test_sites_of_hugging_face_llama() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert _sites(model) == (["model.layers.0", "model.layers.1"], "lm_head", [])
