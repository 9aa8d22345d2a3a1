"""The hot path as a GPU runs it, on the CPU: no float32 screen and no host read, so
norms in float64 and NaN/Inf flags as device tensors (gradprobe/reduce.py). The same
checks as the CPU path's, against the same independent computations."""

import pytest
import torch

import gradprobe.reduce as reduce
import test_batched_forward as batched
import test_gate_stats as gates
import test_probe as probe_tests


@pytest.fixture(autouse=True)
def unscreened(monkeypatch):
    monkeypatch.setattr(reduce, "screened", lambda device, dtype: False)
    _, finite = reduce.l2_norm(torch.ones(3))
    assert finite is None  # the device path: no host-side flag


@pytest.mark.parametrize("stats", ["default", "full"])
def test_nan_found_at_its_layer(stats):
    probe_tests.test_injected_nan_is_found_at_its_layer(stats)


@pytest.mark.parametrize("inplace_relu", [False, True])
def test_batched_outputs(inplace_relu, monkeypatch):
    batched.test_batched_statistics_equal_the_twin_on_every_step(inplace_relu, monkeypatch)


def test_batched_error_norms(monkeypatch):
    batched.test_batched_error_norms_equal_autograd_on_every_step(monkeypatch)


@pytest.mark.parametrize("make", gates.ACTIVATIONS[:4])
def test_batched_gates(make):
    gates.test_gate_statistics_of_many_layers_of_one_shape(make)
