"""diagnose on real architectures (issue 14 §5): healthy settings give no critical finding,
broken ones are found with the right kind at the right place.

The models and settings are in ``tests/architectures.py``: a small GPT-2, ResNets with and
without BatchNorm, an LSTM language model, ViT-style encoders, trained for 30 steps on
generated data under a Probe attached through the optimizer, as a user would.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import architectures as A
from gradprobe import diagnose
from gradprobe.remedies import model_profile

pytestmark = pytest.mark.slow  # the matrix trains ~10 small models: ~30 s of CPU in all

# Findings that say the gradient flow itself is broken; a healthy run has none of them.
FLOW_KINDS = {"nonfinite", "exploding", "vanishing", "saturation", "dead_units", "dead_channels"}


@pytest.mark.parametrize("name", A.HEALTHY)
def test_healthy_settings_train_and_have_no_critical_finding(name: str) -> None:
    run, losses = A.setting(name)
    findings = diagnose(run)
    assert [f.kind for f in findings if f.severity == "critical"] == []
    assert FLOW_KINDS.isdisjoint(findings.kinds), [f.summary for f in findings]
    assert A.finite_decrease(losses) < 0.97  # they learn: the test is not about a frozen model


def test_profiles_read_from_the_runs_meta() -> None:
    gpt2 = model_profile(A.setting("gpt2")[0].meta)
    assert gpt2.architecture == "transformer"  # not "cnn": GPT-2's Conv1D is a linear layer
    assert {"pre_ln", "residual", "gelu"} <= gpt2.tokens
    post = model_profile(A.setting("vit_postln_high_lr")[0].meta)
    pre = model_profile(A.setting("vit_preln")[0].meta)
    assert post.architecture == pre.architecture == "transformer"
    assert post.has("post_ln") and not post.has("pre_ln")
    assert pre.has("pre_ln") and not pre.has("post_ln")
    resnet = model_profile(A.setting("resnet_bn")[0].meta)
    assert resnet.architecture == "cnn" and resnet.has("residual") and resnet.has("BatchNorm2d")
    assert model_profile(A.setting("lstm_lm")[0].meta).architecture == "rnn"


# ------------------------------------------------------------------ deep plain ResNet
def _init_error_ratio() -> float:
    """‖dL/d(stem output)‖ / ‖dL/d(logits)‖ at init, by plain autograd on an un-probed twin."""
    torch.manual_seed(0)
    model = A.ResNet(20, batchnorm=False)
    x, y = A.blob_images(32 * 30, 8)
    grads: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            out.register_hook(lambda g: grads.__setitem__(name, g))

        return hook

    model.stem.register_forward_hook(keep("stem"))
    model.fc.register_forward_hook(keep("fc"))
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    return float(torch.linalg.vector_norm(grads["stem"]) / torch.linalg.vector_norm(grads["fc"]))


def test_deep_resnet_without_norm_explodes_at_init_in_its_first_layers() -> None:
    run, _ = A.setting("resnet_plain_deep")
    found = diagnose(run).of("exploding")
    assert found is not None
    assert "init" in found.evidence["modes"]
    assert found.evidence["first"] == "stem" and found.evidence["last"] == "fc"
    assert found.evidence["first_last_ratio"] == pytest.approx(_init_error_ratio(), rel=1e-4)
    assert found.evidence["first_last_ratio"] >= 10
    # the place: the stem and the first blocks, not the last ones
    assert found.names[:3] == ("stem", "layers.0.conv1", "layers.0.conv2")
    assert not any(n.startswith("layers.19.") for n in found.names)
    assert found.remedies[0].key == "branch_scaling"


def test_the_same_resnet_with_fixup_scaling_or_batchnorm_does_not_explode() -> None:
    for name in ("resnet_fixup", "resnet_bn"):
        assert diagnose(A.setting(name)[0]).of("exploding") is None, name


# ------------------------------------------------------------------ dead channels
def test_resnet_conv_whose_bias_kills_channels_is_named() -> None:
    run, _ = A.setting("resnet_dead_conv")
    found = diagnose(run).of("dead_channels")
    assert found is not None
    assert found.names == ("layers.1.relu1",)
    assert found.evidence["fed_by"]["layers.1.relu1"] == A.DEAD_CONV
    assert found.evidence["dead_frac"]["layers.1.relu1"] == pytest.approx(A.DEAD_CHANNELS / 8)
    # the healthy twin (the same net without the bias) has none
    assert diagnose(A.setting("resnet_fixup")[0]).of("dead_channels") is None


# ------------------------------------------------------------------ post-LN transformer
def test_deep_post_ln_transformer_at_high_lr_loses_the_signal_in_its_lower_blocks() -> None:
    # Xiong et al. 2020: post-LN's gradients grow with the layer index (small at the
    # bottom); pre-LN's stay level. At lr 1e-2 without warmup the 8-block post-LN encoder
    # shows it as vanishing toward the patch embedding; the pre-LN twin does not.
    found = diagnose(A.setting("vit_postln_high_lr")[0]).of("vanishing")
    assert found is not None
    assert found.names[0] == "patch" and found.names[1].startswith("encoder.layers.0.")
    assert not any(n.startswith("encoder.layers.7.") for n in found.names)
    assert diagnose(A.setting("vit_preln_high_lr")[0]).of("vanishing") is None
    keys = [r.key for r in found.remedies]
    assert keys[:2] == ["pre_layernorm", "lr_warmup"]
    assert not {"relu", "batchnorm", "lstm_gru", "layernorm", "residual"} & set(keys)


# ------------------------------------------------------------------ LSTM through time
def _error_through_time(forget_bias: float, length: int = 96) -> torch.Tensor:
    """‖dL/d(embedding at t)‖ for a loss on the last position only, by plain autograd."""
    torch.manual_seed(0)
    model = A.LSTMLanguageModel(forget_bias=forget_bias)
    tokens = A.token_sequences(16, length)
    emb = model.embed(tokens).detach().requires_grad_(True)
    out, _ = model.lstm(emb)
    nn.functional.cross_entropy(model.head(out[:, -1]), tokens[:, 0]).backward()
    return torch.linalg.vector_norm(emb.grad, dim=(0, 2))


def test_negative_forget_bias_does_vanish_through_time() -> None:
    # The broken setting is broken: 20 steps back, the error is > 1e6 times smaller with a
    # forget bias of -20, and within 1e3 with +1.
    broken, healthy = _error_through_time(-20.0), _error_through_time(1.0)
    assert float(broken[-21] / broken[-1]) < 1e-6
    assert float(healthy[-21] / healthy[-1]) > 1e-3


@pytest.mark.parametrize("name", list(A.FORGETTING))
def test_recurrent_module_that_forgets_is_found_vanishing_through_time(name: str) -> None:
    # The LSTM (forget bias −20, sequences of 96), a GRU whose update gate is shut
    # (bias −20: z ≈ 0 drops h_{t−1}), and an LSTMCell in a Python loop.
    run, _ = A.setting(name)
    found = diagnose(run).of("vanishing")
    assert found is not None and found.severity == "critical"
    assert found.evidence["modes"] == ["time"]
    module = A.FORGETTING[name]
    assert found.names == (module,)
    carried = found.evidence["through_time"][module]
    # σ(−20 ± what 30 Adam steps move it) ≈ 2e-9: memory −1/log σ ≈ 0.05 steps
    assert carried["carry_gate_mean"] < 1e-7
    assert carried["memory_steps"] == pytest.approx(0.05, rel=0.05)
    assert carried["seq_len"] == {"lstm_forget_negative": 96, "gru_update_negative": 48}.get(
        name, 24
    )
    assert f"`{module}`'s" in found.summary
    if "gru" not in name:
        assert found.remedies[0].key == "forget_bias"


def test_lstm_with_negative_forget_bias_is_found_vanishing_through_time() -> None:
    found = diagnose(A.setting("lstm_forget_negative")[0]).of("vanishing")
    assert found is not None and "lstm" in found.names


@pytest.mark.xfail(
    strict=True,
    reason="the carry statistics pool every layer and direction of a fused module: layer 2 "
    "forgetting (gate ≈ 2e-9) next to a healthy layer 1 (≈ 0.76) averages 0.39, above "
    "CARRY_GATE_MEAN; it needs per-layer carry partials to be found and named by layer",
)
def test_two_layer_lstm_whose_top_layer_alone_forgets_is_found() -> None:
    found = diagnose(A.setting("lstm2_top_forget_negative")[0]).of("vanishing")
    assert found is not None and "lstm" in found.names
