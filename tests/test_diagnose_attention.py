"""The detectors inside the Transformer (attention-logit growth, entropy collapse, rank
collapse, output-logit divergence) and vanishing through time from the error signal over a
recurrent output's positions.

Every run is real training under a Probe; the statistics the Probe does not record yet are
computed by hand at every step (tests/_attention_cases.py: float64 attention logits and
entropies, numpy token cosines, logsumexp, ‖dL/dh_t‖ from autograd on an unrolled copy) and
written into the run. Each finding's numbers are checked against those values, and healthy
twins get none of these findings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import _attention_cases as C
from _diagnose_cases import validate
from gradprobe import diagnose
from gradprobe.diagnose import DETECTORS, FINDINGS_JSON_SCHEMA, Findings
from gradprobe.diagnose.thresholds import (
    ATTN_LOGIT_CRITICAL,
    ATTN_LOGIT_GROWTH,
    ATTN_LOGIT_LARGE,
    ENTROPY_COLLAPSE_NATS,
    ENTROPY_FALL,
    LOGIT_Z_DRIFT,
    RANK_COLLAPSE_COSINE,
    TIME_ERROR_DECAY,
    VANISHING_RATIO,
)
from gradprobe.run import Run

NEW = {"attention_logit_growth", "attention_entropy_collapse", "rank_collapse"}
NEW_ALL = NEW | {"output_logit_divergence"}


def found(run: Run, rows: C.Rows) -> Findings:
    findings = diagnose(C.with_rows(run, rows))
    assert validate(findings.to_dict(), FINDINGS_JSON_SCHEMA) == []
    for f in findings:
        for r in f.remedies:
            compile(r.code, f"<{r.key}>", "exec")  # valid Python when pasted
    return findings


def g2(x: float) -> str:
    """A number as the findings write it (two significant digits)."""
    return f"{x:.2g}"


# ---------------------------------------------------------------- attention-logit growth
def test_logits_that_grow_at_too_high_a_rate_are_the_root_with_qk_layernorm_first() -> None:
    run, rows = C.transformer_case("plain_lr_high")
    findings = found(run, rows)
    f = findings.of("attention_logit_growth")
    assert f is not None and f.cause is None
    for name in ("blocks.0.attn", "blocks.1.attn"):
        early = C.early_median(rows, name, "attn_logit_max")
        recent = C.recent_median(rows, name, "attn_logit_max")
        # The values put in make the finding: large, and grown tenfold.
        assert recent >= ATTN_LOGIT_LARGE and recent >= ATTN_LOGIT_GROWTH * early
        got = f.evidence["modules"][name]
        # Medians of the same float64 values: equal up to summation order (1e-12 relative).
        assert got["early"] == pytest.approx(early, rel=1e-12)
        assert got["recent"] == pytest.approx(recent, rel=1e-12)
        assert got["largest"] == pytest.approx(C.values(rows, name, "attn_logit_max").max())
        assert got["entropy_recent"] == pytest.approx(C.recent_median(rows, name, "attn_entropy"))
        first = np.argmax(C.values(rows, name, "attn_logit_max") >= ATTN_LOGIT_LARGE)
        assert got["first_step"] == int(first)
    worst = f.names[0]
    w = f.evidence["modules"][worst]
    assert f"grew ×{g2(w['recent'] / w['early'])} in `{worst}`" in f.summary
    assert f"from {g2(w['early'])}" in f.summary and f"to {g2(w['recent'])}" in f.summary
    assert f.severity == ("critical" if w["recent"] >= ATTN_LOGIT_CRITICAL else "warning")
    assert f.remedies[0].key == "qk_layernorm"
    assert {"lower_peak_lr", "lr_warmup"} <= {r.key for r in f.remedies}
    # The one-hot heads and the tokens made one vector follow from it: one story.
    collapse = findings.of("attention_entropy_collapse")
    assert collapse is not None and collapse.cause == "attention_logit_growth"
    assert "attention_entropy_collapse" in f.consequences
    rank = findings.of("rank_collapse")
    assert rank is None or rank.cause == "attention_logit_growth"
    assert findings[0].kind == "attention_logit_growth"


def test_entropy_collapse_numbers_are_the_rows_put_in() -> None:
    run, rows = C.transformer_case("plain_lr_high")
    f = found(run, rows).of("attention_entropy_collapse")
    assert f is not None
    for name, got in f.evidence["modules"].items():
        early = C.early_median(rows, name, "attn_entropy")
        recent = C.recent_median(rows, name, "attn_entropy")
        assert recent <= ENTROPY_COLLAPSE_NATS and recent <= ENTROPY_FALL * early
        assert got["early"] == pytest.approx(early, rel=1e-12)
        assert got["recent"] == pytest.approx(recent, rel=1e-12)
        assert got["lowest_head"] == pytest.approx(C.recent_median(rows, name, "attn_entropy_min"))
    # The loss level it reports: the logged loss, last-half median over its start.
    loss = run.model_series("loss")
    level = float(loss.iloc[len(loss) // 2 :].median()) / float(loss.iloc[:5].median())
    assert f.evidence["loss_level"] == pytest.approx(level, rel=1e-9)
    assert f"{level:.0%} of its start" in f.summary
    worst = f.names[0]
    assert f"to {g2(f.evidence['modules'][worst]['recent'])}" in f.summary


def test_one_hot_heads_in_a_model_that_learns_are_no_collapse() -> None:
    """The recurrence x[t] = x[t−1] + x[t−2] is solved by heads that look at one key each:
    the entropy falls below the threshold while the loss falls to a fraction of its start."""
    run, rows = C.transformer_case("plain_long")
    name = "blocks.0.attn"
    recent = C.recent_median(rows, name, "attn_entropy")
    assert recent <= ENTROPY_COLLAPSE_NATS  # the entropy alone would make the finding
    assert recent <= ENTROPY_FALL * C.early_median(rows, name, "attn_entropy")
    assert not NEW_ALL & set(found(run, rows).kinds)
    # Without the loss, whether training suffers is unknown: said, as information only.
    frame = run.frame()
    unlogged = Run(run.meta, frame[frame["stat"] != "loss"])
    f = found(unlogged, rows).of("attention_entropy_collapse")
    assert f is not None and f.severity == "info" and "not logged" in f.summary


@pytest.mark.parametrize("name", ["plain_lr_ok", "qk_norm_lr_high", "plain_long"])
def test_healthy_attention_gets_none_of_these_findings(name: str) -> None:
    run, rows = C.transformer_case(name)
    assert not NEW_ALL & set(found(run, rows).kinds)
    if name == "qk_norm_lr_high":
        # QK-layernorm at the rate where the plain model's logits reach thousands.
        top = max(C.values(rows, f"blocks.{i}.attn", "attn_logit_max").max() for i in (0, 1))
        assert top < ATTN_LOGIT_LARGE


# ---------------------------------------------------------------- rank collapse
def test_tokens_made_one_vector_with_depth_are_rank_collapse() -> None:
    run, rows = C.transformer_case("no_residual")
    f = found(run, rows).of("rank_collapse")
    assert f is not None and f.cause is None
    blocks = [f"blocks.{i}" for i in range(8)]
    assert f.evidence["blocks"] == blocks
    recent = [C.recent_median(rows, b, "token_cosine") for b in blocks]
    init = [C.values(rows, b, "token_cosine")[0] for b in blocks]
    np.testing.assert_allclose(f.evidence["token_cosine_recent"], recent, rtol=1e-12)
    np.testing.assert_allclose(f.evidence["token_cosine_init"], init, rtol=1e-12)
    assert set(f.names) == {b for b, c in zip(blocks, recent) if c >= RANK_COLLAPSE_COSINE}
    assert recent[0] < RANK_COLLAPSE_COSINE <= recent[-1]
    assert f"{recent[-1]:.3f}" in f.summary and f"{recent[0]:.3f}" in f.summary
    assert f.severity == "critical"  # cosine ≥ 0.99 at the deepest block
    assert f.remedies[0].key in ("pre_layernorm", "branch_scaling")
    loss = run.model_series("loss")
    level = float(loss.iloc[len(loss) // 2 :].median()) / float(loss.iloc[:5].median())
    assert f.evidence["loss_level"] == pytest.approx(level, rel=1e-9) and level >= 0.5


def test_blocks_are_read_deepest_last_whatever_their_names_sort_to() -> None:
    """Twelve blocks whose names are not in the run's module list: blocks.10 and blocks.11
    are the deepest, not between blocks.1 and blocks.2 as text sorts them."""
    from _diagnose_cases import synthetic_run

    cosines = [0.1 + 0.08 * i for i in range(12)]  # rising with depth to 0.98
    rows = [(s, f"blocks.{i}", "token_cosine", c) for s in range(4) for i, c in enumerate(cosines)]
    f = diagnose(synthetic_run(rows, [{"name": "head"}])).of("rank_collapse")
    assert f is not None and f.evidence["blocks"][-1] == "blocks.11"
    assert f.names == ("blocks.11",) and f.severity == "info"  # no loss logged


def test_token_cosine_by_hand_is_the_mean_over_pairs() -> None:
    """The test's own token cosine against a loop over pairs (the definition)."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, 4))
    pairs = [
        h[b, i] @ h[b, j] / (np.linalg.norm(h[b, i]) * np.linalg.norm(h[b, j]))
        for b in range(3)
        for i in range(5)
        for j in range(5)
        if i != j
    ]
    assert C.token_cosine(h) == pytest.approx(float(np.mean(pairs)), rel=1e-12)


# ---------------------------------------------------------------- output logits
def test_logits_drifting_on_separable_data_are_output_logit_divergence() -> None:
    # Adam at 5e-2 on separable digits: the logits grow until the loss spikes, and past the
    # spikes the trajectory is chaotic (float64 too): how far log Z drifts is not a number
    # another CPU reproduces (here, three kernel settings gave 38, 91 and 57 nats against
    # the 20-nat threshold; at 3e-2 they straddled it). So the check is that the finding
    # agrees with the run's own rows, computed by hand from the logits in float64.
    run, rows = C.classifier_case(5e-2)
    findings = found(run, rows)
    f = findings.of("output_logit_divergence")
    early = C.early_median(rows, "out", "logit_z")
    recent = C.recent_median(rows, "out", "logit_z")
    if abs(recent - early) < LOGIT_Z_DRIFT:  # this CPU's run drifted less: no log Z claim
        assert f is None or "out" not in f.evidence.get("logit_z", {})
        return
    assert f is not None and f.names == ("out",)
    got = f.evidence["logit_z"]["out"]
    assert got["drift"] == pytest.approx(recent - early, rel=1e-12)
    assert f"moved {recent - early:+.3g} nats" in f.summary
    assert f.remedies[0].key == "z_loss"
    # Spikes of the gradient norm that begin after the logits drifted follow from it.
    spike = findings.of("grad_norm_spike")
    assert spike is None or spike.cause in (None, "output_logit_divergence")


def test_a_classifier_at_a_moderate_rate_has_no_output_logit_divergence() -> None:
    run, rows = C.classifier_case(1e-2)
    drift = C.recent_median(rows, "out", "logit_z") - C.early_median(rows, "out", "logit_z")
    assert 0 < drift < LOGIT_Z_DRIFT
    assert "output_logit_divergence" not in found(run, rows).kinds


# ---------------------------------------------------------------- through time
def test_error_falling_back_through_time_is_vanishing_with_its_numbers() -> None:
    run, rows = C.recurrent_case("rnn_contracting")
    f = found(run, rows).of("vanishing")
    assert f is not None and "time_error" in f.evidence["modes"] and "rnn" in f.names
    got = f.evidence["time_error"]["rnn"]
    first = C.recent_median(rows, "rnn", "error_time_first")
    last = C.recent_median(rows, "rnn", "error_time_last")
    slope = C.recent_median(rows, "rnn", "error_time_slope")
    assert got["error_first"] == pytest.approx(first, rel=1e-12)
    assert got["error_last"] == pytest.approx(last, rel=1e-12)
    assert got["first_last_ratio"] == pytest.approx(first / last, rel=1e-12)
    assert got["decades_per_step"] == pytest.approx(slope, rel=1e-12)
    # orthogonal × 0.5 with tanh' ≤ 1: at least log10(2) ≈ 0.3 decade lost per step back
    assert slope >= math.log10(2) - 0.02 and slope >= TIME_ERROR_DECAY
    assert first / last <= VANISHING_RATIO
    assert f"×{g2(first / last)}" in f.summary and f"≈{slope:.2g} decade" in f.summary
    assert f.severity == "critical"  # ≤ 1e-6 across the sequence
    assert f.remedies[0].key == "lstm_gru"
    assert "grad_clipping" not in {r.key for r in f.remedies}


def test_the_slope_is_read_whichever_way_it_was_fitted() -> None:
    """A slope fitted per step back (negative where the error falls going back) gives the
    same finding as one fitted over t forward."""
    run, rows = C.recurrent_case("rnn_contracting")
    flipped = [(s, n, st, -v if st == "error_time_slope" else v) for s, n, st, v in rows]
    a = found(run, rows).of("vanishing").evidence["time_error"]
    b = found(run, flipped).of("vanishing").evidence["time_error"]
    assert a == b


def test_error_that_crosses_the_sequence_is_no_vanishing_through_time() -> None:
    run, rows = C.recurrent_case("rnn_orthogonal")
    first = C.recent_median(rows, "rnn", "error_time_first")
    last = C.recent_median(rows, "rnn", "error_time_last")
    assert first / last > VANISHING_RATIO
    assert abs(C.recent_median(rows, "rnn", "error_time_slope")) < TIME_ERROR_DECAY
    f = found(run, rows).of("vanishing")
    assert f is None or "time_error" not in f.evidence["modes"]


# ---------------------------------------------------------------- where they apply
def test_attention_checks_are_no_gap_for_a_model_without_attention() -> None:
    run, _ = C.classifier_case(1e-2)  # an MLP: nothing to read attention from
    skipped = diagnose(run).skipped
    assert not NEW_ALL & set(skipped)
    transformer, _ = C.transformer_case("plain_lr_ok")
    findings = diagnose(transformer)  # no attention rows: a gap, said, or the check ran
    for kind in NEW_ALL:
        assert kind in findings.skipped or kind in findings.checked.detectors
    assert all(DETECTORS[k].applies is not None for k in NEW_ALL)


def test_odd_values_are_judged_without_failing() -> None:
    """One recorded step, NaN and Inf values, a module with nothing but NaN: every new check
    runs (none is skipped as 'could not be judged') and none finds anything."""
    from _diagnose_cases import synthetic_run

    nan, inf = float("nan"), float("inf")
    rows = [
        (0, "a.attn", "attn_logit_max", inf),
        (0, "a.attn", "attn_entropy", nan),
        (0, "a.attn", "attn_entropy_min", 0.0),
        (0, "b.attn", "attn_logit_max", 3.0),
        (0, "b.attn", "attn_entropy", 1.2),
        (0, "a", "token_cosine", nan),
        (0, "b", "token_cosine", 0.2),
        (0, "head", "logit_z", inf),
        (0, "head", "logit_max", nan),
        (0, "rnn", "error_time_first", 0.0),
        (0, "rnn", "error_time_last", 0.0),
        (0, "rnn", "error_time_slope", nan),
    ]
    findings = diagnose(synthetic_run(rows, [{"name": n} for n in ("a", "b", "head", "rnn")]))
    assert not [k for k, why in findings.skipped.items() if "could not be judged" in why]
    assert set(findings.checked.detectors) >= NEW_ALL
    assert not (NEW_ALL | {"vanishing"}) & set(findings.kinds)


def test_qk_layernorm_is_not_proposed_to_a_model_that_has_it() -> None:
    from gradprobe.remedies import model_profile, rank_remedies

    with_qk, _ = C.transformer_case("qk_norm_lr_high")
    without, _ = C.transformer_case("plain_lr_ok")
    names = {m["name"] for m in with_qk.meta["modules"]}
    assert {"blocks.0.attn.q_norm", "blocks.0.attn.k_norm"} <= names  # what the Probe saw
    keys = [r.key for r in rank_remedies("attention_logit_growth", model_profile(with_qk.meta))]
    assert "qk_layernorm" not in keys and keys[0] == "lower_peak_lr"
    keys = [r.key for r in rank_remedies("attention_logit_growth", model_profile(without.meta))]
    assert keys[0] == "qk_layernorm"
