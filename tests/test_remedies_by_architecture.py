"""Remedies ranked for the architecture in front of them (issue 14 §4), over profiles read
from the meta of real models (one training step under a Probe each)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

import architectures as A
from gradprobe import Probe
from gradprobe.remedies import REMEDIES, ModelProfile, model_profile, rank_remedies


def _one_step_meta(
    model: nn.Module, batch: torch.Tensor, keep_optimizer: bool = True, **config: Any
) -> dict[str, Any]:
    """The meta a user's run of ``model`` records (forward order included), after one step."""
    # The optimizer the config names is the one that steps (the Probe records its class).
    optimizer = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[
        str(config.get("optimizer", "sgd")).lower()
    ]
    opt = optimizer(model.parameters(), lr=1e-3)
    with Probe(model, opt, config=config or None) as probe:
        out = model(batch)
        logits = out.logits if hasattr(out, "logits") else out
        opt.zero_grad()
        logits.float().pow(2).mean().backward()
        opt.step()
    meta = dict(probe.run().meta)
    if not keep_optimizer:  # a run written before the Probe recorded its optimizer
        meta.pop("optimizer", None)
    return meta


@functools.cache
def profile(name: str, keep_optimizer: bool = True, **config: Any) -> ModelProfile:
    torch.manual_seed(0)
    tokens = A.token_sequences(4, 16)
    images = A.blob_images(4)[0]
    build = {
        "gpt2": lambda: (A.gpt2(), tokens),
        "vit_pre": lambda: (A.ViT(2, norm_first=True), images),
        "vit_post": lambda: (A.ViT(2, norm_first=False), images),
        "resnet_bn": lambda: (A.ResNet(2, batchnorm=True), images),
        "resnet_plain": lambda: (A.ResNet(2, batchnorm=False), images),
        "lstm": lambda: (A.LSTMLanguageModel(), tokens),
    }[name]
    model, batch = build()
    return model_profile(_one_step_meta(model, batch, keep_optimizer, **config))


def keys(kind: str, p: ModelProfile) -> list[str]:
    return [r.key for r in rank_remedies(kind, p)]


# ------------------------------------------------------------------ every offer applies
ALL = ("gpt2", "vit_pre", "vit_post", "resnet_bn", "resnet_plain", "lstm")


@pytest.mark.parametrize("name", ALL)
def test_every_offered_remedy_applies_to_the_model(name: str) -> None:
    p = profile(name)
    for kind in ("exploding", "vanishing", "unstable_updates", "nonfinite", "dead_channels"):
        for r in rank_remedies(kind, p):
            rem = REMEDIES[r.key]
            assert rem.architectures.get(p.architecture, 0.0) is not None, (name, kind, r.key)
            assert not any(p.has(t) for t in rem.present_when), (name, kind, r.key)
            assert not rem.requires or any(p.has(t) for t in rem.requires), (name, kind, r.key)


# ------------------------------------------------------------------ Transformers
@pytest.mark.parametrize("name", ["gpt2", "vit_pre", "vit_post"])
def test_exploding_transformer_gets_step_size_and_norm_remedies_never_relu_or_batchnorm(
    name: str,
) -> None:
    ranked = keys("exploding", profile(name, optimizer="adamw"))
    assert {"lr_warmup", "lower_peak_lr", "grad_clipping", "adam_beta2_eps"} <= set(ranked)
    assert ranked[0] in ("lr_warmup", "pre_layernorm")
    assert not {"relu", "batchnorm", "lstm_gru", "layernorm", "residual"} & set(ranked)
    # trained with SGD: no Adam remedy
    assert "adam_beta2_eps" not in keys("exploding", profile(name))
    # a run that does not say which optimizer: β₂/ε is offered conditionally
    unknown = profile(name, keep_optimizer=False)
    fit = next(r.fit for r in rank_remedies("exploding", unknown) if r.key == "adam_beta2_eps")
    assert "if the optimizer is Adam" in fit


def test_pre_layernorm_is_offered_to_post_ln_models_only() -> None:
    assert "pre_layernorm" not in keys("exploding", profile("gpt2"))  # GPT-2 is pre-LN
    assert "pre_layernorm" not in keys("exploding", profile("vit_pre"))
    assert keys("exploding", profile("vit_post"))[:2] == ["lr_warmup", "pre_layernorm"]
    assert keys("vanishing", profile("vit_post"))[0] == "pre_layernorm"


@pytest.mark.parametrize("name", ["gpt2", "vit_pre", "vit_post"])
def test_unstable_transformer_gets_warmup_and_a_lower_peak_rate_first(name: str) -> None:
    assert set(keys("unstable_updates", profile(name))[:2]) == {"lr_warmup", "lower_peak_lr"}


def test_norm_placement_from_module_names_of_other_libraries() -> None:
    # A BERT-style (post-LN: attention output, then LayerNorm) and a Llama-style
    # (pre-norm RMSNorm) block, as their meta would list them, in forward order.
    def meta(order: list[tuple[str, str]]) -> dict[str, Any]:
        return {
            "modules": [{"name": n, "type": t, "parameters": 1} for n, t in order],
            "execution_order": [n for n, _ in order],
        }

    bert = meta(
        [
            ("bert.embeddings.word_embeddings", "Embedding"),
            ("bert.encoder.layer.0.attention.self.query", "Linear"),
            ("bert.encoder.layer.0.attention.output.dense", "Linear"),
            ("bert.encoder.layer.0.attention.output.LayerNorm", "LayerNorm"),
            ("bert.encoder.layer.0.intermediate.dense", "Linear"),
        ]
    )
    llama = meta(
        [
            ("model.embed_tokens", "Embedding"),
            ("model.layers.0.input_layernorm", "LlamaRMSNorm"),
            ("model.layers.0.self_attn.q_proj", "Linear"),
            ("model.layers.0.post_attention_layernorm", "LlamaRMSNorm"),
            ("model.layers.0.mlp.gate_proj", "Linear"),
        ]
    )
    # BERT's attention module class (BertSelfAttention) comes from the model's repr
    bert["model"] = {"summary": "(self): BertSelfAttention(\n"}
    llama["model"] = {"summary": "(self_attn): LlamaAttention(\n"}
    for m, placement in ((bert, "post_ln"), (llama, "pre_ln")):
        p = model_profile(m)
        assert p.architecture == "transformer" and p.has(placement) and p.has("residual")
    assert "pre_layernorm" in keys("exploding", model_profile(bert))
    assert "pre_layernorm" not in keys("exploding", model_profile(llama))


def test_adam_remedy_follows_the_optimizer_when_the_run_says_which() -> None:
    assert "adam_beta2_eps" not in keys("exploding", profile("gpt2", optimizer="sgd"))
    with_adamw = rank_remedies("exploding", profile("gpt2", optimizer="AdamW"))
    beta2 = next(r for r in with_adamw if r.key == "adam_beta2_eps")
    assert "if the optimizer is Adam" not in beta2.fit
    # the same from meta["optimizer"] (where a Probe may record the class)
    meta = {"modules": [{"name": "attn", "type": "MultiheadAttention"}], "optimizer": "SGD"}
    assert "adam_beta2_eps" not in keys("exploding", model_profile(meta))


def test_the_probe_records_the_optimizer_it_sees_step() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-6)
    with Probe(model, opt, config={"optimizer": "sgd"}) as probe:  # a stale config loses
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    recorded = probe.run().meta["optimizer"]
    group = opt.param_groups[0]
    assert recorded["class"] == "AdamW"
    assert recorded["param_groups"][0]["betas"] == list(group["betas"])
    assert recorded["param_groups"][0]["eps"] == group["eps"] == 1e-6
    tokens = model_profile(probe.run().meta).tokens
    assert "optimizer:adamw" in tokens and "optimizer:sgd" not in tokens


# ------------------------------------------------------------------ ResNets
def test_exploding_resnet_without_norm_gets_branch_scaling_then_batchnorm() -> None:
    ranked = keys("exploding", profile("resnet_plain"))
    assert ranked[0] == "branch_scaling"
    assert "batchnorm" in ranked[:4]
    assert not {"pre_layernorm", "lstm_gru", "forget_bias", "truncated_bptt", "residual"} & set(
        ranked
    )


def test_resnet_with_batchnorm_is_not_told_to_add_it() -> None:
    ranked = keys("exploding", profile("resnet_bn"))
    assert ranked[0] == "branch_scaling"  # zero-init of the last BN's γ (Goyal et al. 2017)
    assert "batchnorm" not in ranked
    assert "batchnorm" not in keys("dead_channels", profile("resnet_bn"))


def test_branch_scaling_needs_residual_connections() -> None:
    plain_cnn = ModelProfile("cnn", frozenset({"relu"}), frozenset({"relu", "Conv2d"}))
    mlp = ModelProfile("mlp", frozenset({"tanh"}), frozenset({"tanh", "Linear"}))
    for p in (plain_cnn, mlp):
        assert "branch_scaling" not in keys("exploding", p)
    assert "branch_scaling" in keys("exploding", profile("resnet_plain"))


# ------------------------------------------------------------------ LSTMs and RNNs
def test_vanishing_lstm_gets_the_forget_gate_bias_not_an_lstm() -> None:
    ranked = keys("vanishing", profile("lstm"))
    assert ranked[0] == "forget_bias"
    assert not {"lstm_gru", "batchnorm", "residual", "truncated_bptt", "pre_layernorm"} & set(
        ranked
    )


def test_exploding_lstm_gets_clipping_and_truncated_bptt_not_forget_bias() -> None:
    ranked = keys("exploding", profile("lstm"))
    assert ranked[0] == "grad_clipping"
    assert "truncated_bptt" in ranked[:4]
    assert "forget_bias" not in ranked


def test_forget_gate_bias_is_for_lstms_only() -> None:
    for types in ({"GRU"}, {"RNN"}):
        p = model_profile({"modules": [{"name": "rnn", "type": t} for t in types]})
        assert p.architecture == "rnn" and "forget_bias" not in keys("vanishing", p)
    cell = model_profile({"modules": [{"name": "cell", "type": "LSTMCell"}]})
    assert keys("vanishing", cell)[0] == "forget_bias"
    assert "forget_bias" not in keys("vanishing", profile("gpt2"))
