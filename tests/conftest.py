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


# Files whose float results another CPU rounds otherwise (collectives' equalities, the
# theory's float32 checks): scripts/test.sh reruns every `numerics` test under other
# kernels. Marked here by file, beside the tests marked in place (the demo's). The
# attention and sequence reducers, the site reducers and the Probe's attention statistics
# compare float32 with float64 references at tolerances derived from float32's error.
NUMERICS_FILES = frozenset(
    {
        "test_ddp.py",
        "test_fsdp.py",
        "test_theory.py",
        "test_theory_fixed_points.py",
        "test_probe_attention.py",
        "test_attention_stats.py",
        "test_sequence_stats.py",
        "test_site_reducers.py",
        "test_update_snapshot.py",
        "test_sentinel_wild.py",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in NUMERICS_FILES:
            item.add_marker(pytest.mark.numerics)
