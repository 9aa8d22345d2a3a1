"""Fixtures shared by the whole suite: one torch thread, no display, the model problems."""

from __future__ import annotations

import os

import pytest
import torch

from problems import PROBLEMS, Problem

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(params=PROBLEMS, ids=lambda p: p.name)
def problem(request: pytest.FixtureRequest) -> Problem:
    return request.param
