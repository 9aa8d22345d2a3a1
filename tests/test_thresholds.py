"""The detectors' thresholds as one table: each a plain number to the code that uses it,
with its reason and its name (gradprobe.diagnose.thresholds)."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pandas as pd
import pytest

from gradprobe.diagnose import THRESHOLDS
from gradprobe.diagnose.thresholds import Count, Threshold, table


def test_the_table_holds_every_threshold_once_with_a_reason() -> None:
    assert len(THRESHOLDS) >= 40
    for name, t in THRESHOLDS.items():
        assert t.name == name
        assert len(t.why) > 20, name  # a sentence, not a placeholder
    assert [row[0] for row in table()] == list(THRESHOLDS)


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_a_threshold_behaves_as_its_plain_number(name: str) -> None:
    t = THRESHOLDS[name]
    plain = int(t) if isinstance(t, Count) else float(t)
    assert isinstance(t, (Threshold, Count))
    # what the detectors and the findings' JSON do with it, against the plain number
    assert t == plain and hash(t) == hash(plain)
    assert repr(t) == repr(plain) and f"{t:g}" == f"{plain:g}"
    assert json.dumps({"v": t}) == json.dumps({"v": plain})
    assert type(t * 2) is type(plain * 2) and type(t + 1) is type(plain + 1)
    series = pd.Series([plain - 1, plain, plain + 1])
    assert (series >= t).tolist() == (series >= plain).tolist()
    assert np.asarray(t).dtype == np.asarray(plain).dtype
    for back in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t)):
        assert back == plain and back.why == t.why and back.name == name


def test_counts_are_whole_numbers_that_index() -> None:
    counts = [t for t in THRESHOLDS.values() if isinstance(t, Count)]
    assert counts
    for c in counts:
        assert len(list(range(c))) == int(c)
        assert list(range(10))[:c] == list(range(10))[: int(c)]
