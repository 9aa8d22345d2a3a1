"""How the attention watch is wired into training code as strangers write it: activation
checkpointing around nn.TransformerEncoderLayer / nn.MultiheadAttention, submodules called
one by one, SDPA under torch.vmap, attention that bypasses SDPA. Each against an un-probed
twin (training bit-identical) and, where values are recorded, a float64 reference."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradprobe import Probe

torch.set_num_threads(1)


def _gradprobe_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("gradprobe")]


def _run(model: nn.Module, batches, probe_kw: dict | None, forward=None):
    """SGD on ``batches`` (each x), loss = mean square of the output; with ``probe_kw``
    under a Probe. The parameters, the frame, the gradprobe warnings."""
    forward = forward or (lambda m, x: m(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)  # dropout draws the same in both runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = Probe(model, opt, **probe_kw) if probe_kw is not None else None
        for x in batches:
            loss = forward(model, x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        frame = probe.frame() if probe else None
        if probe:
            probe.close()
    params = [p.detach().clone() for p in model.parameters()]
    return params, frame, _gradprobe_warnings(caught)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---- 1. activation checkpointing around nn.TransformerEncoderLayer / nn.MultiheadAttention
class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool, mha: bool) -> None:
        super().__init__()
        self.reentrant, self.mha = reentrant, mha
        if mha:
            self.layer = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True)
        else:
            self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def _layer(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer(h, h, h, need_weights=False)[0] if self.mha else self.layer(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self._layer, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("mha", [False, True], ids=["encoder_layer", "mha"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_attention_trains_unchanged_and_is_recorded(reentrant: bool, mha: bool) -> None:
    torch.manual_seed(0)
    model = _Checkpointed(reentrant, mha)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 6, 16, generator=g, requires_grad=reentrant) for _ in range(3)]
    probed, frame, said = _run(model, batches, {"every": 1})
    plain, _, _ = _run(twin, batches, None)
    assert _same(probed, plain)
    name = "layer" if mha else "layer.self_attn"
    rows = frame[(frame.stat == "attn_logit_max") & (frame.name == name)]
    assert sorted(rows.step) == [0, 1, 2]
    assert not [w for w in said if "attention" in w], said
