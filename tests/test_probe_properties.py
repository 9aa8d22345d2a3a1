"""Property tests over random architectures: the Probe measures the real gradients and
changes nothing of the user's training."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from gradprobe import Probe
from reference import param_grad_norms
from strategies import Architecture, architectures


def _one_step(model: nn.Module, arch: Architecture, probe_it: bool):
    torch.manual_seed(11)
    x, y = arch.batch_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = Probe(model, opt) if probe_it else None
    losses, grads = [], []
    for _ in range(2):
        opt.zero_grad()
        torch.manual_seed(13)  # dropout masks alike in both twins
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    frame = probe.frame() if probe else None
    if probe:
        probe.close()
    return losses, grads, frame


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures)
def test_probe_changes_nothing_and_measures_every_gradient(arch: Architecture):
    torch.manual_seed(3)
    model = arch.build()
    torch.manual_seed(3)
    twin = arch.build()
    probed_losses, probed_grads, frame = _one_step(model, arch, probe_it=True)
    plain_losses, plain_grads, _ = _one_step(twin, arch, probe_it=False)
    # Bit for bit: the probe must not perturb the forward pass, the backward pass or the step.
    for a, b in zip(probed_losses, plain_losses):
        assert torch.equal(a, b)
    for ga, gb in zip(probed_grads, plain_grads):
        assert ga.keys() == gb.keys()
        for n in ga:
            assert torch.equal(ga[n], gb[n]), n
    # grad_norm of every parameter at the last step, against the real .grad.
    expected = {n: float(torch.linalg.vector_norm(g)) for n, g in probed_grads[-1].items()}
    got = frame[(frame.stat == "grad_norm") & (frame.step == 1)].set_index("name").value
    assert set(got.index) == set(expected)
    for n, v in expected.items():
        assert abs(got[n] - v) <= 1e-6 * max(v, 1e-30) + 1e-12, n
    # Each module with an output in the graph has an error signal at every step.
    assert (frame[frame.stat == "error_norm"].groupby("step").size() > 0).all()


def test_reference_helper_reads_real_grads():
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    norms = param_grad_norms(model)
    assert norms["bias"] == torch.linalg.vector_norm(torch.ones(2)).item()
