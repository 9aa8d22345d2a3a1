"""The hot path as a GPU runs it, on the CPU: no float32 screen and no host read, so
norms in float64 and NaN/Inf flags as device tensors (gradprobe/reduce.py). The same
checks as the CPU path's, against the same independent computations (they assert inside
the functions called here); each test also asserts the device path was the one taken."""

import pytest
import torch

import gradprobe.reduce as reduce
import test_batched_forward as batched
import test_gate_stats as gates
import test_probe as probe_tests


@pytest.fixture
def device_path(monkeypatch):
    """Every reduction takes the unscreened branch; returns how many times it was asked."""
    asked = [0]

    def unscreened(device, dtype):
        asked[0] += 1
        return False

    monkeypatch.setattr(reduce, "screened", unscreened)
    _, finite = reduce.l2_norm(torch.ones(3))
    assert finite is None  # no host-side flag: the flag is a device tensor
    return asked


@pytest.mark.parametrize("stats", ["default", "full"])
def test_nan_found_at_its_layer(stats, device_path):
    probe_tests.test_injected_nan_is_found_at_its_layer(stats)
    assert device_path[0] > 10


@pytest.mark.parametrize("inplace_relu", [False, True])
def test_batched_outputs(inplace_relu, monkeypatch, device_path):
    batched.test_batched_statistics_equal_the_twin_on_every_step(inplace_relu, monkeypatch)
    assert device_path[0] > 10


def test_batched_error_norms(monkeypatch, device_path):
    batched.test_batched_error_norms_equal_autograd_on_every_step(monkeypatch)
    assert device_path[0] > 10


@pytest.mark.parametrize("make", gates.ACTIVATIONS[:4])
def test_batched_gates(make, device_path):
    gates.test_gate_statistics_of_many_layers_of_one_shape(make)
    assert device_path[0] > 10
