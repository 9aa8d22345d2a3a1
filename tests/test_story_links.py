"""gradprobe.story on hand-made findings: the links follow EXPLAINED_BY and the steps the
findings began; roots first; contradicted remedies dropped (issue 22 §1)."""

from __future__ import annotations

from gradprobe.diagnose import KIND_ORDER, SEVERITIES, Finding
from gradprobe.remedies import ModelProfile, rank_remedies
from gradprobe.story import EXPLAINED_BY, tell

MLP = ModelProfile(
    "mlp", frozenset({"relu"}), frozenset({"relu", "Linear", "optimizer:sgd"}), "SGD"
)


def _f(kind: str, severity: str = "warning", **evidence) -> Finding:
    return Finding(kind, severity, ("x",), f"{kind}.", evidence, tuple(rank_remedies(kind, MLP)))


def _tell(*findings: Finding, **facts) -> list[Finding]:
    return tell(list(findings), MLP, facts, KIND_ORDER, SEVERITIES)


def test_every_link_is_between_known_kinds_and_has_no_cycle() -> None:
    assert set(EXPLAINED_BY) <= set(KIND_ORDER)
    assert {k for v in EXPLAINED_BY.values() for k in v} <= set(KIND_ORDER)

    def reaches(a: str, b: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            c == b or (c not in seen and reaches(c, b, seen | {c})) for c in EXPLAINED_BY.get(a, ())
        )

    assert not [k for k in EXPLAINED_BY if reaches(k, k)]


def test_large_steps_explain_units_killed_after_them_not_before() -> None:
    big = _f("exploding", modes=["updates"], update_ratio_first_step=5)
    later = _f("dead_units", "critical", since_step={"act1": 8})
    found = _tell(later, big, _f("plateau", first_step=10))
    assert [f.kind for f in found] == ["exploding", "dead_units", "plateau"]
    assert [f.cause for f in found] == [None, "exploding", "exploding"]
    assert found[0].consequences == ("dead_units", "plateau")
    earlier = _f("dead_units", "critical", since_step={"act1": 0})
    found = _tell(earlier, big)
    assert [f.cause for f in found] == [None, None]
    assert found[0].kind == "dead_units"  # critical first


def test_a_larger_rate_and_clipping_are_dropped_where_the_run_contradicts_them() -> None:
    plateau = _f("plateau")
    assert "raise_lr" in [r.key for r in plateau.remedies]
    (kept,) = _tell(plateau, max_update_ratio=0.5)
    assert "raise_lr" not in [r.key for r in kept.remedies]
    (kept,) = _tell(plateau, max_update_ratio=1e-4)
    assert kept.remedies[0].key == "raise_lr"
    spike = _f("grad_norm_spike", steps=[3])
    assert spike.remedies[0].key == "grad_clipping"
    (kept,) = _tell(spike, clipping_acted=True)
    assert "grad_clipping" not in [r.key for r in kept.remedies]


def test_updates_too_large_for_sgd_put_a_smaller_rate_first() -> None:
    (root,) = _tell(_f("unstable_updates"))
    assert root.remedies[0].key == "lr_schedule"
