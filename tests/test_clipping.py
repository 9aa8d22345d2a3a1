"""Clipping: the global gradient norm as backward produced it and as the optimizer saw it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprobe import Probe
from gradprobe.stats import MODEL_NAME


def model_rows(frame):
    rows = frame[frame.name == MODEL_NAME]
    return rows.pivot(index="step", columns="stat", values="value")


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    return model, torch.randn(16, 6), torch.randint(0, 3, (16,))


def test_preclip_postclip_and_the_clipped_fraction():
    model, x, y = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    limits = [100.0, 0.1, 100.0, 0.1]  # clipped on the odd steps only
    totals, after = [], []
    with Probe(model, opt) as probe:
        for limit in limits:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit)))
            after.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in model.parameters()])
                    )
                )
            )
            opt.step()
        frame = probe.frame()
    rows = model_rows(frame)
    assert rows["global_grad_norm_preclip"].tolist() == pytest.approx(totals, rel=1e-6)
    assert rows["global_grad_norm"].tolist() == pytest.approx(after, rel=1e-6)
    assert rows["clipped"].tolist() == [0, 1, 0, 1]
    assert rows["clipped"].mean() == 0.5  # the fraction of clipped steps
    # Unclipped: the two norms are the same number, bit for bit.
    assert rows.loc[0, "global_grad_norm"] == rows.loc[0, "global_grad_norm_preclip"]
    # Clipped: the optimizer saw max_norm (clip_grad_norm_ scales to max_norm / (total + 1e-6)).
    assert rows.loc[1, "global_grad_norm"] == pytest.approx(0.1, rel=1e-4)


def test_clip_by_value_is_seen_as_clipping():
    model, x, y = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt) as probe:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
        opt.step()
        frame = probe.frame()
    rows = model_rows(frame)
    assert rows.loc[0, "clipped"] == 1
    assert rows.loc[0, "global_grad_norm"] < rows.loc[0, "global_grad_norm_preclip"]


def test_without_an_optimizer_probe_step_closes_the_step():
    model, x, y = setup()
    with Probe(model) as probe:
        for limit in (0.05, 100.0):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
            probe.step()
        frame = probe.frame()
    assert model_rows(frame)["clipped"].tolist() == [1, 0]


def test_every_k_measures_the_preclip_norm_only_on_recorded_steps():
    model, x, y = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Probe(model, opt, every=2) as probe:
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        frame = probe.frame()
    assert sorted(model_rows(frame).index) == [0, 2]


def test_no_preclip_hooks_when_not_asked_for():
    model, _, _ = setup()
    with Probe(model, stats=["grad_norm"]):
        assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    with Probe(model, stats=["clipped"]):
        assert all(p._post_accumulate_grad_hooks for p in model.parameters())
    assert all(
        not p._post_accumulate_grad_hooks for p in model.parameters()
    )  # close() removed them
