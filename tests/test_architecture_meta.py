"""meta["architecture"] (issue 22 §2): read from what modules are and what forward does,
never from class names, and recorded by the Probe so a loaded run is diagnosed alike."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

import architectures as A
import story_models as S
from gradprobe import Probe, load
from gradprobe.architecture import describe_architecture
from gradprobe.remedies import model_profile


class Mixer(nn.Module):
    """Attention written out by hand (no sdpa, no 'attention' anywhere in the name)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.q(x) @ self.k(x).transpose(-2, -1)).softmax(-1)
        return w @ self.v(x)


class PostLN(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mix, self.norm = Mixer(d), nn.LayerNorm(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.mix(h))


class Skip(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = torch.relu(self.fc(x))
        out += identity
        return out


def test_a_transformer_is_one_whatever_its_attention_class_is_called() -> None:
    a = describe_architecture(S.TinyGPT(depth=2))
    assert a["kind"] == "transformer"
    assert a["attention"] == ["blocks.0.attn", "blocks.1.attn"]
    assert a["embeddings"] == ["tok", "pos"]
    assert a["residual"] == ["blocks.0", "blocks.1"] and a["norm_placement"] == "pre_ln"
    hand = describe_architecture(nn.Sequential(PostLN(8), PostLN(8)))
    assert hand["kind"] == "transformer" and hand["attention"] == ["0.mix", "1.mix"]
    assert hand["norm_placement"] == "post_ln" and hand["residual"] == ["0", "1"]
    gpt2 = describe_architecture(A.gpt2())  # attention in a helper (eager_attention_forward)
    assert gpt2["kind"] == "transformer" and len(gpt2["attention"]) == 2
    assert gpt2["norm_placement"] == "pre_ln"


def test_configured_layers_residuals_convs_recurrent_and_parametrizations() -> None:
    vit = describe_architecture(A.ViT(norm_first=False))
    assert vit["configured"]["encoder.layers.0"] == {"activation": "gelu", "norm_first": False}
    assert vit["norm_placement"] == "post_ln" and "gelu" in vit["activations"]
    resnet = describe_architecture(A.ResNet(2))
    assert resnet["kind"] == "cnn" and resnet["residual"] == ["layers.0", "layers.1"]
    assert set(resnet["norms"].values()) == {"batch"}
    assert describe_architecture(A.LSTMLanguageModel())["kind"] == "rnn"
    skip = describe_architecture(nn.Sequential(Skip(4), Skip(4)))
    assert skip["residual"] == ["0", "1"] and skip["activations"] == ["relu"]
    assert describe_architecture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))["residual"] == []
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", nn.Identity())
    p = describe_architecture(nn.Sequential(lin))
    assert p["parametrizations"] == ["0.parametrizations.weight", "0.parametrizations.weight.0"]


def test_the_probe_stores_it_and_the_profile_reads_it_from_a_loaded_run(tmp_path) -> None:
    model = S.TinyGPT(depth=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = S.copy_task(4)
    with Probe(model, opt, store=tmp_path / "run") as probe:
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
    run = load(tmp_path / "run")
    assert run.meta["architecture"]["attention"] == ["blocks.0.attn", "blocks.1.attn"]
    profile = model_profile(run.meta)
    assert profile.architecture == "transformer"
    assert {"residual", "pre_ln", "LayerNorm", "optimizer:adamw"} <= profile.tokens
    assert probe.meta["architecture"] == run.meta["architecture"]
