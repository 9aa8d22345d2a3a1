"""The flush's text columns (gradprobe.run.text_column) are what ``astype(str)`` of the
same Python strings gives, in this pandas' text dtype and in the object fallback; the
flush's frames, built so, are what normalize_frame makes (gradprobe.run.is_normal)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

import gradprobe.run as run_module
from gradprobe import Probe
from gradprobe.run import is_normal, normalize_frame, text_column

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


def _coded_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": np.arange(len(CODES), dtype=np.int64),
            "name": text_column(VOCABULARY, CODES),
            "stat": text_column(["grad_norm"], np.zeros(len(CODES), dtype=int)),
            "value": np.linspace(0.0, 1.0, len(CODES)),
        }
    )


def test_a_frame_is_normal_exactly_when_normalizing_it_changes_nothing():
    """The flush keeps a frame it built (no normalize_frame) only where is_normal says
    normalize_frame would give it back unchanged: values, dtypes, columns."""
    frame = _coded_frame()
    others = {
        "int32 steps": frame.astype({"step": np.int32}),
        "float32 values": frame.astype({"value": np.float32}),
        "text as objects": frame.astype({"name": object}),
        "columns reordered": frame[["name", "step", "stat", "value"]],
        "a column more": frame.assign(extra=1),
    }
    text_is_str = isinstance(run_module._text_dtype(), pd.StringDtype)
    assert is_normal(frame) == text_is_str
    # The arrays a frame is about to be made of (what the flush checks) say the same.
    arrays = {
        "step": frame["step"].to_numpy(),
        "name": frame["name"].array,
        "stat": frame["stat"].array,
        "value": frame["value"].to_numpy(),
    }
    assert is_normal(arrays) == text_is_str
    assert not is_normal({**arrays, "name": np.asarray(list(frame["name"]), dtype=object)})
    assert not is_normal({**arrays, "value": arrays["value"].astype(np.float32)})
    for what, other in others.items():
        assert not is_normal(other), what
    for candidate in [frame, *others.values()]:
        if is_normal(candidate):
            normal = normalize_frame(candidate)
            pd.testing.assert_frame_equal(candidate, normal, check_exact=True)
            assert list(candidate.dtypes) == list(normal.dtypes)


def test_with_text_as_objects_no_frame_is_normal(monkeypatch):
    """A pandas that keeps text as Python objects: the flush's frame is always
    normalized (``astype(str)`` of objects is a conversion, not a no-op)."""
    monkeypatch.setattr(run_module, "_text_dtype", lambda: np.dtype(object))
    frame = _coded_frame().astype({"name": object, "stat": object})
    assert not is_normal(frame)


def test_the_probes_flushed_frames_are_as_normalize_frame_makes_them():
    """Each flush's frame, as the live check, the listeners and the store get it, and the
    whole run's: values and dtypes exactly those normalize_frame gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    flushed = []
    with Probe(model, opt, every=1, flush_every=3) as probe:
        probe.add_listener(flushed.append)
        for _ in range(7):
            opt.zero_grad()
            loss = model(torch.randn(4, 6)).square().mean()
            loss.backward()
            probe.log(loss=loss)
            opt.step()
        whole = probe.frame()
    assert len(flushed) >= 3 and sum(map(len, flushed)) == len(whole) > 0
    for frame in [whole, *flushed]:
        normal = normalize_frame(frame)
        pd.testing.assert_frame_equal(frame, normal, check_exact=True)
        assert list(frame.dtypes) == list(normal.dtypes)
