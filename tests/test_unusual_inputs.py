"""Valid but unusual inputs reach the hooks: zero-size calls, empty micro-batches, torch.func.

A call on nothing (an expert routed no tokens, an empty micro-batch) is counted in
``calls`` and contributes no entry: the step's means, fractions and norms are those of the
entries that exist, and its other calls keep theirs. A call inside a ``torch.func``
transform is left out with one warning naming the transform; the passes outside it are
recorded as usual. Each case trains under the Probe and, un-probed, a twin: parameters end
bit-identical, no hook is left after ``close()``, and the statistics match what the test
computes itself from the twin's tensors (its own forward hooks, ``autograd.grad``, float64).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from _call_record import Recorder
from gradprobe import Probe
from gradprobe.hooks import GradprobeWarning
from reference import hook_counts


class TopOneMoE(nn.Module):
    """Every expert is called on the tokens routed to it: some on none in a micro-batch."""

    def __init__(self, width: int = 6, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, width))
            for _ in range(experts)
        )

    def forward(self, x: Tensor) -> Tensor:
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            idx = (choice == i).nonzero().squeeze(-1)
            out = out.index_add(0, idx, expert(x[idx]))
        return out


def _moe() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), TopOneMoE(), nn.Linear(6, 2))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )


def _moe_batches(step: int) -> list[Tensor]:
    # Micro-batches of 3 tokens over 4 experts: most steps leave some expert without any.
    g = torch.Generator().manual_seed(step)
    return [torch.randn(3, 5, generator=g) for _ in range(2)]


def _cnn_batches(step: int) -> list[Tensor]:
    # The last micro-batch is empty, as a loader's last batch after filtering can be.
    g = torch.Generator().manual_seed(step)
    return [torch.randn(4, 2, 5, 5, generator=g), torch.randn(0, 2, 5, 5, generator=g)]


def _train(model: nn.Module, batches, steps: int, loss_of, record: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = Recorder(model) if record else None
    per_step: list = []
    for step in range(steps):
        opt.zero_grad()
        for x in batches(step):
            loss = loss_of(model(x))
            if recorder is not None:
                recorder.backward(loss)
            else:
                loss.backward()
        opt.step()
        if recorder is not None:
            per_step.append(recorder.step_stats())
    if recorder is not None:
        recorder.remove()
        return per_step, recorder.mixed
    return per_step, 0


def _summed(out: Tensor) -> Tensor:
    # A sum, not a mean: an empty micro-batch adds 0 (its mean would be NaN).
    return (out**2).sum()


@pytest.mark.parametrize(
    "build,batches", [(_moe, _moe_batches), (_cnn, _cnn_batches)], ids=["moe", "empty_batch"]
)
def test_zero_size_calls_count_and_contribute_nothing(build, batches):
    steps = 4
    model = build()
    twin, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    reference, mixed = _train(reference_model, batches, steps, _summed, record=True)
    before = hook_counts(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt_model = model
        probe = Probe(opt_model, None, every=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            opt.zero_grad()
            for x in batches(step):
                _summed(model(x)).backward()
            opt.step()
            probe.step()
        frame = probe.frame()
        probe.close()
    _train(twin, batches, steps, _summed, record=False)
    assert [w for w in caught if issubclass(w.category, GradprobeWarning)] == []
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert hook_counts(model) == before
    rows = {(r.step, r.name, r.stat): r.value for r in frame.itertuples()}
    empty_calls = 0  # (step, module)s whose calls were all empty
    for step, ref in enumerate(reference):
        for (name, stat), expected in ref.items():
            got = rows.get((step, name, stat))
            if expected is None:
                assert got is None, (step, name, stat, got)
                empty_calls += stat == "act_mean"
                continue
            # float32 sums against float64 sums of the same entries: ~1e-7 relative per
            # op over tens of ops; 1e-5 holds under any vector width.
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (step, name, stat)
    # The case is what it claims: an empty call beside one with entries, and (the MoE) an
    # expert with only empty calls in some step.
    assert mixed > 0
    assert empty_calls > 0 or build is not _moe


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _per_sample_grads_then_a_plain_pass(model: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
    """DP-SGD style: per-sample gradients by vmap(grad(functional_call)), clipped and
    summed into .grad by hand; then a plain pass on the same batch adds its gradient."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return _ce(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for name, p in model.named_parameters():
        g = per_sample[name]
        scale = (1.0 / g.flatten(1).norm(dim=1).clamp(min=1.0)).view(-1, *[1] * (g.dim() - 1))
        p.grad = (g * scale).sum(0)
    return _ce(model(x), y)


def _jacobian_penalty(model: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
    """A loss with an input-Jacobian penalty: jacrev runs the model inside a transform."""
    jac = jacrev(lambda inp: model(inp))(x[:1])
    return _ce(model(x), y) + 0.01 * jac.pow(2).sum()


def _functional_call(model: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
    """functional_call alone is no transform: a plain pass through the module's own
    parameters, recorded as one."""
    return _ce(functional_call(model, dict(model.named_parameters()), (x,)), y)


@pytest.mark.parametrize(
    "loss_of,transform",
    [
        (_per_sample_grads_then_a_plain_pass, "torch.func.grad"),
        (_jacobian_penalty, "jacrev"),
        (_functional_call, None),
    ],
    ids=["per_sample_grads", "jacobian_penalty", "functional_call"],
)
def test_calls_inside_a_transform_are_left_out_with_a_warning(loss_of, transform):
    steps = 3
    model = _mlp()
    twin, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))] * steps

    def train(m: nn.Module, recorder: Recorder | None, probe_it: bool):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        probe = Probe(m, opt, every=1) if probe_it else None
        refs, grads = [], []
        for x, y in data:
            opt.zero_grad()
            loss = loss_of(m, x, y)
            (recorder.backward if recorder is not None else torch.Tensor.backward)(loss)
            grads.append({n: float(p.grad.double().norm()) for n, p in m.named_parameters()})
            opt.step()
            if recorder is not None:
                refs.append(recorder.step_stats())
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
        return refs, grads, frame

    recorder = Recorder(reference_model)
    reference, grads, _ = train(reference_model, recorder, False)
    recorder.remove()
    before = hook_counts(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, frame = train(model, None, True)
    train(twin, None, False)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert hook_counts(model) == before
    ours = [str(w.message) for w in caught if issubclass(w.category, GradprobeWarning)]
    if transform is None:
        assert ours == []
    else:
        assert len(ours) == 1 and transform in ours[0], ours
    rows = {(r.step, r.name, r.stat): r.value for r in frame.itertuples()}
    for step, ref in enumerate(reference):
        # The plain pass alone: one call per module, its statistics as the twin's.
        for (name, stat), expected in ref.items():
            got = rows.get((step, name, stat))
            # float32 against float64 of the same tensors: 1e-5 relative on any CPU.
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (step, name, stat)
        for name, expected in grads[step].items():  # .grad as the step applied it
            assert rows[(step, name, "grad_norm")] == pytest.approx(expected, rel=1e-5)


class PromptTuned(nn.Module):
    """Prompt tuning with a number of virtual tokens that may be 0: a parameter with no
    entries, concatenated before the sequence (an empty concat)."""

    def __init__(self, virtual_tokens: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(virtual_tokens, 4))
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        prompt = self.prompt.expand(x.shape[0], -1, -1)
        h = torch.tanh(self.proj(torch.cat([prompt, x], dim=1)))
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_a_parameter_with_no_entries_has_norms_and_no_update_ratio(optimizer):
    torch.manual_seed(0)
    model = PromptTuned(virtual_tokens=0)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(3, 5, 4, generator=g), torch.randint(0, 2, (3,), generator=g))] * 3

    def train(m: nn.Module, probed: bool):
        opt = optimizer(m.parameters(), lr=0.1)
        probe = Probe(m, opt, every=1) if probed else None
        expected = []
        for x, y in data:
            opt.zero_grad()
            _ce(m(x), y).backward()
            before = {n: p.detach().double().clone() for n, p in m.named_parameters()}
            grads = {n: p.grad.double().numpy() for n, p in m.named_parameters()}
            opt.step()
            expected.append(
                {
                    n: (
                        float(np.linalg.norm(grads[n])),
                        float(np.linalg.norm(before[n].numpy())),
                        float(np.linalg.norm((p.detach().double() - before[n]).numpy()))
                        / float(np.linalg.norm(before[n].numpy())),
                    )
                    for n, p in m.named_parameters()
                    if p.numel()
                }
                | {"prompt": (0.0, 0.0, None)}
            )
        frame = probe.frame() if probe is not None else None
        if probe is not None:
            probe.close()
        return expected, frame

    before_hooks = hook_counts(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected, frame = train(model, True)
    train(twin, False)
    assert [w for w in caught if issubclass(w.category, GradprobeWarning)] == []
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert hook_counts(model) == before_hooks
    rows = {(r.step, r.name, r.stat): r.value for r in frame.itertuples()}
    for step, params in enumerate(expected):
        for name, (grad_norm, param_norm, ratio) in params.items():
            # float32 norms against NumPy float64 of the same entries: 1e-5 on any CPU.
            assert rows[(step, name, "grad_norm")] == pytest.approx(grad_norm, rel=1e-5)
            assert rows[(step, name, "param_norm")] == pytest.approx(param_norm, rel=1e-5)
            if ratio is None:  # 0/0: no ratio, not a NaN
                assert (step, name, "update_ratio") not in rows
            else:
                # Δw in float32 cancels: its relative error is ~2⁻²⁴·‖w‖/‖Δw‖, ≲ 1e-5
                # for the ratios ≳ 0.01 of lr=0.1 here; 1e-4 leaves a factor of ten.
                assert rows[(step, name, "update_ratio")] == pytest.approx(ratio, rel=1e-4)
        assert not math.isnan(rows[(step, "(model)", "global_grad_norm")])
