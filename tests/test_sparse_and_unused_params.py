"""Parameters are never left out without a word.

Sparse gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``) have
norms: ``grad_norm``, ``param_norm``, ``update_ratio`` and the global norms count them,
checked against ``torch.linalg.vector_norm(p.grad.to_dense())`` and the parameters
before and after the step. A parameter the optimizer holds for training that gets no
gradient has a ``grad_missing`` row (checked against ``p.grad is None`` at the step) and
``diagnose`` reports it as ``unused_parameters``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import gradprobe
from gradprobe import Probe


def rows(frame, stat: str, step: int) -> dict[str, float]:
    sub = frame[(frame.stat == stat) & (frame.step == step)]
    return dict(zip(sub.name, sub.value.astype(float)))


TRAINED: list = []  # the last trained run, meta included, for diagnose


def train(model: nn.Module, opt, batches, loss_fn, **probe_kwargs):
    """Train under a Probe; per step the independent reference numbers, from .grad itself."""
    expected = []
    with Probe(model, opt, **probe_kwargs) as probe:
        for batch in batches:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            named = dict(model.named_parameters())
            grads = {n: p.grad.to_dense() for n, p in named.items() if p.grad is not None}
            before = {n: p.detach().clone() for n, p in named.items()}
            opt.step()
            expected.append(
                {
                    "grad_norm": {
                        n: torch.linalg.vector_norm(g.double()).item() for n, g in grads.items()
                    },
                    "param_norm": {
                        n: torch.linalg.vector_norm(before[n].double()).item() for n in grads
                    },
                    "update_ratio": {
                        n: (
                            torch.linalg.vector_norm((named[n].detach() - before[n]).double())
                            / torch.linalg.vector_norm(before[n].double())
                        ).item()
                        for n in grads
                    },
                    "missing": {n for n, p in named.items() if p.grad is None and p.requires_grad},
                    "global": sum(
                        torch.linalg.vector_norm(g.double()).item() ** 2 for g in grads.values()
                    )
                    ** 0.5,
                    "sparse": {
                        n for n, p in named.items() if p.grad is not None and p.grad.is_sparse
                    },
                }
            )
        frame = probe.frame()
        TRAINED.append(probe.run())
    return frame, expected


def check_norms(frame, expected) -> None:
    for step, exp in enumerate(expected):
        for stat in ("grad_norm", "param_norm", "update_ratio"):
            got = rows(frame, stat, step)
            assert set(got) == set(exp[stat]), (step, stat)
            for name, value in exp[stat].items():
                assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-12), (step, stat, name)
        model_rows = rows(frame, "global_grad_norm", step)
        assert model_rows["(model)"] == pytest.approx(exp["global"], rel=1e-6)
        pre = rows(frame, "global_grad_norm_preclip", step)
        assert pre["(model)"] == pytest.approx(exp["global"], rel=1e-6)


class Bag(nn.Module):
    def __init__(self, mode: str = "sum") -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 5, sparse=True)
        self.bag = nn.EmbeddingBag(40, 5, mode=mode, sparse=True)
        self.head = nn.Linear(10, 3)

    def forward(self, tokens: Tensor, bags: Tensor) -> Tensor:
        return self.head(torch.cat([self.emb(tokens).mean(1), self.bag(bags)], dim=1))


def token_batches(n: int, seed: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # Few distinct indices, many repeats: the sparse gradients are uncoalesced with duplicates.
    return [
        (
            torch.randint(0, 6, (4, 9), generator=g),
            torch.randint(0, 5, (4, 7), generator=g),
            torch.randn(4, 3, generator=g),
        )
        for _ in range(n)
    ]


def bag_loss(model: nn.Module, batch) -> Tensor:
    tokens, bags, y = batch
    return nn.functional.mse_loss(model(tokens, bags), y)


def test_sparse_embedding_and_bag_with_sgd_mixed_with_dense():
    torch.manual_seed(0)
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    frame, expected = train(model, opt, token_batches(3, 1), bag_loss)
    assert expected[0]["sparse"] == {"emb.weight", "bag.weight"}
    check_norms(frame, expected)
    assert "grad_missing" not in set(frame.stat)


def test_uncoalesced_duplicates_are_summed_before_the_norm():
    """The same index twice: its two rows add up to one (the norm is not of the raw values)."""
    emb = nn.Embedding(4, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    with Probe(emb, opt) as probe:
        opt.zero_grad()
        emb(torch.tensor([1, 1, 1, 2])).sum().backward()
        assert not emb.weight.grad.is_coalesced()
        raw = torch.linalg.vector_norm(emb.weight.grad._values()).item()  # √(4·3) = 3.46
        opt.step()
        frame = probe.frame()
    got = rows(frame, "grad_norm", 0)["weight"]
    assert got == pytest.approx(30**0.5)  # rows 1 (×3) and 2 (×1): √(9·3 + 1·3)
    assert got != pytest.approx(raw)


def test_sparse_adam_on_the_embedding_frozen_and_unheld_heads_are_not_flagged():
    """SparseAdam holds the embeddings only; the head trains nowhere (frozen) and a second
    head gets gradients but is not in the optimizer: nothing is flagged as missing."""
    torch.manual_seed(1)
    model = Bag(mode="mean")
    model.head.weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    opt = torch.optim.SparseAdam([model.emb.weight, model.bag.weight], lr=0.05)
    frame, expected = train(model, opt, token_batches(3, 2), bag_loss)
    check_norms(frame, expected)
    assert "grad_missing" not in set(frame.stat)
    assert gradprobe.diagnose(TRAINED[-1]).of("unused_parameters") is None


# ------------------------------------------------------------------ unused parameters


class Branches(nn.Module):
    """A trunk and whatever goes wrong around it, by ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.trunk = nn.Linear(4, 6)
        self.side = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 2)
        self.aux = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.trunk(x))
        if self.kind == "unused_branch":
            pass  # self.side is built, never called
        elif self.kind == "detached":
            h = self.side(h).detach()  # trunk and side are cut off from the loss
        elif self.kind == "checkpoint_frozen_input":
            # The reentrant checkpoint's input does not require grad: the segment's
            # parameters get no gradient (torch warns about it once).
            h = checkpoint(self.side, x.new_ones(x.shape[0], 6), use_reentrant=True) + h
        else:
            h = self.side(h)
        self._aux = self.aux(h)  # computed, never added to the loss
        return self.head(h)


EXPECTED_MISSING = {
    "unused_branch": {"side.0.weight", "side.0.bias", "aux.weight", "aux.bias"},
    "detached": {
        "trunk.weight",
        "trunk.bias",
        "side.0.weight",
        "side.0.bias",
        "aux.weight",
        "aux.bias",
    },
    "checkpoint_frozen_input": {"side.0.weight", "side.0.bias", "aux.weight", "aux.bias"},
}


def xy_batches(n: int, seed: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)]


def mse(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("kind", sorted(EXPECTED_MISSING))
def test_grad_missing_rows_and_the_unused_parameters_finding(kind):
    torch.manual_seed(4)
    model = Branches(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning) if kind == "checkpoint_frozen_input" else _nothing():
        frame, expected = train(model, opt, xy_batches(4), mse)
    for step, exp in enumerate(expected):
        assert exp["missing"] == EXPECTED_MISSING[kind]  # the independent view: .grad is None
        assert rows(frame, "grad_missing", step) == dict.fromkeys(exp["missing"], 1.0)
        assert set(rows(frame, "grad_norm", step)).isdisjoint(exp["missing"])
    finding = gradprobe.diagnose(TRAINED[-1]).of("unused_parameters")
    assert finding is not None
    assert finding.severity == "warning"
    assert set(finding.names) == EXPECTED_MISSING[kind]
    for name in EXPECTED_MISSING[kind]:
        assert finding.evidence["parameters"][name] == {
            "missing_steps": 4,
            "since_step": 0,
            "last_grad_step": None,
        }
    assert "4 of 4 recorded steps" in finding.summary
    assert any("detached" in h for h in finding.evidence["hints"])


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_a_branch_taken_on_some_steps_and_accumulation():
    """Used in one micro-batch of an accumulation step: it had a gradient. A branch used at
    steps 0 and 1, then never: 'info', since step 2, last gradient at step 1."""
    torch.manual_seed(5)
    model = Branches("side")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = xy_batches(8, seed=6)
    with Probe(model, opt) as probe:
        for step in range(4):
            opt.zero_grad()
            for micro in range(2):
                model.kind = "side" if (step < 2 and micro == 1) else "unused_branch"
                mse(model, batches[2 * step + micro]).backward()
            missing = {n for n, p in model.named_parameters() if p.grad is None}
            opt.step()
            assert missing == (
                {"aux.weight", "aux.bias"}
                | (set() if step < 2 else {"side.0.weight", "side.0.bias"})
            )
        frame = probe.frame()
        TRAINED.append(probe.run())
    for step in range(4):
        got = set(rows(frame, "grad_missing", step))
        side = {"side.0.weight", "side.0.bias"}
        assert got == {"aux.weight", "aux.bias"} | (side if step >= 2 else set())
    finding = gradprobe.diagnose(TRAINED[-1]).of("unused_parameters")
    assert finding is not None and finding.severity == "warning"  # aux never had one
    ev = finding.evidence["parameters"]
    assert ev["side.0.weight"] == {"missing_steps": 2, "since_step": 2, "last_grad_step": 1}
    assert ev["aux.bias"]["last_grad_step"] is None


def test_a_parameter_the_optimizer_does_not_hold_is_not_flagged():
    torch.manual_seed(7)
    model = Branches("unused_branch")
    held = [p for n, p in model.named_parameters() if not n.startswith(("side", "aux"))]
    opt = torch.optim.SGD(held, lr=0.05)
    frame, _ = train(model, opt, xy_batches(2), mse)
    assert "grad_missing" not in set(frame.stat)
    assert gradprobe.diagnose(TRAINED[-1]).of("unused_parameters") is None


def test_no_optimizer_no_flag_and_cheap_preset_records_it():
    torch.manual_seed(8)
    model = Branches("unused_branch")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    frame, _ = train(model, opt, xy_batches(2), mse, stats="cheap")
    assert set(rows(frame, "grad_missing", 1)) == EXPECTED_MISSING["unused_branch"]
    with Probe(model) as probe:  # no optimizer: which parameters it trains is unknown
        mse(model, xy_batches(1)[0]).backward()
        probe.step()
        assert "grad_missing" not in set(probe.frame().stat)
