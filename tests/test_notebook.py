"""examples/03_notebook.ipynb runs in a Jupyter kernel of this environment and shows what it says.

The notebook is executed once (nbclient, kernel ``python3``: this environment's ipykernel, see
:func:`executed`) and its outputs are read back: the run and the findings display as HTML,
the findings name the vanishing gradient, figures show inline once each, and the remedy
trains. The committed file carries no outputs (a small diff); that is checked too.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat", reason="the [dev] extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the [dev] extra installs nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "03_notebook.ipynb"
_WHO_RAN = "import sys; print(sys.prefix)"  # appended at run time: which python ran the kernel


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The notebook after execution, with one more cell printing the kernel's sys.prefix.

    ``JUPYTER_DATA_DIR`` points at an empty folder, so a ``python3`` kernelspec installed
    for the user (perhaps another python) cannot stand in: the spec found is this
    environment's own (``share/jupyter/kernels/python3``, or jupyter_client's built-in one),
    which starts ``sys.executable``. ``MPLBACKEND`` is left to the kernel (its inline backend),
    as in Jupyter.
    """
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(_WHO_RAN))
    scratch = tmp_path_factory.mktemp("notebook")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_DATA_DIR", str(scratch / "jupyter-data"))
        env.delenv("JUPYTER_PATH", raising=False)
        env.delenv("MPLBACKEND", raising=False)
        env.setenv("OMP_NUM_THREADS", "1")  # small models: one thread, as the demo runs them
        client = nbclient.NotebookClient(
            notebook,
            kernel_name="python3",
            timeout=300,  # per cell
            resources={"metadata": {"path": str(scratch)}},
        )
        client.execute()  # a cell that raises fails here, with its traceback
    return notebook


def _cell(notebook: Any, source: str) -> Any:
    """The one code cell whose source contains ``source``."""
    cells = [c for c in notebook.cells if c.cell_type == "code" and source in c.source]
    assert len(cells) == 1, f"{len(cells)} cells contain {source!r}"
    return cells[0]


def _stdout(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _data(cell: Any, mime: str) -> list[str]:
    return [o.data[mime] for o in cell.outputs if mime in o.get("data", {})]


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def _accuracy(line: str) -> float:
    return float(line.split("validation accuracy: ")[1].split()[0])


@pytest.mark.slow
def test_the_kernel_is_this_environments_python(executed: Any) -> None:
    assert _stdout(_cell(executed, _WHO_RAN)).strip() == sys.prefix


@pytest.mark.slow
def test_no_cell_printed_an_error_or_a_warning(executed: Any) -> None:
    for cell in executed.cells:
        if cell.cell_type != "code":
            continue
        assert all(o.output_type != "error" for o in cell.outputs)
        stderr = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stderr")
        assert stderr == "", (cell.source, stderr)


@pytest.mark.slow
def test_the_sigmoid_net_does_not_learn(executed: Any) -> None:
    out = _stdout(_cell(executed, "sigmoid_net = mlp("))
    assert _accuracy(_line(out, "validation accuracy")) < 0.2  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_the_run_displays_its_findings_numbers_and_figure(executed: Any) -> None:
    cell = next(c for c in executed.cells if c.cell_type == "code" and c.source.strip() == "run")
    (html,) = _data(cell, "text/html")
    assert "<b>vanishing</b>" in html and "Key numbers" in html
    assert html.count('src="data:image/png;base64,') == 1
    assert "not shown" not in html and "could not show" not in html
    assert "http" not in html and "<script" not in html
    assert len(html) < 150_000


@pytest.mark.slow
def test_the_findings_cell_names_the_vanishing_gradient(executed: Any) -> None:
    cell = _cell(executed, "findings = gradprobe.diagnose(run)")
    kinds = _line(_stdout(cell), "findings: ").removeprefix("findings: ").split(", ")
    assert kinds[0] == "vanishing"
    (html,) = _data(cell, "text/html")
    assert html.count('<tr class="gp-') == len(kinds)
    assert "shrinks" in html and "Batch normalisation" in html


@pytest.mark.slow
@pytest.mark.parametrize("source", ['run.plot("error_heatmap")', 'batchnorm_run.plot("gradient_flow")'])
def test_figures_show_inline_once(executed: Any, source: str) -> None:
    (png,) = _data(_cell(executed, source), "image/png")
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_remedy_is_ranked_and_works(executed: Any) -> None:
    ranked = _stdout(_cell(executed, "vanishing.remedies[:3]")).splitlines()
    assert any(line.endswith(". Batch normalisation") for line in ranked)
    out = _stdout(_cell(executed, "batchnorm_net = mlp("))
    line = _line(out, "validation accuracy")
    with_bn = _accuracy(line)
    without = float(line.split(", ")[1].split()[0])
    assert with_bn > without + 0.5
    after = _line(out, "findings with BatchNorm: ").removeprefix("findings with BatchNorm: ")
    assert "vanishing" not in after.split(", ")


def test_the_committed_notebook_is_valid_and_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert notebook.metadata.kernelspec.name == "python3"
    assert os.path.getsize(NOTEBOOK) < 20_000
