"""The command line: a thin typer app over the library.

Each command parses its arguments, calls one library function, and prints with
rich. Anything the user can fix raises :class:`GradprobeError`; :func:`main`
turns it into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from .errors import GradprobeError

app = typer.Typer(
    name="gradprobe",
    help="See, measure and fix vanishing and exploding gradients in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """gradprobe: per-layer gradient diagnostics for PyTorch."""


@app.command("theory")
def theory_command(
    activation: str = typer.Option(..., "--activation", "-a", help="a registered activation"),
    weight_var: float = typer.Option(..., "--weight-var", help="σ_w² = fan_in·Var(W)"),
    bias_var: float = typer.Option(0.0, "--bias-var", help="σ_b² = Var(b)"),
    depth: int | None = typer.Option(None, "--depth", help="hidden layers: predict first/last"),
    as_json: bool = typer.Option(False, "--json", help="JSON; non-finite values as null"),
    plot: str | None = typer.Option(None, "--plot", help="PNG: predicted error norm per layer"),
) -> None:
    """Mean-field predictions (q*, χ₁, depth scale, critical σ_w²) for an activation and init."""
    import json

    from . import theory

    result = theory.summary(activation, weight_var, bias_var, depth)
    if plot is not None:
        theory.plot_error_profiles(
            activation, plot, bias_var=bias_var, depth=depth or 30, weight_var=weight_var
        )
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        console.print(theory.render_summary(result))
        if plot is not None:
            console.print(f"wrote {plot}", markup=False, soft_wrap=True)


@app.command("explain")
def explain_command(
    topic: str = typer.Argument(..., help="backprop | standardize | channels | activations"),
    plot: str | None = typer.Option(None, "--plot", help="activations: PNG of f and f'"),
    out: str | None = typer.Option(None, "--out", help="activations: folder for the PNG"),
) -> None:
    """Worked examples of concepts.md, computed live and checked against autograd."""
    from . import explain

    result = explain.compute(topic)
    path = explain.write_figure(topic, plot, out)
    for item in explain.render(topic, result):
        console.print(item)
    if path is not None:
        console.print(f"wrote {path}", markup=False, soft_wrap=True)


lab_app = typer.Typer(
    help="The lab: every remedy demonstrated and measured, reproducibly.", no_args_is_help=True
)
app.add_typer(lab_app, name="lab")


def _whole_number(text: str | None, option: str) -> int | None:
    """Parse a count given on the command line; anything but a whole number ≥ 1 is an error."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise GradprobeError(
            f"{option} must be a whole number ≥ 1, got {text!r}", f"e.g. {option} 2"
        ) from None
    if value < 1:
        raise GradprobeError(
            f"{option} must be a whole number ≥ 1, got {value}", f"e.g. {option} 2"
        )
    return value


@lab_app.command("list")
def lab_list_command() -> None:
    """List the lab's experiments: name, question, source."""
    from rich.table import Table

    from .lab import EXPERIMENTS

    table = Table("name", "question", "source", show_lines=True)
    for e in EXPERIMENTS.values():
        table.add_row(e.name, e.question, e.source)
    console.print(table)


@lab_app.command("run")
def lab_run_command(
    name: str = typer.Argument(..., help="an experiment from 'gradprobe lab list', or 'all'"),
    quick: bool = typer.Option(False, "--quick", help="small grids: every experiment in minutes"),
    seeds: str | None = typer.Option(
        None, "--seeds", help="seeds per configuration (default: per experiment)"
    ),
    out: str = typer.Option(
        "lab-results", "--out", help="folder for results, figures and the report"
    ),
    workers: str | None = typer.Option(
        None, "--workers", help="worker processes (default min(2, CPUs))"
    ),
) -> None:
    """Run one experiment (or all): results.csv/json, figures and lab_report.html under --out."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .lab import EXPERIMENTS
    from .lab.runner import get_experiment, run_experiments

    names = list(EXPERIMENTS) if name == "all" else [get_experiment(name).name]
    n_seeds = _whole_number(seeds, "--seeds")
    n_workers = _whole_number(workers, "--workers")
    mode = "quick" if quick else "full"
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as progress:
        outcomes = run_experiments(
            names, mode=mode, seeds=n_seeds, out=out, workers=n_workers, progress=progress
        )
    for o in outcomes:
        mark = "agrees" if o.verdict.agrees_with_source else "disagrees"
        console.print(
            f"{o.experiment.name}: {mark} with {o.experiment.source} "
            f"({o.verdict.seeds_agree}/{o.verdict.seeds_total} seeds, {o.seconds:.1f} s)",
            markup=False,
        )
        console.print("  " + o.verdict.text.splitlines()[0], markup=False)
    console.print(f"wrote {out}/lab_report.html", markup=False, soft_wrap=True)


# ---- diagnose, report, demo (issue 4) ----
def _progress_bar():  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def _nonempty_run(path: str):  # type: ignore[no-untyped-def]
    from .run import load

    run = load(path)
    if run.empty:
        raise GradprobeError(
            f"the run {path!r} has no recorded steps", "train at least one step under the Probe"
        )
    return run


@app.command("diagnose")
def diagnose_command(
    run: str = typer.Argument(..., help="a run directory written by Probe(store=...)"),
    as_json: bool = typer.Option(
        False, "--json", help="print the findings as JSON (see FINDINGS_JSON_SCHEMA)"
    ),
) -> None:
    """Diagnose a recorded run: findings with their numbers and ranked remedies."""
    from rich.table import Table

    from .diagnose import diagnose

    findings = diagnose(_nonempty_run(run))
    if as_json:
        print(findings.to_json())
        return
    if not findings:
        console.print(f"{findings.run_name}: no problems found", markup=False)
    table = Table(
        "severity", "finding", "what was measured", "remedies, best first", show_lines=True
    )
    for f in findings:
        fixes = "\n".join(f"{i}. {r.name}" for i, r in enumerate(f.remedies[:3], start=1))
        table.add_row(f.severity, f.kind, f.summary, fixes)
    if findings:
        console.print(table)
    for kind, why in findings.skipped.items():
        console.print(f"skipped {kind}: {why}", markup=False)


@app.command("report")
def report_command(
    runs: list[str] = typer.Argument(  # noqa: B008 (typer reads the default)
        ..., help="one or more run directories (several: side by side)"
    ),
    output: str = typer.Option("report.html", "-o", "--output", help="the HTML file to write"),
) -> None:
    """Write one self-contained HTML report of one run, or several compared side by side."""
    from .plots import PLOTS
    from .report import report

    loaded = [_nonempty_run(r) for r in runs]
    with _progress_bar() as bar:
        task = bar.add_task("report", total=len(PLOTS) + 2)
        path = report(
            loaded, output, progress=lambda what: bar.update(task, advance=1, description=what)
        )
    console.print(f"wrote {path}", markup=False, soft_wrap=True)


@app.command("demo")
def demo_command(
    out: str = typer.Option(
        "runs/demo", "--out", help="folder for the runs, table and report.html"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of data split, initialisation and batches"),
) -> None:
    """Train a 20-layer sigmoid MLP on digits, diagnose it, train the proposed remedies, compare."""
    from rich.table import Table

    from .demo import DemoConfig, run_demo

    with _progress_bar() as bar:
        task = bar.add_task("demo", total=5)

        def tick(what: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=what)

        result = run_demo(out, DemoConfig(seed=seed), progress=tick)
    base = result.findings
    vanishing = base.of("vanishing")
    console.print(f"baseline findings: {', '.join(base.kinds) or 'none'}", markup=False)
    if vanishing is not None:
        console.print("vanishing: " + vanishing.summary, markup=False)
    console.print(
        "remedies trained (from the diagnosis's ranking): "
        + ", ".join(r.name for r in result.chosen),
        markup=False,
    )
    table = Table(
        "model",
        "val. accuracy",
        "error ratio first/last",
        "max dead frac",
        "findings",
        title="before / after (same data, seed, optimizer, steps)",
    )
    for row in result.table.itertuples():
        table.add_row(
            row.model,
            f"{row.val_acc:.3f}",
            f"{row.error_ratio_first_last:.2g}",
            f"{row.max_dead_frac:.2f}",
            row.findings,
        )
    console.print(table)
    console.print(
        f"wrote {result.report} and {result.report.with_name('table.csv')} ({result.seconds:.0f} s)",
        markup=False,
        soft_wrap=True,
    )


export_app = typer.Typer(help="Export a recorded run to other tools.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("tensorboard")
def export_tensorboard_command(
    run: str = typer.Argument(..., help="a run directory written by Probe(store=...)"),
    logdir: str = typer.Option(..., "--logdir", help="TensorBoard log directory to write"),
) -> None:
    """Scalars (stat/name) and activation histograms as TensorBoard event files."""
    from .run import load

    recorded = load(run)
    try:
        from .integrations.tensorboard import export
    except ImportError as exc:
        raise GradprobeError(
            f"TensorBoard export needs the tensorboard package ({exc.name} is missing)",
            "pip install 'gradprobe[tensorboard]'",
        ) from None
    path = export(recorded, logdir)
    console.print(
        f"wrote {path} (open with: tensorboard --logdir {path})", markup=False, soft_wrap=True
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradprobe`` command; returns the exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except GradprobeError as exc:
        err_console.print(exc.one_line(), markup=False, highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        err_console.print("error: aborted", markup=False)
        return 1
    except KeyboardInterrupt:
        err_console.print("error: interrupted", markup=False)
        return 130
    except Exception as exc:
        # Typer vendors click, so its usage errors are matched by shape, not by import.
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 0  # the help text was already printed
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            err_console.print(f"error: {exc.format_message()}", markup=False, soft_wrap=True)
            return int(exc.exit_code or 2)
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
