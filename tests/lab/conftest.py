"""Shared helpers for the lab tests: run an experiment's test-sized grid once per session."""

from __future__ import annotations

import pytest
import torch

from gradprobe.lab.runner import ExperimentResult, run_experiment

_CACHE: dict[str, ExperimentResult] = {}


def tiny(name: str) -> ExperimentResult:
    """The experiment's ``tiny`` grid, trained in-process (one torch thread), cached."""
    if name not in _CACHE:
        torch.set_num_threads(1)
        _CACHE[name] = run_experiment(name, mode="tiny", workers=1)
    return _CACHE[name]


@pytest.fixture
def lab_tiny():
    return tiny
