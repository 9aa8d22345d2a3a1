"""What a module receives and returns is a pytree: the Probe reads "the" tensor of each.

Issue 11 §4. The rule (docs/recording.md, "Inputs and outputs"): the first floating-point
tensor in pytree order; a mapping at ``logits``, then ``last_hidden_state``, never at
``loss``; positional arguments before keywords. Each case is checked against plain
autograd on an un-probed twin, with the tensor picked by hand.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning


def _expected(
    model: nn.Module, name: str, pick: Callable[[object], Tensor], loss_of: Callable[[nn.Module], Tensor]
) -> dict[str, float]:
    """error_norm and act_mean of module ``name`` by autograd on an un-probed twin."""
    twin = copy.deepcopy(model)
    outputs: list[Tensor] = []
    module = dict(twin.named_modules())[name]
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(pick(out)))
    try:
        loss = loss_of(twin)
    finally:
        handle.remove()
    grads = torch.autograd.grad(loss, outputs)
    return {
        "error_norm": math.sqrt(sum(float(torch.linalg.vector_norm(g.double()) ** 2) for g in grads)),
        "act_mean": float(sum(o.detach().double().sum() for o in outputs))
        / sum(o.numel() for o in outputs),
        "calls": float(len(outputs)),
    }


def _recorded(model: nn.Module, loss_of: Callable[[nn.Module], Tensor], **kwargs) -> dict[tuple[str, str], float]:
    with Probe(model, **kwargs) as probe:
        loss_of(model).backward()
        probe.step()
        frame = probe.frame()
    return {(r.name, r.stat): r.value for r in frame.itertuples()}


def _check(model, name, pick, loss_of, **kwargs) -> dict[tuple[str, str], float]:
    torch.manual_seed(0)  # the same dropout masks in both runs
    expected = _expected(model, name, pick, loss_of)
    torch.manual_seed(0)
    got = _recorded(model, loss_of, **kwargs)
    for stat, value in expected.items():
        # act_mean is summed in float32 on the device: near 0 (a LayerNorm) only to ~1e-7.
        assert got[(name, stat)] == pytest.approx(value, rel=1e-5, abs=1e-7), stat
    return got


class DictHead(nn.Module):
    def __init__(self, with_loss: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.with_loss = with_loss

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = torch.tanh(x) * self.scale
        logits = self.fc(features)
        out = {"features": features, "logits": logits}  # logits is "the" output, not first
        if self.with_loss:
            return {"loss": logits.logsumexp(-1).mean(), **out}
        return out


@pytest.mark.parametrize("with_loss", [False, True])
def test_a_head_returning_a_dict_is_read_at_its_logits(with_loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), DictHead(with_loss))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def loss_of(m: nn.Module) -> Tensor:
        out = m(x)
        return nn.functional.cross_entropy(out["logits"], y) + out["features"].pow(2).mean()

    got = _check(model, "1", lambda out: out["logits"], loss_of)
    assert ("1", "dead_frac") in got and ("1", "error_gain") in got


@dataclass
class Encoded:
    hidden: Tensor
    mask: Tensor  # bool: never "the" output
    pooled: Tensor


class DataclassEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 7)

    def forward(self, x: Tensor) -> Encoded:
        h = torch.relu(self.proj(x))
        return Encoded(hidden=h, mask=h > 0, pooled=h.mean(1))


def test_a_dataclass_output_is_read_at_its_first_float_field():
    torch.manual_seed(0)
    model = nn.Sequential(DataclassEncoder())
    x = torch.randn(3, 4, 5)

    def loss_of(m: nn.Module) -> Tensor:
        out = m(x)
        return out.hidden.sum() * 0.1 + out.pooled.pow(2).sum()

    _check(model, "0", lambda out: out.hidden, loss_of, modules=["0"])


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        steps = torch.arange(3)  # an integer tensor first: skipped
        h = self.a(x)
        return ((steps, h), self.b(h)), h.sum(-1)


def test_nested_tuples_are_read_at_the_first_float_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(Nested())
    x = torch.randn(6, 4)

    def loss_of(m: nn.Module) -> Tensor:
        (_, h), logits = m(x)[0]
        return h.pow(2).sum() + logits.sum()

    _check(model, "0", lambda out: out[0][0][1], loss_of, modules=["0"])


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(input=self.fc(input=x))  # keyword-only calls
        q, k, v = h * 0.5, h.flip(1), h + 1.0
        attended, _ = self.attn(query=q, key=k, value=v, need_weights=False)
        return self.out(input=attended)


def test_keyword_calls_are_read_including_multihead_attention():
    torch.manual_seed(0)
    model = KeywordModel()
    x = torch.randn(3, 5, 4)

    def loss_of(m: nn.Module) -> Tensor:
        return m(x).pow(2).mean()

    got = _check(model, "attn", lambda out: out[0], loss_of)
    _check(model, "act", lambda out: out, loss_of)
    # gate_mean of the ReLU called as act(input=z): the fraction of z > 0, by hand.
    twin = copy.deepcopy(model)
    z = twin.fc(x)
    assert got[("act", "gate_mean")] == pytest.approx(float((z > 0).double().mean()))
    # error_gain of the attention: its own dL/d(query) over dL/d(output), by autograd.
    twin = copy.deepcopy(model)
    h = twin.act(twin.fc(x))
    q = (h * 0.5).detach().requires_grad_()
    attended, _ = twin.attn(query=q, key=h.flip(1), value=h + 1.0, need_weights=False)
    loss = twin.out(attended).pow(2).mean()
    g_q, g_out = torch.autograd.grad(loss, [q, attended])
    assert got[("attn", "error_gain")] == pytest.approx(
        float(torch.linalg.vector_norm(g_q) / torch.linalg.vector_norm(g_out)), rel=1e-5
    )


def test_transformers_model_outputs_gpt2_and_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(
        transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    )
    bert = transformers.BertModel(
        transformers.BertConfig(
            num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
            intermediate_size=32, vocab_size=50, max_position_embeddings=16,
        )
    )
    ids = torch.randint(0, 50, (2, 7))
    for model in (gpt2, bert):
        model.train()

        def loss_of(m: nn.Module) -> Tensor:
            return m(input_ids=ids).last_hidden_state.pow(2).mean()

        # The model itself returns a ModelOutput: read at last_hidden_state.
        _check(model, "", lambda out: out.last_hidden_state, loss_of, modules=lambda n, m: n == "")
    # BERT's pooler returns a plain tensor; its root a ModelOutput with pooler_output after.
    def pooled_loss(m: nn.Module) -> Tensor:
        return m(input_ids=ids).pooler_output.sum()

    _check(bert, "", lambda out: out.last_hidden_state, pooled_loss, modules=lambda n, m: n == "")


class ArgmaxHead(nn.Module):
    """Returns class indices only: nothing the Probe can read."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"classes": x.argmax(-1)}


class NoneOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> None:
        self.seen.append(self.fc(x))


def test_a_module_that_cannot_be_read_is_named_once_in_a_warning():
    torch.manual_seed(0)
    encoder, head, side = nn.Linear(4, 3), ArgmaxHead(), NoneOut()
    model = nn.ModuleDict({"encoder": encoder, "head": head, "side": side})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    with Probe(model, opt, modules=["encoder", "head", "side"]) as probe:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                h = encoder(x)
                head(h)
                side(x)
                (h.sum() + side.seen.pop().sum()).backward()
                opt.step()
        frame = probe.frame()
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    assert len(ours) == 2, ours
    assert any("'head'" in m and "dict" in m for m in ours)
    assert any("'side'" in m and "NoneType" in m for m in ours)
    assert set(frame[frame.stat == "calls"].name) == {"encoder"}
