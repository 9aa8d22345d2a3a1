"""How the attention watch is wired into training code as strangers write it: activation
checkpointing around nn.TransformerEncoderLayer / nn.MultiheadAttention, submodules called
one by one, SDPA under torch.vmap, attention that bypasses SDPA. Each against an un-probed
twin (training bit-identical) and, where values are recorded, a float64 reference."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from _nanogpt import CausalSelfAttention
from gradprobe import Probe

torch.set_num_threads(1)


def _gradprobe_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("gradprobe")]


def _run(model: nn.Module, batches, probe_kw: dict | None, forward=None):
    """SGD on ``batches`` (each x), loss = mean square of the output; with ``probe_kw``
    under a Probe. The parameters, the frame, the gradprobe warnings."""
    forward = forward or (lambda m, x: m(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)  # dropout draws the same in both runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = Probe(model, opt, **probe_kw) if probe_kw is not None else None
        for x in batches:
            loss = forward(model, x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        frame = probe.frame() if probe else None
        if probe:
            probe.close()
    params = [p.detach().clone() for p in model.parameters()]
    return params, frame, _gradprobe_warnings(caught)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---- 1. activation checkpointing around nn.TransformerEncoderLayer / nn.MultiheadAttention
class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool, mha: bool) -> None:
        super().__init__()
        self.reentrant, self.mha = reentrant, mha
        if mha:
            self.layer = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True)
        else:
            self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def _layer(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer(h, h, h, need_weights=False)[0] if self.mha else self.layer(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self._layer, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("mha", [False, True], ids=["encoder_layer", "mha"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_attention_trains_unchanged_and_is_recorded(
    reentrant: bool, mha: bool
) -> None:
    torch.manual_seed(0)
    model = _Checkpointed(reentrant, mha)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 6, 16, generator=g, requires_grad=reentrant) for _ in range(3)]
    probed, frame, said = _run(model, batches, {"every": 1})
    plain, _, _ = _run(twin, batches, None)
    assert _same(probed, plain)
    name = "layer" if mha else "layer.self_attn"
    rows = frame[(frame.stat == "attn_logit_max") & (frame.name == name)]
    assert sorted(rows.step) == [0, 1, 2]
    assert not [w for w in said if "attention" in w], said


# ---- 3. submodules called one by one (a backbone, then a head: SSL / custom loss code)
class Block(nn.Module):
    def __init__(self, flash: bool = True) -> None:
        super().__init__()
        self.ln, self.attn, self.mlp = (
            nn.LayerNorm(16),
            CausalSelfAttention(16, 2, dropout=0.0, flash=flash),
            nn.Linear(16, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln(x))
        return x + self.mlp(x)


class Split(nn.Module):
    def __init__(self, flash: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(Block(flash), Block(flash))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def reference(q: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
    """Causal attention statistics of q, k [N, H, L, E] in float64, by hand."""
    q, k = q.double(), k.double()
    n = q.shape[-2]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf
    )
    p = torch.softmax(logits, dim=-1)
    ent = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)
    return {
        "attn_logit_max": float(logits.amax()),
        "attn_entropy": float(ent.mean()),
        "attn_entropy_min": float(ent.mean(dim=(0, 2)).min()),
    }


def _apart(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = m.backbone(x)  # the submodules called one by one, never the root
    return m.head(h)


def test_submodules_called_apart_record_attention_as_the_model_does() -> None:
    torch.manual_seed(0)
    model = Split()
    twin = copy.deepcopy(model)
    qk: dict[str, list] = {"0.attn": [], "1.attn": []}
    for name in qk:
        attn = model.backbone.get_submodule(name)
        attn.c_attn.register_forward_hook(
            lambda m, a, out, name=name, attn=attn: qk[name].append(attn.split(out.detach())[:2])
        )
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 16, generator=g) for _ in range(3)]
    probed, frame, said = _run(model, batches, {"every": 1}, forward=_apart)
    plain, _, _ = _run(twin, batches, None, forward=_apart)
    assert _same(probed, plain)
    assert not [w for w in said if "attention" in w], said
    # float32 logits from float32 q, k (E = 8): a few ulps, ~1e-6; entropies sums of 7
    # terms of those: 1e-5 holds whatever the vector width
    for name, calls in qk.items():
        for step, (q, k) in enumerate(calls):
            ref = reference(q, k)
            for stat, want in ref.items():
                sub = frame[
                    (frame.step == step) & (frame.name == f"backbone.{name}") & (frame.stat == stat)
                ]
                assert len(sub) == 1, (step, name, stat)
                assert float(sub.value.iloc[0]) == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_a_submodule_that_raises_leaves_no_watch_entered() -> None:
    torch.manual_seed(0)
    model = Split()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1):
        with pytest.raises(RuntimeError):
            model.backbone(torch.randn(2, 5, 3))  # the wrong width: the user's error, unchanged
        assert torch._C._len_torch_function_stack() == 0
        _apart(model, torch.randn(2, 5, 16)).square().mean().backward()
        assert torch._C._len_torch_function_stack() == 0
        opt.step()


# ---- 2. nn.MultiheadAttention: the q/k projection of the sampled rows only
def _runs(n: int, m: int) -> list[tuple[int, int]]:
    """The documented sample: ``min(m, n)`` runs ``[⌊jn/m⌋, ⌊(j+1)n/m⌋)``, each its
    middle row ``lo + ⌊(size − 1)/2⌋`` weighted by its size (docs: module docstring)."""
    m = min(m, n)
    out = []
    for j in range(m):
        lo, hi = j * n // m, (j + 1) * n // m
        out.append((lo + (hi - lo - 1) // 2, hi - lo))
    return out


def _mha_sampled_reference(mha, x, case: str, extra: dict, rows: int, batch: int):
    """Per-head logit max and weighted mean entropy of the sampled rows, in float64 from
    the full projection (every sequence and row), masks as nn.MultiheadAttention reads them."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
    xd = x.double()  # [L, N, E] (sequence-first)
    length, n, _ = xd.shape
    q = (xd @ w[:e].T + b[:e]).reshape(length, n, h, e // h).permute(1, 2, 0, 3)
    kf = xd @ w[e : 2 * e].T + b[e : 2 * e]  # [S, N, E]
    allowed = torch.ones(n, h, length, length, dtype=torch.bool)
    add = torch.zeros(n, h, length, length, dtype=torch.float64)
    if case == "bias_zero":
        kf = torch.cat([kf, mha.bias_k.detach().double().expand(1, n, e)])
    k = kf.reshape(kf.shape[0], n, h, e // h).permute(1, 2, 0, 3)
    if case == "bias_zero":
        k = torch.cat([k, torch.zeros(n, h, 1, e // h, dtype=torch.float64)], dim=2)
        allowed = torch.ones(n, h, length, length + 2, dtype=torch.bool)
        add = torch.zeros(n, h, length, length + 2, dtype=torch.float64)
    if case == "padding":
        allowed &= ~extra["key_padding_mask"][:, None, None, :]
    elif case == "causal":
        allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    elif case == "mask3d":
        add = extra["attn_mask"].double().reshape(n, h, length, length)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(e // h) + add
    logits = logits.masked_fill(~allowed, -math.inf)
    p = torch.softmax(logits, dim=-1)
    ent = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)  # [N, H, L]
    top = torch.full((h,), -math.inf, dtype=torch.float64)
    total = torch.zeros(h, dtype=torch.float64)
    weight = 0.0
    for s, ws in _runs(n, batch):
        for r, wr in _runs(length, rows):
            top = torch.maximum(top, logits[s, :, r].amax(-1))
            total += ws * wr * ent[s, :, r]
            weight += ws * wr
    return top.numpy(), (total / weight).numpy()


@pytest.mark.parametrize("case", ["none", "padding", "causal", "mask3d", "bias_zero"])
def test_multihead_attention_sampled_against_float64(case: str) -> None:
    from gradprobe.attention import AttentionWatch

    torch.manual_seed(0)
    n, length, rows, batch = 11, 9, 4, 3  # fewer rows and sequences than the call has
    mha = nn.MultiheadAttention(
        16, 4, add_bias_kv=case == "bias_zero", add_zero_attn=case == "bias_zero"
    )
    x = torch.randn(length, n, 16)
    extra: dict = {}
    if case == "padding":  # True: a padded key
        pad = torch.zeros(n, length, dtype=torch.bool)
        pad[1, 6:] = True
        pad[4, 2:] = True
        extra = {"key_padding_mask": pad}
    elif case == "causal":
        extra = {
            "attn_mask": nn.Transformer.generate_square_subsequent_mask(length),
            "is_causal": True,
        }
    elif case == "mask3d":
        extra = {"attn_mask": torch.randn(n * 4, length, length)}
    seen = []
    watch = AttentionWatch(
        lambda: "mha", lambda name, call: seen.append(call), rows=rows, batch=batch
    )
    plain = mha(x, x, x, need_weights=False, **extra)[0]
    with watch:
        out = mha(x, x, x, need_weights=False, **extra)[0]
    assert torch.equal(out, plain)
    (call,) = seen
    top, ent = _mha_sampled_reference(mha, x, case, extra, rows, batch)
    # float32 logits of E = 4 products (a few ulps of order-1 values) against float64:
    # 1e-5 holds whatever the vector width
    np.testing.assert_allclose(call.logit_max.numpy(), top, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(call.entropy_mean.numpy(), ent, rtol=1e-5, atol=1e-5)


def test_multihead_attention_measurement_cost_does_not_grow_with_the_batch() -> None:
    """The recomputed in-projection covers the sampled sequences and rows only: the
    measurement's floating-point work is the same for 16 sequences as for 512."""
    from torch.utils.flop_counter import FlopCounterMode

    from gradprobe.attention import AttentionWatch

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    flops = []
    for n in (16, 512):
        x = torch.randn(n, 64, 32)
        watch = AttentionWatch(lambda: "mha", lambda name, call: None)
        counter = FlopCounterMode(display=False)
        with torch.no_grad():
            with FlopCounterMode(display=False) as model_only:
                mha(x, x, x, need_weights=False)
            with counter, watch:
                mha(x, x, x, need_weights=False)
        flops.append(counter.get_total_flops() - model_only.get_total_flops())
    assert flops[0] > 0
    assert flops[1] == flops[0]


# ---- 5. SDPA under torch.vmap inside the forward (an ensemble dimension vmapped)
class Vmapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [E, N, T, 16]
        q, k, v = self.qkv(x).chunk(3, -1)
        h = torch.vmap(F.scaled_dot_product_attention)(
            q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
        )
        return self.out(h.squeeze(2))


class Ensemble(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Vmapped()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def test_attention_under_vmap_is_one_clear_warning_a_gap_and_unchanged_training() -> None:
    torch.manual_seed(0)
    model = Ensemble()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 2, 6, 16, generator=g) for _ in range(3)]
    kw = {"every": 1, "modules": ["blocks.0"]}  # the module that calls SDPA, probed
    probed, frame, said = _run(model, batches, kw)
    plain, _, _ = _run(twin, batches, None)
    assert _same(probed, plain)
    about = [w for w in said if "attention" in w]
    assert len(about) == 1, said
    assert "torch.func transform" in about[0] and "'blocks.0'" in about[0]
    assert "failed" not in about[0]
    assert frame[frame.stat.str.startswith("attn")].empty  # a gap, not a number
    assert not frame[frame.stat == "grad_norm"].empty  # the rest is recorded


# ---- 6. an attention module that never calls SDPA (nanoGPT with flash=False)
class OuterAttention(nn.Module):
    """A wrapper named …Attention whose inner attention module makes the SDPA call (as
    Hugging Face's BertAttention around BertSdpaSelfAttention): not a bypass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = CausalSelfAttention(16, 2, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("flash", [False, True], ids=["manual_softmax", "sdpa"])
def test_attention_that_bypasses_sdpa_is_said_once_per_module(flash: bool) -> None:
    torch.manual_seed(0)
    model = Split(flash)
    model.backbone.append(nn.Sequential(OuterAttention()))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 16, generator=g) for _ in range(3)]
    probed, frame, said = _run(model, batches, {"every": 1})
    plain, _, _ = _run(twin, batches, None)
    assert _same(probed, plain)
    bypass = sorted(w for w in said if "without F.scaled_dot_product_attention" in w)
    attn_rows = set(frame[frame.stat == "attn_logit_max"].name)
    if flash:
        assert bypass == []
        assert attn_rows == {"backbone.0.attn", "backbone.1.attn", "backbone.2.0.inner"}
    else:
        # once per module over three recorded steps; the wrapper around a module that
        # calls SDPA is not one of them
        assert len(bypass) == 2, said
        assert "'backbone.0.attn' (CausalSelfAttention)" in bypass[0]
        assert "'backbone.1.attn' (CausalSelfAttention)" in bypass[1]
        assert "docs/attention.md" in bypass[0]
        assert attn_rows == {"backbone.2.0.inner"}


def test_a_compiled_submodule_called_apart_gets_no_watch_and_no_hook_per_step() -> None:
    """A compiled model's hooks must not change (each change recompiles it): the watch is
    not entered there (a gap, as for a compiled root) and no exit hook is put on."""
    torch.manual_seed(0)
    model = Split()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 16, generator=g) for _ in range(3)]
    torch._dynamo.reset()
    model.backbone.compile(backend="eager")
    hooked: list[bool] = []

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = _apart(m, x)
        hooked.append(any(s._forward_hooks_always_called for s in m.backbone.modules()))
        return out

    probed, frame, said = _run(model, batches, {"every": 1}, forward=forward)
    plain, _, _ = _run(twin, batches, None, forward=_apart)
    assert hooked == [False, False, False]
    # eager backend: the same kernels as the twin's, bit for bit
    assert _same(probed, plain)
    assert any("compiled" in w for w in said)
    assert frame[frame.stat.str.startswith("attn")].empty
