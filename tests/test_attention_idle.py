"""The attention watch (a TorchFunctionMode that sees every torch call of a recorded
forward) is not entered for a model that made no attention call in a watched step, until
the model changes or IDLE_RETRY steps have passed; a model with attention is watched at
every recorded step. Counted, not timed (bench/RESULTS.md has what the watch costs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradprobe import Probe
from gradprobe import attention as attention_module
from gradprobe.recording import attn as attn_module


class SelfAttention(nn.Module):
    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, f = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, f // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(n, t, f))


def _count_entries(monkeypatch) -> list[int]:
    entered: list[int] = []
    original = attention_module.AttentionWatch.__enter__

    def counting(self):
        entered.append(1)
        return original(self)

    monkeypatch.setattr(attention_module.AttentionWatch, "__enter__", counting)
    return entered


def _train(model: nn.Module, steps: int, x: torch.Tensor, change_at: int | None = None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Probe(model, opt, every=1) as probe:
        for step in range(steps):
            if step == change_at:
                model.append(SelfAttention())
                opt.add_param_group({"params": list(model[-1].parameters())})
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        frame = probe.frame()
    return frame


def test_a_model_without_attention_is_watched_once_then_every_idle_retry_steps(monkeypatch):
    monkeypatch.setattr(attn_module, "IDLE_RETRY", 3)
    entered = _count_entries(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    _train(model, 9, torch.randn(4, 5, 16))
    # watched at step 0 (nothing seen), then 3 steps idle, watched at 4, idle 5-7, at 8
    assert len(entered) == 3


def test_a_model_with_attention_is_watched_at_every_recorded_step(monkeypatch):
    entered = _count_entries(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), SelfAttention())
    frame = _train(model, 5, torch.randn(4, 5, 16))
    assert len(entered) == 5
    assert sorted(frame[frame.stat == "attn_logit_max"].step.unique()) == [0, 1, 2, 3, 4]


def test_attention_added_to_an_idle_model_is_watched_from_the_change_on(monkeypatch):
    entered = _count_entries(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    frame = _train(model, 6, torch.randn(4, 5, 16), change_at=3)
    rows = frame[frame.stat == "attn_logit_max"]
    assert sorted(rows.step.unique()) == [3, 4, 5]
    assert set(rows.name) == {"2"}
    assert len(entered) == 1 + 3  # step 0 (nothing seen), then each step from the change
