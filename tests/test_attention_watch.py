"""The attention interception (gradprobe.attention.AttentionWatch) on the code people train:
Hugging Face GPT-2 and LLaMA (GQA) with ``attn_implementation="sdpa"``, a nanoGPT block,
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``.

Each test plays the engine's part: forward hooks keep a stack of the probed modules being
run (``current()``), a list is the sink. What the watch hands over is checked against the
attention weights computed independently (Hugging Face's eager implementation, torch's
``need_weights=True`` weights, or numpy from the module's own projections), the model's
outputs and gradients against a run without the watch (bit-identical), and the paths that
bypass SDPA are checked to stay unseen.
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

from gradprobe import attention
from gradprobe.attention import AttentionWatch, fast_path_at_risk, summarise
from gradprobe.hooks import GradprobeWarning
from test_attention_stats import reference

# Entropies from the reducer (float32 logits from the model's float32 q, k) against weights
# from another float32 computation: both within a few float32 ulps of the exact value on
# logits of order 1, the entropy a sum of ≤ 16 such terms: 1e-5 is wide and CPU-independent.
TOL32 = 1e-5


class Names:
    """The engine's ``current()``: the innermost probed module running now."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, m in model.named_modules():
            if name in names:
                self.handles.append(m.register_forward_pre_hook(lambda *_, n=name: self.enter(n)))
                self.handles.append(m.register_forward_hook(lambda *_: self.leave()))

    def enter(self, name: str) -> None:
        self.stack.append(name)

    def leave(self) -> None:
        self.stack.pop()

    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None


def watched(model: nn.Module, names: list[str], **kw):
    seen: list[tuple[str, attention.AttentionCall]] = []
    tracker = Names(model, names)
    watch = AttentionWatch(tracker.current, lambda n, c: seen.append((n, c)), **kw)
    return watch, seen


def weights_entropy(w: torch.Tensor) -> torch.Tensor:
    """Per-head mean entropy of attention weights [N, H, L, S] (rows that sum to 1)."""
    w = w.double()
    return -(torch.where(w > 0, w * w.log(), 0.0)).sum(-1).mean(dim=(0, 2))


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


# ---- nanoGPT ------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.c_attn(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def nano() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def train_step(model: nn.Module, x: torch.Tensor, watch: AttentionWatch | None, seed: int = 7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout: the same masks only if nothing else draws numbers
    if watch is None:
        out = model(x)
    else:
        with watch:
            out = model(x)
    out.square().mean().backward()
    return out.detach(), grads(model)


def test_nanogpt_block_seen_attributed_and_bit_identical() -> None:
    model, x = nano(), torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1))
    plain_out, plain_grads = train_step(model, x, None)
    watch, seen = watched(model, ["0", "0.attn", "1"], rows=None, batch=None)
    qk = []
    hooks = [
        model[i].attn.c_attn.register_forward_hook(lambda m, a, o: qk.append(o.detach()))
        for i in (0, 1)
    ]
    out, grads_ = train_step(model, x, watch)
    for h in hooks:
        h.remove()
    assert torch.equal(out, plain_out)
    assert all(torch.equal(a, b) for a, b in zip(grads_, plain_grads, strict=True))
    # the innermost probed module makes the call: "0.attn" is probed, block 1's attn is not
    assert [n for n, _ in seen] == ["0.attn", "1"]
    for (_, call), proj in zip(seen, qk, strict=True):
        q, k, _ = (z.view(3, 10, 4, 4).transpose(1, 2) for z in proj.split(16, dim=2))
        top, ent, _ = reference(q.numpy(), k.numpy(), causal=True)  # numpy float64
        np.testing.assert_allclose(
            call.logit_max.numpy(), top.max(axis=(0, 2)), rtol=TOL32, atol=TOL32
        )
        np.testing.assert_allclose(
            call.entropy_mean.numpy(), ent.mean(axis=(0, 2)), rtol=TOL32, atol=TOL32
        )


def test_calls_outside_probed_modules_are_left_alone() -> None:
    model, x = nano(), torch.randn(2, 5, 16)
    watch, seen = watched(model, [])
    with watch:
        model(x)
    assert seen == []


def test_a_failure_is_one_warning_and_the_result_is_unchanged(monkeypatch) -> None:
    model, x = nano(), torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    plain_out, plain_grads = train_step(model, x, None)

    def broken(*_a, **_k):
        raise RuntimeError("injected")

    monkeypatch.setattr(attention, "_sdpa_call", broken)
    watch, seen = watched(model, ["0.attn", "1.attn"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads_ = train_step(model, x, watch)
        out2, _ = train_step(model, x, watch)  # fails again: no second warning
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(ours) == 2 and all("injected" in m for m in ours), ours  # once per module
    assert {"0.attn", "1.attn"} == {m.split("'")[1] for m in ours}
    assert seen == []
    assert torch.equal(out, plain_out) and torch.equal(out2, plain_out)
    assert all(torch.equal(a, b) for a, b in zip(grads_, plain_grads, strict=True))


def test_a_failing_sink_is_a_warning_too() -> None:
    model, x = nano(), torch.randn(2, 6, 16)
    tracker = Names(model, ["0.attn"])

    def sink(_n, _c):
        raise KeyError("engine full")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AttentionWatch(tracker.current, sink):
            out = model(x)
    assert out.shape == x.shape
    assert sum(issubclass(w.category, GradprobeWarning) for w in caught) == 1


# ---- Hugging Face ---------------------------------------------------------------------------


def _hf_twins(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=50,
            bos_token_id=0,
            eos_token_id=0,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:  # LLaMA with grouped-query attention: 4 query heads share 2 key/value heads
        config = LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    torch.manual_seed(0)
    # each its own config: the implementation is written into the config it is given
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == (
        "sdpa",
        "eager",
    )
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


@pytest.mark.parametrize(("kind", "padded"), [("gpt2", False), ("llama", False), ("llama", True)])
def test_hugging_face_sdpa_against_its_eager_weights(kind: str, padded: bool, monkeypatch) -> None:
    sdpa, eager = _hf_twins(kind)
    routes = []  # which SDPA form the model used: GQA in SDPA, or k/v repeated by HF

    def spy(args, kwargs, *rest):
        routes.append((bool(kwargs.get("enable_gqa", False)), args[1].shape[1]))
        return read(args, kwargs, *rest)

    read = attention._sdpa_call
    monkeypatch.setattr(attention, "_sdpa_call", spy)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:  # right padding: the LLaMA path then repeats k/v (repeat_kv) with a mask
        mask[1, 8:] = 0
    blocks = "transformer.h" if kind == "gpt2" else "model.layers"
    names = [f"{blocks}.{i}.{'attn' if kind == 'gpt2' else 'self_attn'}" for i in (0, 1)]
    watch, seen = watched(sdpa, names, rows=None, batch=None)
    torch.manual_seed(5)
    plain = sdpa(ids, attention_mask=mask, labels=ids)
    plain.loss.backward()
    plain_grads = grads(sdpa)
    sdpa.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with watch:
        out = sdpa(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert torch.equal(out.logits, plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(grads(sdpa), plain_grads, strict=True))
    assert [n for n, _ in seen] == names
    want = {"gpt2": (False, 4), "llama": (True, 2)}[kind] if not padded else (False, 4)
    assert routes == [want, want]
    ref = eager(ids, attention_mask=mask, output_attentions=True).attentions
    for (_, call), w in zip(seen, ref, strict=True):
        assert call.entropy_mean.shape == (4,)  # query heads, also under GQA
        torch.testing.assert_close(
            call.entropy_mean.double(), weights_entropy(w), rtol=0, atol=TOL32
        )


def test_hugging_face_eager_attention_bypasses_sdpa() -> None:
    _, eager = _hf_twins("gpt2")
    watch, seen = watched(eager, ["transformer.h.0.attn", "transformer.h.1.attn"])
    with watch:
        eager(torch.randint(0, 50, (2, 8)))
    assert seen == []


# ---- torch.nn ---------------------------------------------------------------------------------


def _mha_reference(mha: nn.MultiheadAttention, x: torch.Tensor, **mask):
    """numpy float64 from the module's own in-projection: per-head logit max and entropy."""
    w, b = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
    e, h = mha.embed_dim, mha.num_heads
    xd = x.double() if mha.batch_first else x.double().transpose(0, 1)
    q, k = (F.linear(xd, w[i * e : (i + 1) * e], b[i * e : (i + 1) * e]) for i in (0, 1))
    n, length = xd.shape[:2]
    q, k = (z.view(n, length, h, e // h).transpose(1, 2).numpy() for z in (q, k))
    top, ent, ok = reference(q, k, **mask)
    top, ent, ok = (np.broadcast_to(z, (n, h, length)) for z in (top, ent, ok))
    return (
        np.where(ok, top, -np.inf).max(axis=(0, 2)),
        np.where(ok, ent, 0).sum(axis=(0, 2)) / ok.sum(axis=(0, 2)),
    )


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal", "padding"])
def test_multihead_attention(need_weights: bool, batch_first: bool, masks: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=batch_first)
    n, length = 3, 7
    x = torch.randn(n, length, 16) if batch_first else torch.randn(length, n, 16)
    kw, ref_mask = {}, {}
    if masks == "causal":
        kw = {
            "attn_mask": nn.Transformer.generate_square_subsequent_mask(length),
            "is_causal": True,
        }
        ref_mask = {"causal": True}
    elif masks == "padding":  # True: a padded key (nn.MultiheadAttention's sense)
        pad = torch.zeros(n, length, dtype=torch.bool)
        pad[1, 5:] = True
        kw = {"key_padding_mask": pad}
        ref_mask = {"mask": (~pad).numpy()[:, None, None, :]}
    watch, seen = watched(mha, [""], rows=None, batch=None)
    torch.manual_seed(1)
    plain = mha(x, x, x, need_weights=need_weights, **kw)[0]
    torch.manual_seed(1)
    with watch:
        out = mha(x, x, x, need_weights=need_weights, **kw)[0]
    assert torch.equal(out, plain)
    ((name, call),) = seen
    assert name == ""
    top, ent = _mha_reference(mha, x, **ref_mask)
    np.testing.assert_allclose(call.logit_max.numpy(), top, rtol=TOL32, atol=TOL32)
    np.testing.assert_allclose(call.entropy_mean.numpy(), ent, rtol=TOL32, atol=TOL32)


def test_transformer_encoder_layer_in_training() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True),
        num_layers=2,
        enable_nested_tensor=False,
    )
    x = torch.randn(2, 9, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    watch, seen = watched(model, ["layers.0", "layers.1"], rows=None, batch=None)
    inputs = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
        for layer in model.layers
    ]
    torch.manual_seed(3)
    plain = model(x, mask=causal, is_causal=True)
    plain.sum().backward()
    plain_grads = grads(model)
    model.zero_grad(set_to_none=True)
    inputs.clear()
    torch.manual_seed(3)
    with watch:
        out = model(x, mask=causal, is_causal=True)
    out.sum().backward()
    for h in hooks:
        h.remove()
    assert torch.equal(out, plain)
    assert all(torch.equal(a, b) for a, b in zip(grads(model), plain_grads, strict=True))
    assert [n for n, _ in seen] == ["layers.0", "layers.1"]
    for (_, call), layer, xin in zip(seen, model.layers, inputs, strict=True):
        # post-LN layer: self-attention reads the layer's input itself
        top, ent = _mha_reference(layer.self_attn, xin, causal=True)
        np.testing.assert_allclose(call.logit_max.numpy(), top, rtol=TOL32, atol=TOL32)
        np.testing.assert_allclose(call.entropy_mean.numpy(), ent, rtol=TOL32, atol=TOL32)


def test_the_eval_fast_path_is_flagged() -> None:
    # In eval with grad off, nn.MultiheadAttention / TransformerEncoderLayer take a fused
    # path that any torch-function mode turns off: the engine must not enter the watch then.
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    model = nn.Sequential(nn.Linear(16, 16), layer)
    assert not fast_path_at_risk(model)  # training
    layer.eval()
    assert not fast_path_at_risk(model)  # eval but trained through (grad on, parameters train)
    with torch.no_grad():
        assert fast_path_at_risk(model)
    layer.requires_grad_(False)
    assert fast_path_at_risk(model)  # a frozen eval-mode encoder inside a trained model


def test_manual_attention_is_not_seen() -> None:
    # code computing softmax(q·kᵀ) itself (eager implementations, flash_attn kernels) never
    # reaches SDPA: nothing is recorded, and nothing breaks
    class Manual(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), -1) @ v

    m = Manual()
    watch, seen = watched(m, [""])
    q = torch.randn(1, 2, 4, 8)
    with watch:
        m(q, q, q)
    assert seen == []


def test_summarise_of_watched_calls_names_the_fixed_statistics() -> None:
    model, x = nano(), torch.randn(2, 6, 16)
    watch, seen = watched(model, ["0.attn"])
    with watch:
        model(x)
        model(x)  # two calls in one step (gradient accumulation): pooled
    stats = summarise([c for _, c in seen])
    assert {"attn_logit_max", "attn_entropy", "attn_entropy_min"} <= set(stats)
    assert stats["attn_head_entropy"].shape == (4,)
    assert stats["attn_entropy_min"] <= stats["attn_entropy"] <= math.log(6) + 1e-6


@pytest.mark.slow
def test_compiled_model_runs_unchanged_and_is_a_gap() -> None:
    model, x = nano(), torch.randn(2, 6, 16)
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    plain = compiled(x)
    watch, seen = watched(model, ["0.attn", "1.attn"])
    with watch:
        out = compiled(x)  # dynamo traces through the mode, which measures nothing then
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert seen == []


def test_under_autocast_the_measurement_stays_float32() -> None:
    # The user's autocast must not make the measurement's matmul half precision again.
    model, x = nano(), torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(4))
    watch, seen = watched(model, ["0.attn"], rows=None, batch=None)
    qk = []
    model[0].attn.c_attn.register_forward_hook(lambda m, a, o: qk.append(o.detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16), watch:
        model(x)
    ((_, call),) = seen
    assert qk[0].dtype == torch.bfloat16 and call.entropy_mean.dtype == torch.float32
    q, k, _ = (z.view(2, 12, 4, 4).transpose(1, 2) for z in qk[0].split(16, dim=2))
    top, ent, _ = reference(q.double().numpy(), k.double().numpy(), causal=True)
    # float32 arithmetic on the bf16 values: ~1e-6 relative; a bf16 matmul would be ~1e-2
    np.testing.assert_allclose(call.logit_max.numpy(), top.max(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        call.entropy_mean.numpy(), ent.mean(axis=(0, 2)), rtol=1e-5, atol=1e-5
    )


def test_a_tensor_subclass_is_not_measured() -> None:
    # (a DTensor's matmul would run collectives): one warning, no record, the call unchanged
    class Marked(torch.Tensor):
        pass

    seen = []
    q = torch.randn(1, 2, 4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AttentionWatch(lambda: "attn", lambda n, c: seen.append(c)):
            out = F.scaled_dot_product_attention(q.as_subclass(Marked), q, q)
    assert seen == []
    assert torch.equal(out.as_subclass(torch.Tensor), F.scaled_dot_product_attention(q, q, q))
    assert sum(issubclass(w.category, GradprobeWarning) for w in caught) == 1


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_call_once(reentrant: bool) -> None:
    # The recomputation runs in backward, outside the watch (entered around the forward).
    from torch.utils.checkpoint import checkpoint

    model, x = nano(), torch.randn(2, 6, 16, requires_grad=True)
    watch, seen = watched(model, ["0.attn", "1.attn"])
    with watch:
        out = checkpoint(model, x, use_reentrant=reentrant)
    out.sum().backward()
    assert [n for n, _ in seen] == ["0.attn", "1.attn"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_attention_measured_without_host_syncs() -> None:
    from gradprobe.attention import attention_stats
    from gradprobe.sequence import error_time, logit_stats, time_sq_norms, token_cosine

    model = nano().cuda().to(torch.bfloat16)
    x = torch.randn(4, 64, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    watch, seen = watched(model, ["0.attn", "1.attn"])
    qk = []
    model[0].attn.c_attn.register_forward_hook(lambda m, a, o: qk.append(o.detach()))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host wait raises
    try:
        with watch:
            out = model(x)
        out.float().square().sum().backward()
        stats = summarise([c for n, c in seen if n == "0.attn"])
        token_cosine(out)
        logit_stats(out)
        error_time(time_sq_norms(x.grad))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [n for n, _ in seen] == ["0.attn", "1.attn"]
    q, k, _ = (z.view(4, 64, 4, 4).transpose(1, 2) for z in qk[0].split(16, dim=2))
    cpu = attention_stats(q.cpu(), k.cpu(), is_causal=True)  # the same sample, on the CPU
    torch.testing.assert_close(
        stats["attn_head_entropy"].cpu(), cpu.entropy_mean, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        stats["attn_head_logit_max"].cpu(), cpu.logit_max, rtol=1e-4, atol=1e-4
    )
