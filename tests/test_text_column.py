"""The flush's text columns (gradprobe.run.text_column) are what ``astype(str)`` of the
same Python strings gives, in this pandas' text dtype and in the object fallback."""

from __future__ import annotations

import numpy as np
import pandas as pd

import gradprobe.run as run_module
from gradprobe.run import normalize_frame, text_column

VOCABULARY = ["net.0", "net.0.weight", "(model)", "net.0", "ünïcode.層"]
CODES = np.array([4, 0, 2, 2, 1, 3, 0, 4])


def _expected() -> pd.Series:
    return pd.Series(np.array(VOCABULARY, dtype=object)[CODES]).astype(str)


def test_text_column_equals_astype_str():
    got = pd.Series(text_column(VOCABULARY, CODES))
    pd.testing.assert_series_equal(got, _expected())


def test_a_frame_made_from_codes_is_normalized_unchanged():
    frame = pd.DataFrame(
        {
            "step": np.arange(len(CODES)),
            "name": text_column(VOCABULARY, CODES),
            "stat": text_column(["grad_norm"], np.zeros(len(CODES), dtype=int)),
            "value": np.linspace(0.0, 1.0, len(CODES)),
        }
    )
    by_strings = frame.assign(name=list(frame["name"]), stat=list(frame["stat"]))
    pd.testing.assert_frame_equal(normalize_frame(frame), normalize_frame(by_strings))


def test_the_object_fallback_of_a_pandas_without_arrow_text(monkeypatch):
    monkeypatch.setattr(run_module, "_text_dtype", lambda: np.dtype(object))
    got = text_column(VOCABULARY, CODES)
    assert isinstance(got, np.ndarray) and got.dtype == object
    assert list(got) == list(_expected())
