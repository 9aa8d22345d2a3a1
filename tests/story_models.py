"""Models written the way users write them, for the story matrix (issue 22): a pre-LN causal
Transformer in plain PyTorch whose attention class is called ``Attn`` (it calls
``F.scaled_dot_product_attention``), a hand-written LoRA adapter (``lora_A``, ``lora_B``,
``lora_B`` zero-initialised, a parallel branch added to the frozen layer's output), and a
small CNN. Built from code, trained on generated data; no network."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attn(nn.Module):
    """Causal self-attention: one qkv projection, F.scaled_dot_product_attention, out proj."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attn(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, ``depth`` pre-LN blocks, a final LayerNorm and a head."""

    def __init__(
        self, vocab: int = 32, dim: int = 32, depth: int = 4, heads: int = 4, ctx: int = 16
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class LoRALinear(nn.Module):
    """y = base(x) + B(A(x))·α/r with the base frozen and B zero at init (Hu et al. 2021)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int = 4):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = 2.0
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(x)) * self.scaling


def copy_task(n: int, length: int = 16, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    """Sequences whose second half repeats the first: a causal model can learn the copy."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, vocab, (n, length // 2), generator=g)
    return torch.cat([half, half], dim=1)


class PeftStyleLoRA(nn.Module):
    """peft's layout and forward (lora.Linear): adapters in ModuleDicts by name, looked up
    into local variables, the result accumulated in a loop over the active adapters."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int = 4):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, out_features, bias=False)})
        self.lora_dropout = nn.ModuleDict({"default": nn.Identity()})
        self.scaling = {"default": 2.0}
        self.active_adapters = ["default"]
        nn.init.zeros_(self.lora_B["default"].weight)
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        lora_A_keys = self.lora_A.keys()
        for active_adapter in self.active_adapters:
            if active_adapter not in lora_A_keys:
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            x = x.to(lora_A.weight.dtype)
            result = result + lora_B(lora_A(dropout(x))) * scaling
        return result
