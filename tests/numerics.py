"""Tolerances for float32 results computed in another order, derived from the computation.

A sharded or data-parallel run computes the same quantities as one process, in float32,
in another order: each rank sums its half of the batch, the ranks' sums are added (a
reduce-scatter or all-reduce tree), and the kernels' vector width decides how each
reduction is split (AVX-512 adds 16 lanes at a time, AVX2 8, the scalar path 1). Two such
orders give two float32 answers whose distance is of the size of *each one's* error
against the exact value, and that error depends on the quantity's conditioning: a
variance taken as E[x²] − E[x]² loses (mean/std)² of its precision, Adam divides by a
small √v + eps, and three steps of training carry every difference forward. A fixed
``rel=1e-5`` holds for one machine's order and fails on another's.

So the reference is the same single-process computation in float64 (the exact value for
float32's purposes: 2⁻⁵³ vs 2⁻²⁴), and the float32 single process's distance from it,
measured on this machine for each (module or parameter, statistic) over the run's steps,
is the size of float32's error for that quantity. Another order's float32 result must
lie within ``SAFETY`` times that size of the float64 value. ``SAFETY`` = 8: the errors
of two summation orders are sums of many independent roundings, so they are
like-sized draws of one distribution; the largest over a run's steps is at least its
typical size, and a draw beyond 8 times it is a many-sigma event. Measured (the ratio
is printed with ``pytest -s``): DDP and FSDP against one process, under the AVX-512,
AVX2 and scalar kernels and MKL's compatible path, at most 1.32 (FSDP uneven_adam's
act_std under ATEN_CPU_CAPABILITY=default), 0.96 or less otherwise. A floor of ``FLOOR_ULPS``
float32 units in the last place of the value (and ``ABS_FLOOR`` for values at 0) covers
quantities whose float32 error happened to round to nothing on this machine.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one unit in the last place at 1.0
SAFETY = 8.0
FLOOR_ULPS = 64  # a few dozen roundings of the last operations (a norm's sqrt, a ratio)
ABS_FLOOR = 1e-9  # statistics exactly 0 in one run (a dead unit's mean) and 1e-12 in another

# Counts of entries (fractions of entries at 0, past a threshold, in a histogram bin) and
# flags: integers over a count, compared exactly — a float32 difference moves one only
# if an entry lies within rounding of its threshold, which the tests' data avoid.
DISCRETE = (
    "calls",
    "zero_frac",
    "dead_frac",
    "dead_window_frac",
    "sat_frac",
    "clipped",
    "nonfinite",
    "grad_missing",
)


def is_discrete(stat: str) -> bool:
    return stat in DISCRETE or stat.startswith("hist_")


def float32_error_scale(single32: pd.DataFrame, single64: pd.DataFrame) -> pd.DataFrame:
    """Per (step, name, stat): the float64 value and the tolerance for a float32 result.

    The tolerance is ``SAFETY`` × the float32 single process's largest distance from
    float64 over the steps of that (name, stat), at least ``FLOOR_ULPS`` ulps of the value,
    plus ``ABS_FLOOR``.
    """
    keys = ["step", "name", "stat"]
    merged = single32.merge(single64, on=keys, how="inner", suffixes=("_32", "_64"))
    err = (merged["value_32"] - merged["value_64"]).abs()
    merged["err32"] = err.groupby([merged["name"], merged["stat"]]).transform("max")
    floor = FLOOR_ULPS * EPS32 * merged["value_64"].abs()
    merged["tol"] = SAFETY * np.maximum(merged["err32"], floor) + ABS_FLOOR
    return merged[[*keys, "value_32", "value_64", "err32", "tol"]]


def assert_within_float32_error(
    got: pd.DataFrame, single32: pd.DataFrame, single64: pd.DataFrame, what: str
) -> None:
    """Every statistic of ``got`` (a float32 run in another order) against the single
    process: continuous ones within the derived tolerance of float64, discrete ones equal
    to float32's."""
    scale = float32_error_scale(single32, single64)
    merged = got.merge(scale, on=["step", "name", "stat"], how="left", indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head(20)
    cont = merged[~merged.stat.map(is_discrete)]
    scale = np.maximum(cont["err32"], FLOOR_ULPS * EPS32 * cont["value_64"].abs()) + ABS_FLOOR
    ratio = (cont["value"] - cont["value_64"]).abs() / scale
    if len(ratio):  # shown with -s: how much of the safety factor this order used
        worst = cont.loc[ratio.idxmax()]
        print(f"{what}: worst off/float32-error {ratio.max():.2f} ({worst['name']} {worst.stat})")
    for row in merged.itertuples():
        if is_discrete(row.stat):
            assert row.value == row.value_32, (what, row.step, row.name, row.stat)
        else:
            off = abs(row.value - row.value_64)
            assert off <= row.tol, (
                what, row.step, row.name, row.stat, row.value, row.value_64,
                f"off {off:.3g} > tol {row.tol:.3g} (float32 error {row.err32:.3g})",
            )


def norm_rtol(n: int) -> float:
    """Relative bound on a float32 2-norm of ``n`` entries against the exact value, in any
    order of summation: each square and each of the n − 1 additions of positive terms
    rounds by at most u = eps/2 of the running sum, so the sum of squares is within
    (n + 1)·u and its square root within (n + 3)·u/2. Twice that, (n + 3)·u, also covers a
    reference that is itself a float32 norm (clip_grad_norm_'s total) or a ratio of two
    such norms (update_ratio); returned as (n + 3)·eps for a factor 2 to spare."""
    return (n + 3) * EPS32
