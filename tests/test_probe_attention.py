"""The Probe's attention statistics (attn_logit_max, attn_entropy, attn_entropy_min and the
per-head forms) on the code people train: a nanoGPT block, ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``, the lab's transformer (Hugging Face GPT-2 and LLaMA: in
tests/test_probe_attention_hf.py).

The reference is computed here, independently of gradprobe: the queries and keys the model
itself computes (read by a plain hook on its projection), their scaled products in float64,
the mask, the softmax, the entropy in nats, per head and query row. Batches of at most 8
sequences of at most 32 tokens: the Probe's sample (8 sequences, 32 rows per head) is then
every row, and its numbers are exact up to float32 rounding.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _nanogpt import CausalSelfAttention
from gradprobe import Probe, attention
from gradprobe.hooks import GradprobeWarning

torch.set_num_threads(1)

# The Probe forms float32 logits from the model's float32 q and k (E ≤ 16 products of
# terms of order 1: error a few float32 ulps of the logit, ~1e-6 here); entropies are sums of
# ≤ 32 terms p·log p of those: 1e-5 absolute is wide and holds whatever the vector width.
TOL = 1e-5


def reference(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> dict[str, object]:
    """Attention statistics from q [N, H, L, E], k [N, H, S, E] in float64; ``mask`` [L, S]
    (True takes part) or None. Per head: the largest logit, the mean and the lowest row
    entropy; over all: the max, the mean entropy, the lowest per-head mean."""
    q, k = q.double(), k.double()
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    p = torch.softmax(logits, dim=-1)
    ent = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)  # [N, H, L]
    head_mean = ent.mean(dim=(0, 2))
    return {
        "attn_logit_max": float(logits.amax()),
        "attn_entropy": float(ent.mean()),
        "attn_entropy_min": float(head_mean.min()),
        "attn_head_logit_max": logits.amax(dim=(0, 2, 3)).numpy(),
        "attn_head_entropy": head_mean.numpy(),
        "attn_head_entropy_min": ent.amin(dim=(0, 2)).numpy(),
    }


def heads_of(frame, step: int, name: str, stat: str) -> np.ndarray:
    sub = frame[(frame.step == step) & (frame.name == name) & frame.stat.str.startswith(stat + "/")]
    order = sub.stat.str.rsplit("/", n=1).str[1].astype(int).to_numpy().argsort()
    return sub.value.to_numpy()[order]


def value(frame, step: int, name: str, stat: str) -> float:
    sub = frame[(frame.step == step) & (frame.name == name) & (frame.stat == stat)]
    assert len(sub) == 1, (step, name, stat, len(sub))
    return float(sub.value.iloc[0])


def check(frame, step: int, name: str, ref: dict[str, object]) -> None:
    for stat in ("attn_logit_max", "attn_entropy", "attn_entropy_min"):
        assert value(frame, step, name, stat) == pytest.approx(ref[stat], abs=TOL, rel=TOL), stat
    for stat in ("attn_head_logit_max", "attn_head_entropy", "attn_head_entropy_min"):
        np.testing.assert_allclose(heads_of(frame, step, name, stat), ref[stat], atol=TOL, rtol=TOL)


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


# ---- nanoGPT --------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d)
        self.ln2, self.mlp = (
            nn.LayerNorm(d),
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
        )
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.mlp(self.ln2(x)))


def nanogpt() -> nn.Module:
    return nn.Sequential(Block(), Block(), nn.Linear(32, 8))


def train(model: nn.Module, steps: int, probe_kw: dict | None, seed: int = 0, lr: float = 1e-2):
    """AdamW on random data; with ``probe_kw`` under a Probe. The parameters and the frame."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    probe = Probe(model, opt, **probe_kw) if probe_kw is not None else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 12, 32, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    frame = probe.frame() if probe else None
    if probe:
        probe.close()
    return [p.detach().clone() for p in model.parameters()], frame


def test_attention_modules_are_probed_by_default() -> None:
    from gradprobe.lab.transformer import CausalTransformer
    from story_models import Attn  # named neither …Attention nor by its parameters

    for model, names in [
        (nanogpt(), {"0.attn", "1.attn"}),
        (nn.Sequential(Attn(16, 2)), {"0"}),
        (CausalTransformer(16, 16), {"blocks.0.attn", "blocks.1.attn"}),
    ]:
        with Probe(model) as probe:
            # sequence-only slots (token_cosine on blocks) record nothing else
            chosen = {s.name for s in probe._ctx.slots if not s.sequence_only}
        assert names <= chosen
        for name in chosen - names:  # the rest as before: leaves and modules with parameters
            m = model.get_submodule(name)
            assert not list(m.children()) or list(m.parameters(recurse=False)), name


def test_nanogpt_block_against_float64_from_its_own_q_k() -> None:
    torch.manual_seed(0)
    model = nanogpt()
    qk: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ("0.attn", "1.attn"):
        attn = model.get_submodule(name)

        def keep(m, args, out, name=name, attn=attn):
            q, k, _ = attn.split(out.detach())
            qk[name] = (q, k)

        attn.c_attn.register_forward_hook(keep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs = []
    with Probe(model, opt, every=1, stats="full") as probe:
        for _ in range(3):
            loss = model(torch.randn(5, 9, 32)).square().mean()
            refs.append({n: reference(q, k, causal(9)) for n, (q, k) in qk.items()})
            opt.zero_grad()
            loss.backward()
            opt.step()
        frame = probe.frame()
    for step, ref in enumerate(refs):
        for name, r in ref.items():
            check(frame, step, name, r)
    # attributed to the attention module that made the call, nothing to its parents or parts
    attn_rows = frame[frame.stat == "attn_logit_max"]
    assert set(attn_rows.name) == {"0.attn", "1.attn"}


def _mha_qk(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [N, H, L, E] from a batch-first MHA's in-projection, as torch forms them."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    q = F.linear(x, w[:e], b[:e])
    k = F.linear(x, w[e : 2 * e], b[e : 2 * e])
    n, t, _ = x.shape
    return tuple(z.view(n, t, h, e // h).transpose(1, 2) for z in (q, k))


def test_multihead_attention_with_a_causal_mask() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            mask = ~causal(x.shape[1])  # nn.MultiheadAttention: True is masked
            y, _ = self.mha(x, x, x, attn_mask=mask, need_weights=False)
            return self.out(y)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs = []
    with Probe(model, opt, every=1, stats="full") as probe:
        for _ in range(2):
            x = torch.randn(4, 7, 16)
            refs.append(reference(*_mha_qk(model.mha, x), causal(7)))
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        frame = probe.frame()
    for step, ref in enumerate(refs):
        check(frame, step, "mha", ref)


def test_transformer_encoder_layer_in_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True),
        nn.Linear(16, 3),
    )
    inputs: list[torch.Tensor] = []
    model[0].self_attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1, stats="full") as probe:
        refs = []
        for _ in range(2):
            x = torch.randn(3, 6, 16)
            loss = model(x).square().mean()
            refs.append(reference(*_mha_qk(model[0].self_attn, inputs[-1]), None))
            opt.zero_grad()
            loss.backward()
            opt.step()
        frame = probe.frame()
    for step, ref in enumerate(refs):
        check(frame, step, "0.self_attn", ref)


@pytest.mark.parametrize("every", [1, "auto", 3])
def test_training_is_bit_identical_with_and_without_the_probe(every) -> None:
    torch.manual_seed(0)
    model = nanogpt()
    twin = copy.deepcopy(model)
    with_probe, frame = train(model, 6, {"every": every, "stats": "full"})
    without, _ = train(twin, 6, None)
    for a, b in zip(with_probe, without):
        assert torch.equal(a, b)
    recorded = set(frame[frame.stat == "attn_entropy"].step)
    # Gaps, not zeros: the steps the cadence skips have no attention rows at all.
    expected = {0, 1, 2, 3, 4, 5} if every in (1, "auto") else {0, 3}
    assert recorded == expected


def test_compiled_model_is_a_gap_and_trains_unchanged() -> None:
    torch.manual_seed(0)
    model = nanogpt()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_probe, frame = train(compiled, 3, {"every": 1})
    torch._dynamo.reset()
    without, _ = train(twin, 3, None)
    for a, b in zip(with_probe, without):
        assert torch.allclose(a, b, atol=1e-6)  # aot_eager may reassociate: not bitwise
    assert any(issubclass(w.category, GradprobeWarning) for w in caught)
    assert frame[frame.stat.str.startswith("attn")].empty
    assert not frame[frame.stat == "grad_norm"].empty  # the rest is recorded


def test_a_failing_measurement_is_one_warning_a_gap_and_unchanged_training(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(attention, "_sdpa_call", broken)
    torch.manual_seed(0)
    model = nanogpt()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_probe, frame = train(model, 4, {"every": 1})
    without, _ = train(twin, 4, None)
    for a, b in zip(with_probe, without):
        assert torch.equal(a, b)
    said = [w for w in caught if "injected" in str(w.message)]
    assert len(said) == 2  # once per attention module, not once per call or step
    assert all(issubclass(w.category, GradprobeWarning) for w in said)
    assert frame[frame.stat.str.startswith("attn")].empty
    assert set(frame[frame.stat == "error_norm"].step) == {0, 1, 2, 3}


def test_a_failure_in_one_call_leaves_the_module_out_of_that_step(monkeypatch) -> None:
    """One of two calls of a module fails: the module's step is a gap, not half its calls."""
    real = attention._sdpa_call
    calls = {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_sdpa_call", second_fails)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = CausalSelfAttention(32)

        def forward(self, x):
            return self.attn(self.attn(x))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, frame = train(Twice(), 2, {"every": 1})
    assert set(frame[frame.stat == "attn_entropy"].step) == {1}


def test_eval_fast_path_is_left_alone() -> None:
    """A frozen TransformerEncoderLayer in eval could take the fused path: no watch, a gap."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    enc.requires_grad_(False)
    model = nn.Sequential(enc, nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(2, 5, 16)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Probe(model, opt, every=1) as probe:
            out = model(x)
            out.square().mean().backward()
            opt.step()
            frame = probe.frame()
    assert torch.equal(out.detach(), twin(x))
    assert frame[frame.stat.str.startswith("attn")].empty
    assert any("fused inference path" in str(w.message) for w in caught)


# ---- the diagnose findings on the Probe's own rows ----------------------------------------
def _lab_run(lr: float, qk_norm: bool = False):
    """The lab's causal transformer on x[t] = x[t−1] + x[t−2] mod 16, AdamW with warm-up,
    under a Probe at its default settings: the run holds only what the Probe recorded."""
    from gradprobe.lab.transformer import CausalTransformer, recurrence_split

    torch.manual_seed(0)
    model = CausalTransformer(16, 16, qk_norm=qk_norm)
    data = recurrence_split(32 * 60, 1, 16, 16, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradprobeWarning)  # the live check's lines
        with Probe(model, opt) as probe:
            for s in range(60):
                x, y = data.x_train[s * 32 : (s + 1) * 32], data.y_train[s * 32 : (s + 1) * 32]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                probe.log(loss=loss)
            return probe.run()


ATTENTION_FINDINGS = {"attention_logit_growth", "attention_entropy_collapse"}


def test_diagnose_attention_findings_fire_on_the_probes_rows_at_too_high_a_rate() -> None:
    from gradprobe import diagnose

    high = _lab_run(0.1)
    assert {"attn_logit_max", "attn_entropy", "attn_entropy_min"} <= set(high.stats)
    findings = diagnose(high)
    growth = findings.of("attention_logit_growth")
    assert growth is not None
    assert growth.remedies[0].key == "qk_layernorm"
    collapse = findings.of("attention_entropy_collapse")  # the one-hot heads follow from it
    assert collapse is not None and collapse.cause == "attention_logit_growth"
    # its numbers are the Probe's rows
    table = high.table("attn_logit_max")
    for name, got in growth.evidence["modules"].items():
        assert got["largest"] == pytest.approx(float(table[name].max()), rel=1e-12)
    for healthy in (_lab_run(3e-3), _lab_run(0.1, qk_norm=True)):
        assert not ATTENTION_FINDINGS & set(diagnose(healthy).kinds)


def test_passes_whose_gradients_are_discarded_leave_their_attention_out() -> None:
    """A discriminator's step: its own two passes, then a pass through it whose gradient is
    discarded by the next zero_grad (a GAN's generator step). Its attention statistics are
    those of its own two passes, pooled."""
    torch.manual_seed(0)
    d = nn.Sequential(CausalSelfAttention(32, dropout=0.0), nn.Linear(32, 1))
    qk: list[tuple[torch.Tensor, torch.Tensor]] = []
    d[0].c_attn.register_forward_hook(
        lambda m, a, out: qk.append(tuple(d[0].split(out.detach())[:2]))
    )
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    refs = []
    with Probe(d, opt, every=1, stats="full") as probe:
        for _ in range(3):
            opt.zero_grad()
            qk.clear()
            loss = (
                d(torch.randn(4, 6, 32, generator=g)).mean()
                - d(torch.randn(4, 6, 32, generator=g)).mean()
            )
            loss.backward()
            q = torch.cat([p[0] for p in qk])
            k = torch.cat([p[1] for p in qk])
            refs.append(reference(q, k, causal(6)))
            opt.step()
            d(torch.randn(4, 6, 32, generator=g)).mean().backward()  # discarded by zero_grad
        frame = probe.frame()
    for step, ref in enumerate(refs):
        check(frame, step, "0", ref)


def test_attention_outside_every_probed_module_is_said_once_and_named_modules_record_it() -> None:
    attend = F.scaled_dot_product_attention  # called under another name, as HF does

    class SelfAttn(CausalSelfAttention):  # a name the default selection does not know
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.split(self.c_attn(x))
            return self.c_proj(attend(q, k, v).transpose(1, 2).reshape(b, t, d))

    torch.manual_seed(0)
    model = nn.Sequential(SelfAttn(32, dropout=0.0), nn.Linear(32, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, frame = train(copy.deepcopy(model), 3, {"every": 1})
    said = [w for w in caught if "outside every probed module" in str(w.message)]
    assert len(said) == 1
    assert frame[frame.stat.str.startswith("attn")].empty
    _, frame = train(model, 2, {"every": 1, "modules": ["0", "1"]})
    assert set(frame[frame.stat == "attn_logit_max"].name) == {"0"}


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_call_once(reentrant: bool) -> None:
    """The attention recomputed in backward (torch.utils.checkpoint) runs outside the watch:
    the statistics are those of the forward's calls alone."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.attn, self.out = (
                nn.LayerNorm(32),
                CausalSelfAttention(32),
                nn.Linear(32, 2),
            )

        def forward(self, x):
            h = self.ln(x)
            return self.out(x + checkpoint(self.attn, h, use_reentrant=reentrant))

    torch.manual_seed(0)
    model = Checkpointed()
    qk: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(m, args, out):
        if torch._C._current_graph_task_id() == -1:  # not the recompute inside backward
            qk.append(tuple(model.attn.split(out.detach())[:2]))

    model.attn.c_attn.register_forward_hook(keep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1, stats="full") as probe:
        x = torch.randn(3, 8, 32, requires_grad=reentrant)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        frame = probe.frame()
    assert len(qk) == 1
    check(frame, 0, "attn", reference(*qk[0], causal(8)))


def test_under_bf16_autocast_the_statistics_are_of_the_bf16_q_k() -> None:
    """Under autocast the model's q and k are bfloat16: the Probe measures those (in float32,
    autocast off for the measurement), and training is unchanged."""
    torch.manual_seed(0)
    model = nanogpt()
    twin = copy.deepcopy(model)
    qk: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    attn = model.get_submodule("0.attn")
    attn.c_attn.register_forward_hook(
        lambda m, a, out: qk.update(q_k=tuple(attn.split(out.detach())[:2]))
    )

    def steps(m: nn.Module, probe_kw: dict | None):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        probe = Probe(m, opt, **probe_kw) if probe_kw is not None else None
        torch.manual_seed(1)
        refs = []
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(torch.randn(2, 6, 32)).float().square().mean()
            if qk:
                q, k = qk["q_k"]
                assert q.dtype == torch.bfloat16
                refs.append(reference(q, k, causal(6)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        frame = probe.frame() if probe else None
        if probe:
            probe.close()
        return [p.detach().clone() for p in m.parameters()], frame, refs

    got, frame, refs = steps(model, {"every": 1, "stats": "full"})
    want, _, _ = steps(twin, None)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for step, ref in enumerate(refs):
        # bf16 q, k are exact in float32 and float64: the products differ by float32 rounding
        check(frame, step, "0.attn", ref)
