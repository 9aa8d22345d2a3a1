"""nanoGPT's causal self-attention, as strangers write it: one model for the attention tests.

``flash=False`` is nanoGPT's own fallback: the softmax written by hand (no SDPA call, so the
Probe's attention watch sees nothing there; dropout is not applied on that path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(
        self, d: int = 32, heads: int = 4, dropout: float = 0.1, flash: bool = True
    ) -> None:
        super().__init__()
        self.heads, self.dropout, self.flash = heads, dropout, flash
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def split(self, qkv: torch.Tensor) -> list[torch.Tensor]:
        b, t, d3 = qkv.shape
        d = d3 // 3
        return [z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in qkv.split(d, 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.split(self.c_attn(x))
        if self.flash:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:  # nanoGPT's flash=False: the softmax by hand
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))
