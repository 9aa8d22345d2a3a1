"""docs/concepts.md prints the numbers the code computes.

Each table of the page preceded by ``<!-- checked: NAME -->`` is parsed, and every number
in it is compared with a fresh computation by ``gradprobe.explain`` / ``gradprobe.theory``
to the precision the page prints it with (``0.141`` must be within 0.0005 of the computed
value). Numbers quoted in the running text must be entries of a checked table, so no
number on the page escapes the check.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gradprobe import STATISTICS, explain, theory
from gradprobe.activations import ACTIVATIONS
from gradprobe.lab import EXPERIMENTS
from gradprobe.remedies import REMEDIES

DOC_PATH = Path(__file__).parent.parent / "docs" / "concepts.md"
DOC = DOC_PATH.read_text(encoding="utf-8")

# A number as the page writes it: an optional (Unicode) minus, digits, decimals, exponent.
NUMBER = re.compile(r"[-−]?\d+(?:\.\d+)?(?:e[-+−]?\d+)?")


def _float(text: str) -> float:
    return float(text.replace("−", "-"))


def numbers(cell: str) -> list[str]:
    """The numbers in a cell, in order, as printed (∞ stands for inf)."""
    found = [(m.start(), m.group()) for m in NUMBER.finditer(cell)]
    found += [(m.start(), "inf") for m in re.finditer("∞", cell)]
    return [text for _, text in sorted(found)]


def half_unit(printed: str) -> float:
    """Half a unit in the last printed place: the rounding a correct print allows."""
    if printed == "inf":
        return 0.0
    mantissa, _, exponent = printed.replace("−", "-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals) * 10.0 ** (int(exponent) if exponent else 0)


def agrees(printed: str, value: float) -> bool:
    if printed == "inf":
        return math.isinf(value) and value > 0
    return abs(_float(printed) - value) <= half_unit(printed) * (1 + 1e-9) + 1e-300


def assert_prints(cell: str, values, what: str) -> None:
    """Every number in ``cell`` is the matching entry of ``values``, as printed."""
    values = [float(v) for v in np.asarray(values, dtype=float).ravel()]
    printed = numbers(cell)
    assert len(printed) == len(values), f"{what}: page has {printed}, code has {values}"
    for p, v in zip(printed, values):
        assert agrees(p, v), f"{what}: page prints {p}, code computes {v!r}"


def checked_tables(doc: str) -> dict[str, list[list[str]]]:
    """``name -> rows`` (cells stripped, header and separator dropped) of each checked table."""
    tables: dict[str, list[list[str]]] = {}
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- checked: ([\w-]+) -->", line.strip())
        if not m:
            continue
        rows = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            rows.append([c.strip() for c in row.strip().strip("|").split("|")])
        assert m.group(1) not in tables, f"two tables checked as {m.group(1)!r}"
        assert len(rows) >= 3, f"checked table {m.group(1)!r} has no rows"
        tables[m.group(1)] = rows[2:]
    return tables


TABLES = checked_tables(DOC)


def table(name: str) -> list[list[str]]:
    assert name in TABLES, f"docs/concepts.md has no table checked as {name!r}"
    return TABLES[name]


def keyed(name: str) -> dict[str, list[str]]:
    rows = table(name)
    out = {row[0]: row[1:] for row in rows}
    assert len(out) == len(rows), f"{name}: repeated first column"
    return out


# ---------------------------------------------------------------- the page itself


def test_the_page_keeps_the_cited_section_numbers():
    # explain.py, cli.py and the lab cite "docs/concepts.md §N": those sections must exist.
    headings = re.findall(r"^## (\d)\. (.+)$", DOC, flags=re.M)
    assert [int(n) for n, _ in headings] == [1, 2, 3, 4, 5, 6, 7]
    titles = {int(n): t.lower() for n, t in headings}
    assert "back-propagation" in titles[1] and "hadamard" in titles[1]
    assert "vanishing" in titles[2] and "exploding" in titles[3]
    assert "remedies" in titles[4] and "standardisation" in titles[5]
    assert "channels" in titles[6] and "activation" in titles[7]


def test_the_readme_links_this_page():
    readme = (DOC_PATH.parent.parent / "README.md").read_text(encoding="utf-8")
    assert "](docs/concepts.md)" in readme


def test_explain_cites_this_page():
    # explain is a package: every module of it, not only its __init__, is read.
    package = Path(explain.__file__).parent
    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted(package.rglob("*.py"))}
    assert {"__init__.py", "backprop.py", "standardize.py", "channels.py"} <= set(sources)
    cited = {
        name: set(re.findall(r"concepts(?:\.md)? §(\d)", source))
        for name, source in sources.items()
    }
    assert set().union(*cited.values()) == {"1", "5", "6", "7"}
    # each worked example cites its own section (its module's docstring and table title)
    worked = {"backprop.py": "1", "standardize.py": "5", "channels.py": "6", "cheatsheet.py": "7"}
    for name, section in worked.items():
        assert cited[name] == {section}, name
    # every citation names the shipped file, not the old bare "concepts §N"
    for name, source in sources.items():
        assert re.findall(r"(?<!docs/)concepts(?:\.md)? §\d", source) == [], name


def test_the_number_checker_rejects_a_wrong_print():
    # the comparison the whole file relies on: a print is right only to its last digit
    assert agrees("37.72", 37.72214) and not agrees("37.73", 37.72214)
    assert agrees("6.257e-08", 6.257492e-08) and not agrees("6.26e-08", 6.2e-08)
    assert agrees("∞".replace("∞", "inf"), math.inf) and not agrees("40", 37.72)
    assert numbers("z < −5.99, z > 5.99") == ["−5.99", "5.99"]


def test_every_number_in_the_text_is_a_checked_table_entry():
    pool = [
        _float(n)
        for rows in TABLES.values()
        for row in rows
        for cell in row
        for n in numbers(cell)
        if n != "inf"
    ]
    text = re.sub(r"```.*?```", "", DOC, flags=re.S)  # commands, not results
    text = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
    # the exponent form first, or "6.257e-08" would be read as 6.257
    quoted = re.findall(r"[-−]?\d+(?:\.\d+)?e[-+−]?\d+|[-−]?\d+\.\d{2,}", text)
    assert quoted, "the text quotes no numbers: the pattern is broken"
    for q in quoted:
        assert any(agrees(q, v) for v in pool), f"{q} in the text is in no checked table"


# ---------------------------------------------------------------- §1


@pytest.fixture(scope="module")
def backprop():
    return explain.compute("backprop")


def test_backprop_table(backprop):
    rows = keyed("backprop")
    assert set(rows) == set(backprop.tensors), "one row per quantity explain computes"
    for name, (cell,) in rows.items():
        assert_prints(cell, backprop.tensors[name], name)
    # the text's "they agree to the last bit (largest difference 0)"
    assert max(backprop.max_abs_diff.values()) == 0.0
    assert "largest difference 0)" in DOC


def test_sigmoid_chain_table(backprop):
    rows = table("chain")
    assert [int(r[0]) for r in rows] == [c.layer for c in backprop.chain]
    for row, c in zip(rows, backprop.chain):
        z, gate, factor, product, auto = row[1:]
        assert_prints(z, [c.z], f"layer {c.layer} z")
        assert_prints(gate, [c.gate], f"layer {c.layer} gate")
        assert_prints(factor, [] if math.isnan(c.weight) else [c.factor], f"layer {c.layer}")
        assert_prints(product, [c.product], f"layer {c.layer} product")
        assert_prints(auto, [c.autograd], f"layer {c.layer} autograd")
    ((key, value),) = keyed("chain-summary").items()
    assert_prints(key, [backprop.chain_threshold], "threshold")
    assert int(value[0]) == backprop.chain_below
    assert any(agrees(n, backprop.gate_max) for n in numbers(DOC.split("## 2.")[0]))


# ---------------------------------------------------------------- §2, §3 and §4: theory


def _var(cell: str) -> float:
    return float(Fraction(cell))


def test_mean_field_table():
    rows = table("theory")
    assert {(r[0], r[2], r[3]) for r in rows} >= {
        ("sigmoid", "1/3", "1/192"),  # PyTorch's default init at width 64
        ("relu", "2", "0"),  # He: critical
        ("relu", "4", "0"),  # the lab's exploding net
    }
    for act, _init, w, b, q, chi, root, depth, ratio in rows:
        what = f"{act} σ_w²={w} σ_b²={b}"
        wv, bv = _var(w), _var(b)
        assert_prints(q, [theory.fixed_point(act, wv, bv)], f"{what} q*")
        c = theory.chi1(act, wv, bv)
        assert_prints(chi, [c], f"{what} χ₁")
        assert_prints(root, [math.sqrt(c)], f"{what} √χ₁")
        predicted = theory.predict_error_ratio(act, wv, bv, int(depth))
        assert_prints(ratio, [predicted], f"{what} ratio at depth {depth}")


def test_default_init_variances_quoted_in_the_text():
    init = theory.pytorch_default_init(64)
    assert init.weight_var == pytest.approx(float(Fraction("1/3")))
    assert init.var == pytest.approx(float(Fraction("1/192")))  # σ_b² of the same U(±1/√n)
    assert "σ_w² = 1/3 whatever the width, and σ_b² = 1/192 at width 64" in DOC


def test_critical_weight_variance_table():
    rows = table("critical")
    assert {r[0] for r in rows} == {"relu", "tanh", "sigmoid"}
    for act, b, w in rows:
        assert_prints(w, [theory.critical_weight_var(act, _var(b))], f"critical σ_w² of {act}")


def test_init_table():
    make = {
        "PyTorch default": lambda fi, fo: theory.pytorch_default_init(fi),
        "Xavier/Glorot": theory.xavier_init,
        "He/Kaiming": lambda fi, fo: theory.he_init(fi),
    }
    rows = keyed("init")
    assert set(rows) == set(make)
    for name, (fan_in, fan_out, var, weight_var) in rows.items():
        init = make[name](int(fan_in), int(fan_out))
        assert_prints(var, [init.var], f"{name} Var(W)")
        assert_prints(weight_var, [init.weight_var], f"{name} σ_w²")


def test_remedies_table_is_the_catalogue_and_names_what_exists():
    rows = keyed("remedies")
    assert set(rows) == {r.name for r in REMEDIES.values()}
    kinds = {k for r in REMEDIES.values() for k in r.treats}
    for name, (why, where) in rows.items():
        assert why and where, name
        labs = re.findall(r"lab `(\w+)`", where)
        stats = re.findall(r"stat `(\w+)`", where)
        findings = re.findall(r"finding `(\w+)`", where)
        assert labs or "gradprobe" in where, f"{name}: nothing shows it"
        assert set(labs) <= set(EXPERIMENTS), (name, labs)
        assert set(stats) <= set(STATISTICS), (name, stats)
        assert set(findings) <= kinds, (name, findings)
    # every experiment of the lab is cited somewhere on the page
    for experiment in EXPERIMENTS:
        assert f"lab `{experiment}`" in DOC, experiment


# ---------------------------------------------------------------- §5


def test_standardize_table():
    s = explain.compute("standardize")
    expect = {
        "mean μ": [s.mean],
        "sum of squared deviations Σ(x_i − μ)²": [s.population_variance * len(s.values)],
        "population variance σ² (÷ n)": [s.population_variance],
        "population standard deviation σ": [s.population_std],
        "sample variance s² (÷ (n − 1))": [s.sample_variance],
        "sample standard deviation s": [s.sample_std],
        "standardised values (population σ)": s.standardized,
        "mean and standard deviation of the standardised values": [
            s.standardized_mean,
            s.standardized_std,
        ],
        "widely copied (wrong) variance": [s.wrong_variance],
        "widely copied (wrong) standard deviation": [s.wrong_std],
    }
    rows = keyed("standardize")
    assert set(rows) == set(expect)
    for name, (cell,) in rows.items():
        assert_prints(cell, expect[name], name)
    assert f"For X = {[int(v) for v in s.values]}".replace("'", "") in DOC

    gates = table("gates")
    assert len(gates) == len(s.values)
    for row, x, gx, xs, gxs in zip(
        gates, s.values, s.sigmoid_gate_raw, s.standardized, s.sigmoid_gate_standardized
    ):
        assert_prints(" ".join(row), [x, gx, xs, gxs], f"gates at x = {x:g}")


# ---------------------------------------------------------------- §6


def test_channels_tables():
    c = explain.compute("channels")
    shapes = [r[1] for r in table("channel-shapes")]
    assert_prints(" ".join(shapes), [*c.input_shape, *c.weight_shape, *c.output_shape], "shapes")
    rows = table("channel-stats")
    assert len(rows) == len(c.channel_stats)
    for row, st in zip(rows, c.channel_stats):
        channel, name, mean, std, zero, dead = row
        assert int(channel) == st["channel"]
        assert name.replace("−", "-") == st["filter"]
        for cell, key in ((mean, "mean"), (std, "std"), (zero, "zero_frac")):
            assert_prints(cell, [st[key]], f"channel {channel} {key}")
        assert dead == ("yes" if st["dead"] else "no")
    inp = keyed("channel-input")
    assert_prints(inp["mean"][0], [c.per_channel_input["mean"]], "input mean")
    assert_prints(inp["std"][0], [c.per_channel_input["std"]], "input std")


# ---------------------------------------------------------------- §7


def test_cheat_sheet_is_explains():
    rows = keyed("cheat-sheet")
    assert {k.strip("`"): tuple(v) for k, v in rows.items()} == explain.CHEAT_SHEET


def _ends(intervals) -> list[float]:
    # the page writes an interval's finite ends only, and 0 for ends within rounding of it
    # (relu's dead range ends at 4e-22 after bisection), as explain's own table does
    return [0.0 if abs(v) < 1e-9 else v for iv in intervals for v in iv if math.isfinite(v)]


def test_activation_scan_table():
    facts = {f.name: f for f in explain.compute("activations")}
    rows = keyed("activations")
    assert {k.strip("`") for k in rows} == set(facts) == set(ACTIVATIONS)
    for key, (max_d, at, saturated, dead) in rows.items():
        f = facts[key.strip("`")]
        assert_prints(max_d, [f.max_derivative], f"{f.name} max f'")
        # flat maxima (relu: every z > 0) are written as a range; its first number is where
        # the scan found the maximum, to within the scan's step
        first = numbers(at)[0]
        assert abs(_float(first) - f.argmax) <= max(half_unit(first), 2e-3), f.name
        for cell, intervals, what in (
            (saturated, f.saturated, "saturated"),
            (dead, f.dead, "dead"),
        ):
            if not intervals:
                assert cell == "none", f"{f.name} {what}"
            else:
                assert_prints(cell, _ends(intervals), f"{f.name} {what}")
