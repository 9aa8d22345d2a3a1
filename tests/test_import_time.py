"""Start-up cost: what `import gradprobe` and `from gradprobe import Probe` load.

The package is lazy (PEP 562): `import gradprobe`, `import gradprobe.errors` and
`import gradprobe.cli` must not load torch, pandas, scipy, matplotlib or torch._dynamo,
which cost seconds (issue 10 §4); the public names still resolve on first use. Each check
runs in a fresh interpreter, since this test process has long since imported everything.
Times are measured by bench/import_time.py, not asserted here.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

import gradprobe

# Never loaded by the package itself on `import gradprobe`.
HEAVY = ("torch", "torch._dynamo", "numpy", "pandas", "pyarrow", "matplotlib", "scipy", "sklearn")
# Probe needs torch (and pandas for its frames), but not these.
NOT_FOR_PROBE = ("torch._dynamo", "torch._inductor", "matplotlib", "scipy", "sklearn")


def run_fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it sets ``result``, which comes back as JSON."""
    program = textwrap.dedent(code) + "\nimport json as _json\nprint(_json.dumps(result))\n"
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    return run_fresh(
        f"""
        import sys
        {statement}
        result = [m for m in {list(modules)!r} if m in sys.modules]
        """
    )


@pytest.mark.parametrize(
    "statement", ["import gradprobe", "import gradprobe.errors", "import gradprobe.cli"]
)
def test_package_import_loads_nothing_heavy(statement: str) -> None:
    assert loaded_after(statement, HEAVY) == []


def test_probe_import_and_recording_leave_dynamo_scipy_matplotlib_out() -> None:
    # Recording steps too: the compiled-model hooks (torch.compiler.disable imports
    # torch._dynamo) are made only for a compiled model. No optimizer here, because
    # torch's own Optimizer.__init__ imports torch._dynamo (torch 2.13), which is not ours.
    result = run_fresh(
        f"""
        import sys
        from gradprobe import Probe
        after_import = [m for m in {list(NOT_FOR_PROBE)!r} if m in sys.modules]
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        with Probe(model) as probe:
            for _ in range(2):
                model(torch.randn(3, 4)).sum().backward()
                probe.step()
        result = {{
            "after_import": after_import,
            "after_recording": [m for m in {list(NOT_FOR_PROBE)!r} if m in sys.modules],
            "steps": sorted(set(probe.frame()["step"].tolist())),
        }}
        """
    )
    assert result["after_import"] == []
    assert result["after_recording"] == []
    assert len(result["steps"]) == 2  # the probe did record: the check above is not vacuous


# Where each public name is defined, written out here (not read from the package's own table).
DEFINED_IN = {
    "ACTIVATIONS": "gradprobe.activations",
    "Activation": "gradprobe.activations",
    "activation_of": "gradprobe.activations",
    "Finding": "gradprobe.diagnose",
    "Findings": "gradprobe.diagnose",
    "diagnose": "gradprobe.diagnose",
    "GradprobeError": "gradprobe.errors",
    "StopTraining": "gradprobe.errors",
    "Probe": "gradprobe.probe",
    "report": "gradprobe.report",
    "Run": "gradprobe.run",
    "load": "gradprobe.run",
    "STATISTICS": "gradprobe.stats",
    "__version__": "gradprobe._version",
}


def test_every_public_name_resolves_to_its_definition() -> None:
    assert set(gradprobe.__all__) == {*DEFINED_IN, "theory"}
    assert gradprobe.theory is importlib.import_module("gradprobe.theory")
    for name, module in DEFINED_IN.items():
        assert getattr(gradprobe, name) is getattr(importlib.import_module(module), name), name


def test_dir_and_star_import_list_every_public_name() -> None:
    assert set(gradprobe.__all__) <= set(dir(gradprobe))
    namespace: dict = {}
    exec("from gradprobe import *", namespace)
    assert set(gradprobe.__all__) <= set(namespace)
    assert namespace["Probe"] is gradprobe.Probe


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Prob'"):
        gradprobe.Prob  # noqa: B018
    assert not hasattr(gradprobe, "Prob")


@pytest.mark.parametrize("first", ["submodule", "function"])
def test_diagnose_and_report_stay_functions_whatever_is_imported_first(first: str) -> None:
    # `diagnose` and `report` are both submodules and the functions they define. The import
    # system binds a newly loaded submodule on its package; the eager package overrode that,
    # the lazy one must too, in either order.
    result = run_fresh(
        f"""
        import gradprobe, sys
        if {first == "submodule"!r}:
            from gradprobe.report import report as _  # loads gradprobe.diagnose as well
        before = [callable(gradprobe.diagnose), callable(gradprobe.report)]
        import gradprobe.diagnose, gradprobe.report
        from gradprobe import diagnose, report
        result = {{
            "before": before,
            "after": [
                gradprobe.diagnose is sys.modules["gradprobe.diagnose"].diagnose,
                gradprobe.report is sys.modules["gradprobe.report"].report,
                diagnose is gradprobe.diagnose,
                report is gradprobe.report,
            ],
        }}
        """
    )
    assert result == {"before": [True, True], "after": [True, True, True, True]}
