"""On a GPU: the statistics are the same, and the hooks never make the host wait.

Skipped where there is no CUDA device (this project's CI has none; a task lent a GPU
machine runs these there).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprobe import Probe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(inplace=True),
                         nn.Linear(32, 4))


@cuda
def test_cuda_statistics_equal_cpu_statistics():
    torch.manual_seed(0)
    cpu_model = _model()
    gpu_model = _model().cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    frames = []
    for model, dev in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Probe(model, opt) as probe:
            for _ in range(2):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
                opt.step()
            frames.append(probe.frame().set_index(["step", "name", "stat"]).value.sort_index())
    cpu, gpu = frames
    assert cpu.index.equals(gpu.index)
    assert torch.allclose(torch.tensor(cpu.to_numpy()), torch.tensor(gpu.to_numpy()), rtol=1e-4, atol=1e-6)


@cuda
def test_recorded_steps_never_synchronise_with_the_host():
    torch.manual_seed(0)
    model = _model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 16, device="cuda"), torch.randint(0, 4, (64,), device="cuda")
    with Probe(model, opt, flush_every=100) as probe:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # the first step sets up buffers and index tensors
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(probe.frame().step.unique()) == 4


@cuda
def test_sentinel_steps_never_synchronise_with_the_host():
    # The "auto" cadence's sentinel steps (its short route, recording/sentinel.py), the
    # gradients clipped (the step measures again), a NaN flag and the spike total left on
    # the device, read later through events: no host wait at any of them.
    from gradprobe.recording.clock import AUTO_FIRST

    torch.manual_seed(0)
    model = _model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 16, device="cuda"), torch.randint(0, 4, (64,), device="cuda")
    with Probe(model, opt, flush_every=1000) as probe:
        for step in range(AUTO_FIRST + 6):
            if step > AUTO_FIRST:  # (the first steps set up buffers and index tensors)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                probe.log(loss=loss)
                if step % 2:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        frame = probe.frame()
    sentinel = frame[(frame.step > AUTO_FIRST) & (frame.stat == "grad_norm")]
    assert set(sentinel.step) == set(range(AUTO_FIRST + 1, AUTO_FIRST + 6))
