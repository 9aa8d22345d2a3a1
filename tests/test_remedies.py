"""The remedy catalogue and its ranking for the model in front of it."""

from __future__ import annotations

import pytest

from _diagnose_cases import case
from gradprobe.diagnose import KIND_ORDER
from gradprobe.remedies import (
    ACTIVATION_FIT_BONUS,
    REMEDIES,
    ModelProfile,
    model_profile,
    rank_remedies,
)

# concepts.md §4, row by row: the catalogue key that stands for it.
CONCEPTS_REMEDIES = {
    "ReLU": "relu",
    "Leaky ReLU, PReLU, ELU": "leaky_relu",
    "SiLU/Swish, GELU": "silu_gelu",
    "Softmax": "softmax",
    "Xavier/Glorot initialisation": "xavier_init",
    "He/Kaiming initialisation": "he_init",
    "Batch normalisation": "batchnorm",
    "layer normalisation": "layernorm",
    "Residual (skip) connections": "residual",
    "LSTM": "lstm_gru",
    "Gradient clipping": "grad_clipping",
    "Learning-rate decay": "lr_schedule",
    "adaptive optimisers (Adam)": "adam",
    "Unsupervised pre-training": "pretraining",
}


def test_every_concepts_remedy_is_in_the_catalogue() -> None:
    # The shipped subject matter (docs/concepts.md §4) lists every remedy by its catalogue name.
    from pathlib import Path

    concepts = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"
    section = concepts.read_text(encoding="utf-8").split("## 4.")[1].split("## 5.")[0]
    assert set(CONCEPTS_REMEDIES.values()) <= set(REMEDIES)
    for key in CONCEPTS_REMEDIES.values():
        assert f"| {REMEDIES[key].name} |" in section, key


@pytest.mark.parametrize("key", list(REMEDIES))
def test_each_remedy_says_why_and_how(key: str) -> None:
    r = REMEDIES[key]
    assert r.key == key and r.name and len(r.why) > 30 and r.code
    assert set(r.treats) <= set(KIND_ORDER)
    assert all(0 < v <= 1 for v in r.treats.values())


def test_deep_sigmoid_mlp_vanishing_gets_relu_norm_residual() -> None:
    profile = model_profile(case("sigmoid30").meta)
    assert profile.architecture == "mlp" and "sigmoid" in profile.activations
    ranked = rank_remedies("vanishing", profile)
    assert [r.key for r in ranked[:3]] == ["relu", "batchnorm", "residual"]
    assert "lstm_gru" not in {r.key for r in ranked}  # not for an MLP
    assert REMEDIES["relu"].then == ("he_init",)


def test_rnn_vanishing_gets_lstm_first_and_never_clipping() -> None:
    profile = model_profile(case("rnn_large").meta)
    assert profile.architecture == "rnn"
    ranked = rank_remedies("vanishing", profile)
    assert ranked[0].key == "lstm_gru"
    # Clipping only ever shrinks a gradient: it cannot bring back one that vanished
    # (issue 22: no action the finding itself contradicts).
    assert "grad_clipping" not in [r.key for r in ranked]
    keys = {r.key for r in ranked}
    assert "batchnorm" not in keys and "residual" not in keys


def test_relu_net_with_dead_units_gets_leaky_relu_not_relu() -> None:
    profile = model_profile(case("relu_bias_dead").meta)
    ranked = rank_remedies("dead_units", profile)
    assert ranked[0].key == "leaky_relu"
    assert "relu" not in {r.key for r in ranked}


def test_remedies_already_present_are_not_proposed() -> None:
    with_bn = ModelProfile("mlp", frozenset({"sigmoid"}), frozenset({"sigmoid", "BatchNorm1d"}))
    assert "batchnorm" not in {r.key for r in rank_remedies("vanishing", with_bn)}
    meta = {"modules": [{"name": "fc", "type": "Linear"}], "config": {"optimizer": "adam"}}
    assert "adam" not in {r.key for r in rank_remedies("stalled", model_profile(meta))}


def test_residual_blocks_are_seen_in_the_model_summary() -> None:
    profile = model_profile(case("residual30").meta)
    assert profile.has("ResidualBlock")
    assert "residual" not in {r.key for r in rank_remedies("vanishing", profile)}


def test_softmax_is_never_proposed() -> None:
    profile = ModelProfile("mlp", frozenset({"sigmoid"}), frozenset({"sigmoid"}))
    for kind in KIND_ORDER:
        assert "softmax" not in {r.key for r in rank_remedies(kind, profile)}


def test_score_is_the_documented_sum() -> None:
    profile = ModelProfile("cnn", frozenset({"relu"}), frozenset({"relu", "Conv2d"}))
    for r in rank_remedies("dead_channels", profile):
        rem = REMEDIES[r.key]
        expected = rem.treats["dead_channels"] + (rem.architectures.get("cnn") or 0.0)
        if "relu" in rem.suits_activations:
            expected += ACTIVATION_FIT_BONUS
        assert r.score == pytest.approx(expected)
    scores = [r.score for r in rank_remedies("dead_channels", profile)]
    assert scores == sorted(scores, reverse=True)
