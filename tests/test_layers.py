"""The package's shape, as data: layers import downward only, no import cycles, small modules.

Read from the source with ``ast`` (nothing is imported), deferred imports inside functions
included: a function-level import is still a dependency, only a later one. What does not
hold yet is listed below as an explicit exception with its reason, so that this file shows
what is left to do; an exception that no longer applies fails the test too, so that the
list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "gradprobe"

# Each layer may import its own and the layers below it, never one above. A name covers
# a module and, for a package, everything under it ("" is the package's lazy __init__).
LAYERS: dict[str, tuple[str, ...]] = {
    # L0 base: no knowledge of runs or statistics; pyplot and views found by name.
    "base": (
        "errors",
        "_version",
        "_views",
        "_mpl",
        "kinds",
        "activations",
        "architecture",
        "finding",
    ),
    # L1 numbers: statistics as data, and the theory (maths from an activation and an init).
    "numbers": ("stats", "theory", "spikes"),
    # L2 runs: the record format on disk and the Run read back from it (data only).
    "runs": ("store", "run"),
    # L3 recording: the Probe and its engine.
    "recording": (
        "hooks",
        "reduce",
        "sites",
        "buffer",
        "shards",
        "capture",
        "step",
        "probe",
        "follow",
        "recurrent",
        "traversals",
        "attention",
        "sequence",
        "recording",  # the components the Probe facade is made of (gradprobe/recording)
    ),
    # L4 analysis: findings from a run, remedies, the story; live checks during training.
    "analysis": ("remedies", "story", "diagnose", "live"),
    # L5 views: figures and HTML of runs and findings.
    "views": ("plots", "html", "headline", "report"),
    # L6 apps: what a user runs, and the package's front door.
    "apps": ("lab", "integrations", "demo", "explain", "cli", "cli_args", ""),
}

# (importer, imported): upward imports that remain, each with why it is still there.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {
    **dict.fromkeys(
        # Old import paths kept for code written before the HTML moved to gradprobe.html:
        # resolved by the package's __getattr__ when an old name is asked for, never by
        # gradprobe's own code (which imports them from gradprobe.html).
        (("diagnose", "html"),),
        "compat: gradprobe.diagnose.findings_html/inline_code/NOTEBOOK_CSS",
    ),
}
# Compatibility edges only: left out of the cycle check as well (nothing of gradprobe takes them).
COMPAT = {k for k, why in UPWARD_EXCEPTIONS.items() if why.startswith("compat:")}

# Import cycles that remain (strongly connected sets of modules, TYPE_CHECKING imports
# left out): the recording engine's mixins import the Probe they are mixed into.
CYCLE_EXCEPTIONS: list[set[str]] = []

# Size rule of thumb: a module over ~600 lines or a class over ~300 holds several ideas.
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
# What is over it today, to split: each with its size now as a ceiling. The list can only
# shrink and the ceilings only fall (lower one when a split lands): a file over the rule
# must not grow while it waits for its split.
BIG_MODULES = {
    "theory.meanfield": (633, "mean-field maths for every activation"),
}
BIG_CLASSES: dict[str, tuple[int, str]] = {}


def _modules() -> dict[str, Path]:
    """Every module of the package by its name under it ("" for the package itself)."""
    root = SRC / PACKAGE
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _import_nodes(tree: ast.AST, typing_too: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, classes, try blocks)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif typing_too or not _type_checking(node):
            yield from _import_nodes(node, typing_too)


def imports_of(name: str, typing_too: bool = True) -> set[str]:
    """The package's modules that module ``name`` imports (names under the package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # the deepest module of the package that the dotted name reaches
        while target not in MODULES and "." in target:
            target = target.rpartition(".")[0]
        if target in MODULES and target != name:
            found.add(target)

    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), typing_too):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name.removeprefix(PACKAGE).lstrip("."))
            continue
        if node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            module = ".".join([*base, *([node.module] if node.module else [])])
        elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
            module = node.module.removeprefix(PACKAGE).lstrip(".")
        else:
            continue
        for alias in node.names:  # `from . import plots` imports the module gradprobe.plots
            sub = f"{module}.{alias.name}" if module else alias.name
            add(sub if sub in MODULES else module)
    return found


def layer_of(name: str) -> int:
    best, layer = -1, -1
    for i, members in enumerate(LAYERS.values()):
        for m in members:
            if (name == m or name.startswith(m + ".") or m == "") and len(m) > best:
                best, layer = len(m), i
    return layer


def _owner(name: str) -> str:
    """The LAYERS entry a module falls under (for the exceptions' keys)."""
    candidates = [m for members in LAYERS.values() for m in members]
    return max((m for m in candidates if name == m or name.startswith(m + ".")), key=len)


def test_every_module_has_a_layer() -> None:
    placed = {name: layer_of(name) for name in MODULES}
    # "" (the package) places everything in apps by default: a new module must be placed.
    unplaced = [
        n
        for n in MODULES
        if n and all(not (n == m or n.startswith(m + ".")) for ms in LAYERS.values() for m in ms)
    ]
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"
    assert all(v >= 0 for v in placed.values())


def _upward() -> dict[tuple[str, str], list[str]]:
    up: dict[tuple[str, str], list[str]] = {}
    for name in MODULES:
        for target in imports_of(name):
            if layer_of(target) > layer_of(name):
                up.setdefault((_owner(name), _owner(target)), []).append(f"{name} → {target}")
    return up


def test_layers_import_downward_only() -> None:
    up = _upward()
    new = {k: v for k, v in up.items() if k not in UPWARD_EXCEPTIONS}
    assert not new, f"upward imports (a lower layer importing a higher one): {new}"


def test_every_upward_exception_is_still_needed() -> None:
    stale = set(UPWARD_EXCEPTIONS) - set(_upward())
    assert not stale, f"these exceptions no longer apply: remove them from the list: {stale}"


def _cycles() -> list[set[str]]:
    """Strongly connected sets of two or more modules (Tarjan), TYPE_CHECKING left out."""
    graph = {
        n: {t for t in imports_of(n, typing_too=False) if (_owner(n), _owner(t)) not in COMPAT}
        for n in MODULES
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(scc)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    cycles = _cycles()
    assert sorted(map(sorted, cycles)) == sorted(map(sorted, CYCLE_EXCEPTIONS)), cycles


def test_the_views_table_names_views_that_exist() -> None:
    # Run.plot and the notebook HTML reach their views by name (gradprobe._views): each entry
    # must name a function of a views-layer module, found by the same rule as an import.
    tree = ast.parse(MODULES["_views"].read_text(encoding="utf-8"))
    table = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "VIEWS"
    )
    views = list(LAYERS).index("views")
    for module, function in table.values():
        name = module.removeprefix(PACKAGE + ".")
        assert layer_of(name) == views, module
        defined = {
            n.name
            for n in ast.parse(MODULES[name].read_text(encoding="utf-8")).body
            if isinstance(n, ast.FunctionDef)
        }
        assert function in defined, f"{module}.{function}"


def test_the_live_check_is_found_by_name_in_the_analysis_layer() -> None:
    """The Probe runs the live check (analysis) while recording without importing it: it
    names it (probe.LIVE_CHECK), read here from the source, and that name must exist."""
    tree = ast.parse(MODULES["probe"].read_text(encoding="utf-8"))
    (entry,) = (
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "LIVE_CHECK" for t in node.targets)
    )
    module, cls = entry
    name = module.removeprefix(PACKAGE + ".")
    assert layer_of(name) == list(LAYERS).index("analysis"), module
    body = ast.parse(MODULES[name].read_text(encoding="utf-8")).body
    assert cls in {n.name for n in body if isinstance(n, ast.ClassDef)}, f"{module}.{cls}"


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_classes_stay_small(name: str) -> None:
    path = MODULES[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    ceiling = BIG_MODULES.get(name, (MAX_MODULE_LINES, ""))[0]
    assert lines <= ceiling, f"{name}: {lines} lines (at most {ceiling}): split it by idea"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            qualified = f"{name}.{node.name}"
            ceiling = BIG_CLASSES.get(qualified, (MAX_CLASS_LINES, ""))[0]
            assert _lines(node) <= ceiling, f"{qualified}: {_lines(node)} lines (at most {ceiling})"


def test_every_size_exception_is_still_big() -> None:
    for name in BIG_MODULES:
        assert len(MODULES[name].read_text(encoding="utf-8").splitlines()) > MAX_MODULE_LINES, name
    for qualified in BIG_CLASSES:
        module, _, cls = qualified.rpartition(".")
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        assert _lines(node) > MAX_CLASS_LINES, qualified
