"""How the attention watch is wired into training code as strangers write it: activation
checkpointing around nn.TransformerEncoderLayer / nn.MultiheadAttention, submodules called
one by one, SDPA under torch.vmap, attention that bypasses SDPA. Each against an un-probed
twin (training bit-identical) and, where values are recorded, a float64 reference."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, flash: bool = True) -> None:
        super().__init__()
        self.heads, self.flash = heads, flash
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def split(self, qkv: torch.Tensor) -> list[torch.Tensor]:
        b, t, d3 = qkv.shape
        d = d3 // 3
        return [z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in qkv.split(d, 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.split(self.c_attn(x))
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # nanoGPT's flash=False: the softmax by hand
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, flash: bool = True) -> None:
        super().__init__()
        self.ln, self.attn, self.mlp = (
            nn.LayerNorm(16),
            CausalSelfAttention(flash=flash),
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
