"""meta["architecture"] (issue 22 §2): read from what modules are and what forward does,
never from class names, and recorded by the Probe so a loaded run is diagnosed alike."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("adapter", [S.LoRALinear, S.PeftStyleLoRA])
def test_lora_branches_are_not_layers_of_the_depth_profile(adapter: type[nn.Module]) -> None:
    """Issue 22 §5: a LoRA adapter (lora_B zero at init) beside GPT-2's frozen layers is a
    parallel branch; the depth profile follows the trunk the error signal takes."""
    from gradprobe import diagnose
    from gradprobe.diagnose import depth_profile

    torch.manual_seed(0)
    model = A.gpt2(n_layer=3)
    for block in model.transformer.h:
        for attr in ("c_attn", "c_proj"):
            base = getattr(block.attn, attr)
            n_in, n_out = base.weight.shape  # transformers' Conv1D: weight is [in, out]
            setattr(block.attn, attr, adapter(base, n_in, n_out))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = A.token_sequences(8 * 6, 16)
    with Probe(model, opt) as probe:
        for s in range(6):
            batch = tokens[s * 8 : (s + 1) * 8]
            out = model(batch, labels=batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    run = probe.run()
    branches = set(run.meta["architecture"]["branches"])
    adapters = {
        f"transformer.h.{i}.attn.{a}.lora_{x}"
        for i in range(3)
        for a in ("c_attn", "c_proj")
        for x in "AB"
    }
    assert adapters <= branches
    assert all(".lora_" in b for b in branches)  # nothing of the trunk

    profile = depth_profile(run)
    assert profile is not None and not [n for n in profile.layers if "lora_" in n]
    # The trunk's layers are there, in forward order: the frozen base layers and the MLPs.
    assert "transformer.h.0.attn.c_proj.base_layer" in profile.layers
    assert "transformer.h.2.mlp.c_proj" in profile.layers
    vanishing = diagnose(run).of("vanishing")
    assert vanishing is None or not [n for n in vanishing.names if "lora_" in n]


def test_a_parametrization_is_no_layer_of_the_depth_profile() -> None:
    from gradprobe.diagnose import depth_profile

    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(5)]
    for lin in layers:
        parametrize.register_parametrization(lin, "weight", _Scale())
    model = nn.Sequential(*[m for lin in layers for m in (lin, nn.Tanh())], nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Probe(model, opt) as probe:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
    profile = depth_profile(probe.run())
    assert profile is not None
    assert not [n for n in profile.layers if "parametrizations" in n]
    assert list(profile.layers) == ["0", "2", "4", "6", "8", "10"]


class _Scale(nn.Module):
    """A parametrization with a parameter of its own: W ↦ s·W (weight-norm-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.s * w
