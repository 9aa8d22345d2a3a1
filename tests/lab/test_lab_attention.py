"""attention: attention logits grow with the learning rate; QK-layernorm bounds them and widens
the range of rates that train (Wortsman et al. 2023, at small scale)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradprobe.lab import EXPERIMENTS
from gradprobe.lab.attention import ARMS, SEPARATE_FACTOR, TRAINS_FRACTION, VOCAB
from gradprobe.lab.experiment import RunConfig, row_of
from gradprobe.lab.transformer import CausalTransformer, max_attention_logit, recurrence_split


def test_verdict_agrees_with_its_own_numbers(lab_tiny) -> None:
    o = lab_tiny("attention")
    lrs = sorted(set(o.table["lr"]))
    # Recomputed here from the table: which rates train, per arm.
    trains = {
        a: [
            lr
            for lr in lrs
            if row_of(o.table, arm=a, lr=lr)["train_loss"] < TRAINS_FRACTION * math.log(VOCAB)
        ]
        for a in ARMS
    }
    wider = max(trains["qk_norm"], default=0) > max(trains["plain"], default=0)
    bounded = all(
        row_of(o.table, arm="qk_norm", lr=lr)["max_attn_logit"]
        < row_of(o.table, arm="plain", lr=lr)["max_attn_logit"]
        for lr in lrs
    )
    top = lrs[-1]
    separate = (
        row_of(o.table, arm="z_loss", lr=top)["max_attn_logit"]
        >= SEPARATE_FACTOR * row_of(o.table, arm="qk_norm", lr=top)["max_attn_logit"]
    )
    assert o.verdict.checks[0].held == (wider,)
    assert o.verdict.checks[1].held == (bounded,)
    assert o.verdict.checks[3].held == (separate,)
    # What Wortsman et al. report, at this scale: each holds.
    assert wider and bounded and separate and o.verdict.agrees_with_source
    # The plain model's logits grow with the rate: the highest rate's is decades above the lowest's.
    plain = [row_of(o.table, arm="plain", lr=lr)["max_attn_logit"] for lr in lrs]
    assert plain[-1] > 100 * plain[0]
    assert o.verdict.numbers["plain_logit_growth"] == plain[-1] / plain[0]
    # The sentences carry the table's numbers.
    for a in ARMS:
        for lr in lrs:
            assert f"{lr:.3g}: {row_of(o.table, arm=a, lr=lr)['train_loss']:.3g}" in o.verdict.text


def test_figures_are_drawn_from_the_table(lab_tiny, tmp_path):
    o = lab_tiny("attention")
    drawn = EXPERIMENTS["attention"].figures(o.table, o.results, tmp_path)
    assert [p.name for p in drawn] == ["lr_sensitivity.png", "attention_logits.png"]
    assert all(p.stat().st_size > 1000 for p in drawn)


def test_same_seed_same_run() -> None:
    e = EXPERIMENTS["attention"]
    torch.set_num_threads(1)
    config = RunConfig.make("attention", 0, arm="plain", lr=0.1, steps=30)
    first, second = e.run(config, None), e.run(config, None)
    assert first.metrics == second.metrics and first.series == second.series


def test_largest_logit_is_the_one_sdpa_softmaxes() -> None:
    """max_attention_logit's logits, softmaxed with the causal mask and applied to v, give the
    attention module's own output (F.scaled_dot_product_attention): they are its logits."""
    torch.manual_seed(0)
    data = recurrence_split(8, 1, 16, VOCAB, seed=3)
    seen: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.update(x=args[0], y=out)

    for qk_norm in (False, True):
        model = CausalTransformer(VOCAB, 16, dim=32, depth=2, heads=4, qk_norm=qk_norm).double()
        x = data.x_train
        attn = model.blocks[1].attn
        hook = attn.register_forward_hook(keep)
        with torch.no_grad():
            model(x)
            hook.remove()
            q, k, v = attn.qkv_heads(seen["x"])
            logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            mask = torch.ones(16, 16, dtype=torch.bool).triu(1)
            by_hand = torch.softmax(logits.masked_fill(mask, -math.inf), dim=-1) @ v
            b, h, t, d = by_hand.shape
            out = attn.proj(by_hand.transpose(1, 2).reshape(b, t, h * d))
        # float64 throughout: the only error is rounding (~1e-16 relative); 1e-10 is loose.
        torch.testing.assert_close(out, seen["y"], rtol=1e-10, atol=1e-10)
        measured = max_attention_logit(model, x)
        assert set(measured) == {"blocks.0.attn", "blocks.1.attn"}
        assert measured["blocks.1.attn"] == float(logits.masked_fill(mask, -math.inf).max())


def test_task_targets_follow_the_recurrence() -> None:
    d = recurrence_split(5, 2, 10, VOCAB, seed=1)
    x, y = d.x_train, d.y_train
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, 1:], (x[:, 1:] + x[:, :-1]) % VOCAB)


def test_fit_with_a_z_loss_steps_on_the_penalised_loss() -> None:
    """One SGD step of fit(z_loss=c) against the same step by hand: the gradient of
    cross-entropy + c·mean(logsumexp(logits over classes)²), on the batch fit draws."""
    from gradprobe.lab.training import fit

    data = recurrence_split(16, 4, 8, VOCAB, seed=2)
    torch.manual_seed(0)
    model = CausalTransformer(VOCAB, 8, dim=16, depth=1, heads=2)
    twin = CausalTransformer(VOCAB, 8, dim=16, depth=1, heads=2)
    twin.load_state_dict(model.state_dict())
    fit(model, data, steps=1, batch_size=8, optimizer="sgd", lr=0.5, seed=3, z_loss=0.1)
    idx = torch.randint(0, 16, (8,), generator=torch.Generator().manual_seed(3))
    out = twin(data.x_train[idx])
    z = torch.logsumexp(out, dim=1)
    loss = F.cross_entropy(out, data.y_train[idx]) + 0.1 * z.square().mean()
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    with torch.no_grad():
        for p, g in zip(twin.parameters(), grads):
            p -= 0.5 * g
    # Same float32 operations in the same order: equal to rounding (a few ulps of O(1)).
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # and the z term moved them: without it the step differs
    torch.manual_seed(0)
    plain = CausalTransformer(VOCAB, 8, dim=16, depth=1, heads=2)
    fit(plain, data, steps=1, batch_size=8, optimizer="sgd", lr=0.5, seed=3)
    assert not torch.allclose(plain.head.bias, model.head.bias, rtol=0, atol=1e-6)


def test_the_experiments_logit_is_the_probes_and_equals_its_own_measurement() -> None:
    """The experiment reads the Probe's attn_logit_max (largest over the modules at the last
    recorded step); the lab's own float64 measurement on the same batch and weights (before
    the update) is the independent check."""
    from gradprobe import Probe
    from gradprobe.lab.attention import largest_attention_logit
    from gradprobe.lab.training import FitResult

    data = recurrence_split(8, 1, 16, VOCAB, seed=4)
    torch.manual_seed(0)
    model = CausalTransformer(VOCAB, 16, dim=32, depth=2, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with Probe(model, opt, every=1, stats="cheap") as probe:
        for _ in range(3):
            # ≤ 8 sequences of 16 tokens: the Probe's sample is every query row.
            loss = F.cross_entropy(model(data.x_train), data.y_train)
            expected = max_attention_logit(model, data.x_train)  # eval, no grad: not recorded
            opt.zero_grad()
            loss.backward()
            opt.step()
        run = probe.run()
    got = largest_attention_logit(FitResult(run=run, history=None))
    # float32 logits (the Probe) against float64 (by hand): a few float32 ulps of |logit|.
    assert got == pytest.approx(max(expected.values()), rel=1e-5, abs=1e-5)
    table = run.table("attn_logit_max")
    assert list(table.index) == [0, 1, 2]
    for name, v in expected.items():
        assert table[name].iloc[-1] == pytest.approx(v, rel=1e-5, abs=1e-5)
