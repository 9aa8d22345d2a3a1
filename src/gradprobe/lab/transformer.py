"""A small causal Transformer for the lab, in plain torch.nn, and the numbers read off it.

:class:`CausalTransformer`: token and position embeddings, ``depth`` pre-LN blocks
(attention, then a GELU MLP, each added to the residual stream), a final LayerNorm and a
linear head. Attention calls ``F.scaled_dot_product_attention`` with ``is_causal=True``,
as nanoGPT does; ``qk_norm=True`` puts a LayerNorm on each head's queries and keys before
the product (QK-layernorm: Dehghani et al. 2023; Wortsman et al. 2023). The head's logits
come out as ``[batch, vocab, time]``, the layout ``F.cross_entropy`` takes for sequences,
so the lab's one training loop (:func:`gradprobe.lab.training.fit`) trains it unchanged.

:func:`max_attention_logit` measures the largest attention logit q·k·scale (after the
causal mask) of every attention module on a batch, by recomputing the logits from the
module's own input in float64: the quantity the Probe records as ``attn_logit_max``.
:func:`mean_log_partition` is log Z of the output logits (the Probe's ``logit_z``).
:func:`recurrence_split` is the generated task: x[t] = (x[t−1] + x[t−2]) mod vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split

__all__ = [
    "Attention",
    "CausalTransformer",
    "max_attention_logit",
    "mean_log_partition",
    "recurrence_split",
]


class Attention(nn.Module):
    """Causal multi-head self-attention; QK-layernorm when ``qk_norm``."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # One LayerNorm over each head's features, shared by the heads (as in ViT-22B).
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else None

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values as ``[batch, heads, time, head_dim]`` (q and k normed)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Embeddings, ``depth`` pre-LN blocks, a final LayerNorm and a head (logits ``[B, V, T]``)."""

    def __init__(
        self,
        vocab: int,
        ctx: int,
        *,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, qk_norm) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        # [B, T, V] -> [B, V, T]: cross_entropy's layout for a target of shape [B, T].
        return self.head(self.ln(x)).transpose(1, 2)


@torch.no_grad()
def max_attention_logit(model: nn.Module, idx: Tensor) -> dict[str, float]:
    """The largest attention logit q·k/√d_head after the causal mask, per attention module.

    The model runs one forward on ``idx`` (eval mode, no gradient); a forward pre-hook on
    each :class:`Attention` keeps the input it receives, from which its queries and keys are
    recomputed and their scaled products formed in float64, masked above the diagonal, and
    their maximum taken. This is the Probe's ``attn_logit_max``, computed by hand.
    """
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):

            def keep(mod: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
                inputs[name] = args[0].detach()

            handles.append(module.register_forward_pre_hook(keep))
    was = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out: dict[str, float] = {}
    for name, x in inputs.items():
        module = model.get_submodule(name)
        q, k, _ = module.qkv_heads(x)
        q, k = q.double(), k.double()
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        t = logits.shape[-1]
        future = torch.ones(t, t, dtype=torch.bool, device=logits.device).triu(1)
        out[name] = float(logits.masked_fill(future, -math.inf).max())
    return out


@torch.no_grad()
def mean_log_partition(model: nn.Module, idx: Tensor) -> float:
    """log Z = logsumexp of the output logits over the vocabulary, averaged over every
    position of ``idx`` (eval mode, float64): the Probe's ``logit_z``, computed by hand."""
    was = model.training
    model.eval()
    try:
        logits = model(idx).double()  # [B, V, T]
    finally:
        model.train(was)
    return float(torch.logsumexp(logits, dim=1).mean())


def recurrence_split(n_train: int, n_val: int, length: int, vocab: int, *, seed: int = 0) -> Split:
    """Next-token prediction on x[t] = (x[t−1] + x[t−2]) mod vocab from two random tokens.

    Inputs are the first ``length`` tokens, targets the same sequence shifted by one: every
    target after the first is determined by the two tokens before it (attention must find
    them); the first is uniform, so the mean loss cannot fall below ln(vocab)/length nats.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n_train + n_val, length + 1, dtype=torch.long)
    x[:, :2] = torch.randint(0, vocab, (n_train + n_val, 2), generator=g)
    for t in range(2, length + 1):
        x[:, t] = (x[:, t - 1] + x[:, t - 2]) % vocab
    inputs, targets = x[:, :-1], x[:, 1:]
    return Split(
        inputs[:n_train],
        targets[:n_train],
        inputs[n_train:],
        targets[n_train:],
        task="classification",
        n_classes=vocab,
        name=f"x[t] = x[t-1] + x[t-2] mod {vocab}",
    )
