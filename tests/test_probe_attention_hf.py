"""The Probe's attention statistics on Hugging Face models built from configs (no
downloads): GPT-2 with ``attn_implementation="sdpa"`` against float64 from its own q/k, its
training bit-identical with the Probe, and LLaMA with grouped-query attention against its
eager twin's attention weights. Helpers and tolerances: tests/test_probe_attention.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe import Probe
from test_probe_attention import TOL, causal, check, heads_of, reference, value

torch.set_num_threads(1)


def test_hugging_face_gpt2_sdpa() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa"
    qk: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(model.transformer.h):

        def keep(m, args, out, name=f"transformer.h.{i}.attn"):
            q, k, _ = out.detach().split(32, dim=2)
            b, t, _ = q.shape
            qk[name] = tuple(z.view(b, t, 4, 8).transpose(1, 2) for z in (q, k))

        block.attn.c_attn.register_forward_hook(keep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    refs = []
    with Probe(model, opt, every=1, stats="full") as probe:
        for _ in range(2):
            loss = model(ids, labels=ids).loss
            refs.append({n: reference(q, k, causal(10)) for n, (q, k) in qk.items()})
            opt.zero_grad()
            loss.backward()
            opt.step()
        frame = probe.frame()
    for step, ref in enumerate(refs):
        for name, r in ref.items():
            check(frame, step, name, r)


def _gpt2_steps(model: nn.Module, probe_kw: dict | None, steps: int = 4) -> list[torch.Tensor]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = Probe(model, opt, **probe_kw) if probe_kw is not None else None
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)  # dropout draws the same masks in both runs
    for _ in range(steps):
        ids = torch.randint(0, 50, (3, 10), generator=g)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    if probe is not None:
        assert not probe.frame()[probe.frame().stat == "attn_entropy"].empty
        probe.close()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("every", [1, "auto"])
def test_hugging_face_training_is_bit_identical_with_the_probe(every) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, attn_implementation="sdpa"
    )  # dropout 0.1 everywhere: the watch must not draw from torch's RNG
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    twin = copy.deepcopy(model)
    for a, b in zip(_gpt2_steps(model, {"every": every, "stats": "full"}), _gpt2_steps(twin, None)):
        assert torch.equal(a, b)


def test_llama_gqa_entropies_are_those_of_its_eager_weights() -> None:
    """LLaMA with grouped-query attention (4 query heads over 2 key/value heads, rotary
    positions): the Probe's entropies, attributed to each LlamaAttention, equal those of the
    eager twin's own attention weights (output_attentions)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    make = transformers.AutoModelForCausalLM.from_config
    sdpa = make(copy.deepcopy(config), attn_implementation="sdpa")
    eager = make(copy.deepcopy(config), attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        weights = eager(ids, output_attentions=True).attentions  # [N, H, L, S] per layer
    opt = torch.optim.SGD(sdpa.parameters(), lr=0.0)
    with Probe(sdpa, opt, every=1, stats="full") as probe:
        sdpa(ids, labels=ids).loss.backward()
        opt.step()
        frame = probe.frame()
    for i, w in enumerate(weights):
        w = w.double()
        ent = -torch.where(w > 0, w * w.log(), 0.0).sum(-1)  # [N, H, L]
        name = f"model.layers.{i}.self_attn"
        # eager's float32 softmax against the Probe's float32 log_softmax: a few ulps each
        assert value(frame, 0, name, "attn_entropy") == pytest.approx(float(ent.mean()), abs=TOL)
        np.testing.assert_allclose(
            heads_of(frame, 0, name, "attn_head_entropy"), ent.mean(dim=(0, 2)), atol=TOL
        )
        assert value(frame, 0, name, "attn_entropy_min") == pytest.approx(
            float(ent.mean(dim=(0, 2)).min()), abs=TOL
        )
