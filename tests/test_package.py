"""gradprobe as users get it: the sdist and wheel that ``python -m build`` makes.

The rest of the suite imports gradprobe from the checkout (an editable install), which
hides the mistakes that only a built package has: a module or data file left out of the
wheel, a file the tests need left out of the sdist, a third-party import that
``pyproject.toml`` does not declare, a version that says two things, a README that PyPI
cannot render. Here the package is built once per session from a copy of the working
tree (no stale ``*.egg-info`` from the checkout can fill a gap), its contents are checked
against the source files, and (slow) the wheel is installed into a new virtual
environment with only its declared dependencies, where ``gradprobe --help``, a 10-step
probe, ``gradprobe diagnose`` and ``gradprobe report`` run from a temporary directory.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gradprobe._version import __version__

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
# Folders and files the sdist carries so that the suite runs from it (MANIFEST.in).
SDIST_FOLDERS = ("src", "tests", "docs", "examples", "bench", "requirements", "scripts", ".ci")
SDIST_FILES = ("LICENSE", "README.md", "pyproject.toml", "MANIFEST.in")
# Integration modules whose extra is not named after the module.
EXTRA_OF_INTEGRATION = {"huggingface": "hf"}


# --------------------------------------------------------------------------- build once


@contextlib.contextmanager
def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder shared by every pytest-xdist worker of this session, held under a lock.

    Yields ``(folder, done)``; the body fills the folder when ``done`` is False. A body that
    raises leaves it not done, so the next worker tries again (and fails the same way).
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the workers' basetemps share this parent
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another worker builds
        marker = folder / ".complete"
        done = marker.exists()
        if not done:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        yield folder, done
        marker.touch()


def _source_files() -> list[str] | None:
    """Files of the working tree that a fresh clone plus uncommitted work would have.

    None outside a git checkout (the suite run from an unpacked sdist).
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted(p for p in listed.split("\0") if p and (ROOT / p).is_file())


def _copy_source(target: Path) -> None:
    files = _source_files()
    if files is None:
        shutil.copytree(
            ROOT,
            target,
            ignore=shutil.ignore_patterns(
                ".git",
                ".venv",
                "build",
                "dist",
                "*.egg-info",
                "__pycache__",
                "*.pyc",
                ".pytest_cache",
                ".ruff_cache",
                ".hypothesis",
                "runs",
            ),
        )
        return
    for relative in files:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target / relative)


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path

    def wheel_names(self) -> set[str]:
        with zipfile.ZipFile(self.wheel) as archive:
            return set(archive.namelist())

    def wheel_text(self, name: str) -> str:
        with zipfile.ZipFile(self.wheel) as archive:
            return archive.read(name).decode("utf-8")

    def sdist_names(self) -> set[str]:
        """Member paths below the sdist's top folder ``gradprobe-VERSION/``."""
        with tarfile.open(self.sdist) as archive:
            return {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist and the wheel ``python -m build`` makes from this working tree.

    ``--no-isolation`` builds with this environment's setuptools (the dev extra pins
    ``setuptools>=77``, as ``[build-system]`` does) instead of downloading one; without
    ``--sdist``/``--wheel`` build makes the wheel from the sdist, so a file missing from
    the sdist fails the wheel too.
    """
    with _built_once(tmp_path_factory, "gradprobe-dist") as (folder, done):
        if not done:
            source = folder / "source"
            _copy_source(source)
            built = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "build",
                    "--no-isolation",
                    "--outdir",
                    str(folder / "dist"),
                    str(source),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        wheels = sorted((folder / "dist").glob("*.whl"))
        sdists = sorted((folder / "dist").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (wheels, sdists)
    return Dist(wheel=wheels[0], sdist=sdists[0])


# --------------------------------------------------------------------------- one version


def test_version_has_one_source() -> None:
    assert "version" not in PROJECT and "version" in PROJECT.get("dynamic", [])
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "gradprobe._version.__version__"
    # The dev install's metadata agrees (it is re-read at every editable install).
    assert importlib.metadata.version("gradprobe") == __version__
    # Nothing else in the package spells the version out.
    spelled = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "src" / "gradprobe").rglob("*.py")
        if p.name != "_version.py"
        and re.search(rf"['\"]{re.escape(__version__)}['\"]", p.read_text("utf-8"))
    ]
    assert spelled == []


def test_build_names_both_files_by_the_version(dist: Dist) -> None:
    assert dist.wheel.name == f"gradprobe-{__version__}-py3-none-any.whl"
    assert dist.sdist.name == f"gradprobe-{__version__}.tar.gz"
    metadata = dist.wheel_text(f"gradprobe-{__version__}.dist-info/METADATA")
    assert f"\nVersion: {__version__}\n" in metadata


# --------------------------------------------------------------------------- contents


def test_wheel_carries_every_module_and_data_file(dist: Dist) -> None:
    """Every file of the package in the source (py.typed and any data file) is in the wheel."""
    package = ROOT / "src" / "gradprobe"
    in_source = {
        "gradprobe/" + p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    names = dist.wheel_names()
    in_wheel = {n for n in names if n.startswith("gradprobe/")}
    assert "gradprobe/py.typed" in in_source
    assert in_source - in_wheel == set(), "left out of the wheel"
    assert in_wheel - in_source == set(), "in the wheel but not in src/gradprobe"
    # Nothing else installs as a top-level package (tests/, examples/ ...).
    assert {n.split("/")[0] for n in names} == {"gradprobe", f"gradprobe-{__version__}.dist-info"}


def test_wheel_metadata_declares_what_pyproject_does(dist: Dist) -> None:
    info = f"gradprobe-{__version__}.dist-info"
    metadata = dist.wheel_text(f"{info}/METADATA")
    headers = [
        line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line
    ]
    declared = {str(Requirement(r)) for r in PROJECT["dependencies"]}
    for extra, requirements in PROJECT["optional-dependencies"].items():
        declared |= {f'{Requirement(r)}; extra == "{extra}"' for r in requirements}
    requires = {str(Requirement(v)) for k, v in headers if k == "Requires-Dist"}
    assert requires == {str(Requirement(r)) for r in declared}
    assert {v for k, v in headers if k == "Provides-Extra"} == set(PROJECT["optional-dependencies"])
    assert ("Requires-Python", PROJECT["requires-python"]) in [tuple(h) for h in headers]
    assert ("License-Expression", "MIT") in [tuple(h) for h in headers]
    entry_points = dist.wheel_text(f"{info}/entry_points.txt")
    assert "gradprobe = gradprobe.cli:main" in entry_points


def test_license_is_mit_in_the_source_the_wheel_and_the_sdist(dist: Dist) -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PROJECT["license"] == "MIT" and license_text.startswith("MIT License")
    assert dist.wheel_text(f"gradprobe-{__version__}.dist-info/licenses/LICENSE") == license_text
    assert "LICENSE" in dist.sdist_names()


def test_sdist_carries_the_suite_and_what_it_reads(dist: Dist) -> None:
    """Downstream packagers run the tests from the sdist: it has every source file they use."""
    files = _source_files()
    if files is None:
        pytest.skip("not a git checkout: no list of source files to compare with")
    wanted = {f for f in files if f in SDIST_FILES or f.split("/")[0] in SDIST_FOLDERS}
    names = dist.sdist_names()
    assert {
        "tests/test_package.py",
        "src/gradprobe/py.typed",
        "docs/findings.md",
        ".ci/run",
    } <= wanted
    assert wanted - names == set(), "left out of the sdist"
    assert not [
        n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(".venv/")
    ]


def test_twine_check_strict_passes(dist: Dist) -> None:
    """PyPI would accept the metadata and render the README (twine's own renderer)."""
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dist.wheel), str(dist.sdist)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2


# --------------------------------------------------------------------------- dependencies


def third_party_imports(source: str) -> set[str]:
    """Top-level names of every absolute, non-standard-library import in ``source``.

    Imports inside functions count: a dependency used only when a command runs is still
    one the user must have.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {
        n
        for n in names
        if n not in sys.stdlib_module_names and n not in ("gradprobe", "__future__")
    }


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()  # reads every installed RECORD: ~1 s


def undeclared(imports: set[str], declared: set[str]) -> set[str]:
    """Import names whose installed distribution is not among ``declared`` (canonical names).

    An import no installed distribution provides is undeclared too.
    """
    provided_by = _packages_distributions()
    return {
        name
        for name in imports
        if not {canonicalize_name(d) for d in provided_by.get(name, [])} & declared
    }


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


@pytest.mark.parametrize(
    ("source", "declared", "expected"),
    [
        ("import sklearn.datasets\nfrom scipy import stats\n", {"scikit-learn", "scipy"}, set()),
        ("def f():\n    import yaml\n", {"numpy"}, {"yaml"}),  # inside a function
        ("from rich.table import Table\nimport os, json\n", set(), {"rich"}),  # stdlib is free
        ("from . import probe\nimport gradprobe.stats\n", set(), set()),  # its own modules
        (
            "import a_module_no_distribution_provides\n",
            {"numpy"},
            {"a_module_no_distribution_provides"},
        ),
    ],
)
def test_the_declared_dependency_check_finds_what_is_missing(
    source: str, declared: set[str], expected: set[str]
) -> None:
    assert undeclared(third_party_imports(source), declared) == expected


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    """Core modules import only ``dependencies``; ``integrations/X.py`` may add its extra X."""
    core = _names(PROJECT["dependencies"])
    extras = {extra: _names(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}
    package = ROOT / "src" / "gradprobe"
    problems = {}
    for path in sorted(package.rglob("*.py")):
        allowed = set(core)
        relative = path.relative_to(package)
        if relative.parts[0] == "integrations" and not path.stem.startswith("_"):
            extra = EXTRA_OF_INTEGRATION.get(path.stem, path.stem)
            assert extra in extras, f"{relative}: no extra [{extra}] in pyproject.toml"
            allowed |= extras[extra]
        missing = undeclared(third_party_imports(path.read_text("utf-8")), allowed)
        if missing:
            problems[str(relative)] = sorted(missing)
    assert problems == {}


# --------------------------------------------------------------------------- README


def _install_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Install\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert match, "README.md has no '## Install' section"
    return match.group(1)


def test_readme_install_documents_extras_and_the_torch_range() -> None:
    section = _install_section()
    for extra in PROJECT["optional-dependencies"]:
        assert f"[{extra}]" in section, f"extra [{extra}] is not in README's Install section"
    torch_requirement = next(
        Requirement(r) for r in PROJECT["dependencies"] if r.startswith("torch")
    )
    assert f"torch{torch_requirement.specifier}" in section
    pinned = re.search(
        r"^torch==(\S+)", (ROOT / "requirements" / "constraints.txt").read_text(), re.M
    )
    assert pinned and f"torch {pinned.group(1)}" in section, "the tested torch version"
    assert PROJECT["requires-python"] in section


# --------------------------------------------------------------------------- clean venv

# Run by the venv's interpreter from a temporary folder: 10 probed SGD steps on the data
# the demo uses (scikit-learn is imported only when data is loaded: importing every module
# would not see it), then every number the test compares, as JSON.
INSTALLED_PROBE = textwrap.dedent(
    """
    import importlib, importlib.metadata, importlib.resources, json, pkgutil, sys

    import torch
    from torch import nn

    import gradprobe
    from gradprobe.lab.data import digits  # scikit-learn's digits, as the demo and examples

    torch.manual_seed(0)
    data = digits()
    model = nn.Sequential(
        nn.Linear(data.in_features, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data.x_train[:64], data.y_train[:64]
    with gradprobe.Probe(model, optimizer, store=sys.argv[1]):
        for _ in range(10):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    run = gradprobe.load(sys.argv[1])
    frame = run.frame()
    last = frame[(frame.step == frame.step.max()) & (frame.stat == "grad_norm")]

    import_errors = {}
    for module in pkgutil.walk_packages(gradprobe.__path__, "gradprobe."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as error:
            import_errors[module.name] = error.name
    print(json.dumps({
        "gradprobe_file": gradprobe.__file__,
        "prefix": sys.prefix,
        "path": sys.path,
        "version": gradprobe.__version__,
        "metadata_version": importlib.metadata.version("gradprobe"),
        "meta_version": run.meta["versions"]["gradprobe"],
        "steps": sorted(int(s) for s in frame.step.unique()),
        "recorded_grad_norm": dict(zip(last.name, last.value.astype(float))),
        "grad_norm": {n: float(torch.linalg.vector_norm(p.grad)) for n, p in model.named_parameters()},
        "py_typed": importlib.resources.files("gradprobe").joinpath("py.typed").is_file(),
        "import_errors": import_errors,
    }))
    """
)


@dataclass(frozen=True)
class Venv:
    root: Path
    work: Path  # a temporary folder outside the checkout, the cwd of every command

    @property
    def bin(self) -> Path:
        return self.root / "bin"  # POSIX only, as fcntl is

    def env(self) -> dict[str, str]:
        """The environment less anything that could point Python back at the checkout.

        Bytecode writing stays on even where PYTHONDONTWRITEBYTECODE is set: the wheel
        was installed ``--no-compile``, so the first process compiles the modules it
        imports and the later ones reuse them (else each pays ~40 s recompiling torch).
        """
        dropped = (
            "PYTHONPATH",
            "PYTHONHOME",
            "VIRTUAL_ENV",
            "PYTHONSTARTUP",
            "PYTHONDONTWRITEBYTECODE",
        )
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            PYTHONNOUSERSITE="1",
            MPLBACKEND="Agg",
        )
        return env

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command),
            cwd=self.work,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A new virtual environment (no system site-packages) with the wheel and its dependencies.

    pip resolves the wheel's declared dependencies only; ``requirements/constraints.txt``
    pins torch to the CPU build this project tests (an unpinned torch would pull a CUDA
    build of several GB). ``venv --without-pip`` plus this environment's ``pip --python``
    skips ensurepip (~20 s), and ``--no-compile`` skips byte-compiling all of torch
    (the commands compile only what they import, see :meth:`Venv.env`).
    """
    with _built_once(tmp_path_factory, "gradprobe-venv") as (folder, done):
        root, work = folder / "venv", folder / "work"
        if not done:
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120
            )
            work.mkdir()
            installed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "--python",
                    str(root / "bin" / "python"),
                    "install",
                    "--no-compile",
                    "--disable-pip-version-check",
                    "-q",
                    "-c",
                    str(ROOT / "requirements" / "constraints.txt"),
                    str(dist.wheel),
                ],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return Venv(root=root, work=work)


@pytest.mark.slow
def test_the_wheel_installs_with_consistent_dependencies(venv: Venv) -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv.bin / "python"), "check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    site_packages = list(venv.root.glob("lib/python*/site-packages"))
    assert len(site_packages) == 1
    # The wheel's files, not an editable link back to the checkout.
    assert (site_packages[0] / "gradprobe" / "probe.py").is_file()
    assert not [pth for pth in site_packages[0].glob("*.pth") if str(ROOT) in pth.read_text()]
    # Clean: neither the dev environment's nor the system's site-packages are visible.
    config = (venv.root / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config


@pytest.mark.slow
def test_cli_help_runs_from_the_installed_wheel(venv: Venv) -> None:
    helped = venv.run(str(venv.bin / "gradprobe"), "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("demo", "diagnose", "report", "lab", "theory", "explain", "export"):
        assert command in helped.stdout


@pytest.mark.slow
def test_a_ten_step_probe_runs_from_the_installed_wheel(venv: Venv) -> None:
    script = venv.work / "probe_ten_steps.py"
    script.write_text(INSTALLED_PROBE, encoding="utf-8")
    store = venv.work / "runs" / "ten"
    probed = venv.run(str(venv.bin / "python"), str(script), str(store))
    assert probed.returncode == 0, probed.stderr[-3000:]
    seen = json.loads(probed.stdout.strip().splitlines()[-1])

    # Nothing from the checkout: the package, the prefix and every path are the venv's.
    assert Path(seen["gradprobe_file"]).resolve().is_relative_to(venv.root.resolve())
    assert Path(seen["prefix"]).resolve() == venv.root.resolve()
    assert not [p for p in seen["path"] if p and Path(p).resolve().is_relative_to(ROOT)]
    assert seen["py_typed"]

    assert seen["version"] == seen["metadata_version"] == seen["meta_version"] == __version__
    assert seen["steps"] == list(range(10))
    assert set(seen["recorded_grad_norm"]) == set(seen["grad_norm"])
    for name, norm in seen["grad_norm"].items():
        assert seen["recorded_grad_norm"][name] == pytest.approx(norm, rel=1e-5), name

    # Every core module imports with the declared dependencies alone; an integration
    # fails only for want of its own extra's package.
    # (This environment has every extra installed, so it knows which distribution
    # provides the missing module.)
    extras = {extra: _names(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}
    for module, missing in seen["import_errors"].items():
        assert module.startswith("gradprobe.integrations."), (module, missing)
        stem = module.rsplit(".", 1)[1]
        extra = extras[EXTRA_OF_INTEGRATION.get(stem, stem)]
        assert undeclared({missing.split(".")[0]}, extra) == set(), (module, missing)


@pytest.mark.slow
def test_diagnose_and_report_run_from_the_installed_wheel(venv: Venv) -> None:
    store = venv.work / "runs" / "ten"
    if not (store / "meta.json").exists():
        test_a_ten_step_probe_runs_from_the_installed_wheel(venv)
    diagnosed = venv.run(str(venv.bin / "gradprobe"), "diagnose", str(store), "--json")
    assert diagnosed.returncode == 0, diagnosed.stderr[-3000:]
    json.loads(diagnosed.stdout)
    page = venv.work / "report" / "ten.html"
    reported = venv.run(str(venv.bin / "gradprobe"), "report", str(store), "-o", str(page))
    assert reported.returncode == 0, reported.stderr[-3000:]
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert 'src="data:image/png;base64,' in html  # matplotlib drew its figures
