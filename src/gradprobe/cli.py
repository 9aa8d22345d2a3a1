"""The command line: a thin typer app over the library.

Each command parses its arguments, calls one library function, and prints with
rich. Anything the user can fix raises :class:`GradprobeError`; :func:`main`
turns it into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperCommand

from .cli_args import (
    _removed_on_failure,
    existing_run_dir,
    finite_float,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
)
from .errors import GradprobeError

# Only typer and rich are imported here: `gradprobe --help` must not pay for torch,
# pandas, matplotlib or scipy. Each command imports what it needs when it runs.


class _Command(TyperCommand):
    """A command whose usage line writes required arguments as NAME, not typer's {NAME}."""

    def collect_usage_pieces(self, ctx) -> list[str]:  # type: ignore[no-untyped-def]
        pieces = super().collect_usage_pieces(ctx)
        return [piece.replace("{", "").replace("}", "") for piece in pieces]


app = typer.Typer(
    name="gradprobe",
    help="See, measure and fix vanishing and exploding gradients in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


# ---------------------------------------------------------------- validation
# Every path and number option of every command goes through one of these before any
# work starts or any file is written: a command stopped by bad input leaves nothing
# behind. Each raises GradprobeError (what is wrong: what to do); main() prints it as
# one line and exits 2. Numbers arrive as text so that "two", "-1" and "nan" all get
# the same kind of message, naming the option.


@app.callback()
def _root() -> None:
    """gradprobe: per-layer gradient diagnostics for PyTorch."""


@app.command("theory", cls=_Command)
def theory_command(
    topic: str | None = typer.Argument(
        None, metavar="[TOPIC]", help="meanfield (default) | residual | width | isometry | gated"
    ),
    activation: str | None = typer.Option(
        None, "--activation", "-a", metavar="NAME", help="a registered activation"
    ),
    weight_var: str | None = typer.Option(
        None, "--weight-var", metavar="FLOAT", help="σ_w² = fan_in·Var(W), ≥ 0"
    ),
    bias_var: str = typer.Option("0", "--bias-var", metavar="FLOAT", help="σ_b² = Var(b), ≥ 0"),
    depth: str | None = typer.Option(
        None, "--depth", metavar="N", help="hidden layers (residual: blocks)"
    ),
    alpha: str | None = typer.Option(
        None, "--alpha", metavar="FLOAT", help="residual: branch scale α (default: 1 and 1/√L)"
    ),
    gain: str | None = typer.Option(
        None, "--gain", metavar="FLOAT", help="residual: branch gain g (default 1)"
    ),
    width: str | None = typer.Option(None, "--width", metavar="N", help="width: layer width n"),
    init: str | None = typer.Option(
        None, "--init", metavar="KIND", help="isometry: gaussian | orthogonal (default both)"
    ),
    forget_bias: str | None = typer.Option(
        None, "--forget-bias", metavar="FLOAT", help="gated: forget-gate bias b_f"
    ),
    as_json: bool = typer.Option(False, "--json", help="JSON; non-finite values as null"),
    plot: str | None = typer.Option(
        None, "--plot", metavar="FILE", help="PNG: predicted error norm per layer"
    ),
) -> None:
    """Theory at init: mean-field numbers for an activation and init (q*, χ₁, depth scale,
    critical σ_w²), or a TOPIC: residual (1 + α²g)^L, width (1 + 5/n)^L, isometry (the
    Jacobian's spread), gated (memory of a forget-gate bias)."""
    import json

    topics = ("meanfield", "residual", "width", "isometry", "gated")
    if topic is not None and topic not in topics:
        raise GradprobeError(f"unknown theory topic {topic!r}", f"use one of: {', '.join(topics)}")
    sigma_b2 = finite_float(
        bias_var, "--bias-var", what="the bias variance σ_b²", minimum=0.0, example="0"
    )
    n_layers = positive_int(depth, "--depth", example=20) if depth is not None else None
    if topic not in (None, "meanfield"):
        if plot is not None:
            raise GradprobeError(
                f"`theory {topic}` has no plot", "--plot is for the mean-field form"
            )

        from .theory.topics import compute_topic, render_topic

        numbers = compute_topic(
            topic,
            activation=activation,
            weight_var=None
            if weight_var is None
            else finite_float(weight_var, "--weight-var", what="σ_w²", minimum=0.0, example="1"),
            bias_var=sigma_b2,
            depth=n_layers,
            alpha=None if alpha is None else finite_float(alpha, "--alpha", example="0.25"),
            gain=None if gain is None else finite_float(gain, "--gain", minimum=0.0, example="1"),
            width=None if width is None else positive_int(width, "--width", example=64),
            init=init,
            forget_bias=None
            if forget_bias is None
            else finite_float(forget_bias, "--forget-bias", example="1.0"),
        )
        if as_json:
            typer.echo(json.dumps(numbers))
        else:
            console.print(render_topic(numbers))
        return
    if activation is None:
        raise GradprobeError("missing option '--activation'", "e.g. --activation tanh")
    if weight_var is None:
        raise GradprobeError("missing option '--weight-var'", "e.g. --weight-var 2")
    sigma_w2 = finite_float(
        weight_var, "--weight-var", what="the weight variance σ_w²", minimum=0.0, example="2"
    )
    plot_path = output_file(plot, "--plot", example="plot.png") if plot is not None else None

    from . import theory

    result = theory.summary(activation, sigma_w2, sigma_b2, n_layers)
    if plot_path is not None:
        with _removed_on_failure(plot_path):
            plot_path.parent.mkdir(parents=True, exist_ok=True)  # validated as creatable
            theory.plot_error_profiles(
                activation,
                str(plot_path),
                bias_var=sigma_b2,
                depth=n_layers or 30,
                weight_var=sigma_w2,
            )
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        console.print(theory.render_summary(result))
        if plot_path is not None:
            console.print(f"wrote {plot_path}", markup=False, soft_wrap=True)


@app.command("explain", cls=_Command)
def explain_command(
    topic: str = typer.Argument(
        ...,
        metavar="TOPIC",
        help="backprop | standardize | channels | activations | residual | isometry",
    ),
    plot: str | None = typer.Option(
        None, "--plot", metavar="FILE", help="activations: PNG of f and f'"
    ),
    out: str | None = typer.Option(
        None, "--out", metavar="DIR", help="activations: folder for activations.png"
    ),
) -> None:
    """Worked examples of docs/concepts.md, computed live and checked against autograd.

    backprop: back-propagation as Hadamard products (docs/concepts.md §1).
    standardize: standardising inputs (docs/concepts.md §5).
    channels: tensor shapes and channels (docs/concepts.md §6).
    activations: the activation cheat-sheet (docs/concepts.md §7).
    residual: a residual net's signal for α = 1 and 1/√L, by hand, against theory.
    isometry: deep Jacobians, Gaussian vs orthogonal weights, against theory.
    """
    plot_path = output_file(plot, "--plot", example="plot.png") if plot is not None else None
    out_dir = output_dir(out, "--out") if out is not None else None

    from . import explain

    result = explain.compute(topic)
    written = plot_path or out_dir
    with _removed_on_failure(written) if written else contextlib.nullcontext():
        path = explain.write_figure(topic, plot_path, out_dir)
    for item in explain.render(topic, result):
        console.print(item)
    if path is not None:
        console.print(f"wrote {path}", markup=False, soft_wrap=True)


lab_app = typer.Typer(
    help="The lab: every remedy demonstrated and measured, reproducibly.", no_args_is_help=True
)
app.add_typer(lab_app, name="lab")


@lab_app.command("list", cls=_Command)
def lab_list_command() -> None:
    """List the lab's experiments: name, question, source."""
    from rich.table import Table

    from .lab import EXPERIMENTS

    table = Table("name", "question", "source", show_lines=True)
    for e in EXPERIMENTS.values():
        table.add_row(e.name, e.question, e.source)
    console.print(table)


@lab_app.command("run", cls=_Command)
def lab_run_command(
    name: str = typer.Argument(
        ..., metavar="NAME", help="an experiment from 'gradprobe lab list', or 'all'"
    ),
    quick: bool = typer.Option(False, "--quick", help="small grids: every experiment in minutes"),
    seeds: str | None = typer.Option(
        None, "--seeds", metavar="N", help="seeds per configuration (default: per experiment)"
    ),
    out: str = typer.Option(
        "lab-results", "--out", metavar="DIR", help="folder for results, figures and the report"
    ),
    workers: str | None = typer.Option(
        None, "--workers", metavar="N", help="worker processes (default min(2, CPUs))"
    ),
) -> None:
    """Run one experiment (or all): results.csv/json, figures and lab_report.html under --out."""
    n_seeds = positive_int(seeds, "--seeds") if seeds is not None else None
    n_workers = positive_int(workers, "--workers") if workers is not None else None
    out_dir = output_dir(out, "--out")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .lab import EXPERIMENTS
    from .lab.runner import get_experiment, run_experiments

    names = list(EXPERIMENTS) if name == "all" else [get_experiment(name).name]
    mode = "quick" if quick else "full"
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # A failed or interrupted lab run keeps what it wrote: finished experiments are
    # worth keeping, unlike the demo's half-written folder.
    with Progress(*columns, console=err_console, transient=False) as progress:
        outcomes = run_experiments(
            names, mode=mode, seeds=n_seeds, out=out_dir, workers=n_workers, progress=progress
        )
    for o in outcomes:
        mark = "agrees" if o.verdict.agrees_with_source else "disagrees"
        console.print(
            f"{o.experiment.name}: {mark} with {o.experiment.source} "
            f"({o.verdict.seeds_agree}/{o.verdict.seeds_total} seeds, {o.seconds:.1f} s)",
            markup=False,
        )
        console.print("  " + o.verdict.text.splitlines()[0], markup=False)
    console.print(f"wrote {out_dir / 'lab_report.html'}", markup=False, soft_wrap=True)


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


def _nonempty_run(path: Path):  # type: ignore[no-untyped-def]
    from .run import load

    run = load(path)
    if run.empty:
        raise GradprobeError(
            f"the run {str(path)!r} has no recorded steps",
            "train at least one step under the Probe",
        )
    return run


@app.command("diagnose", cls=_Command)
def diagnose_command(
    run: str = typer.Argument(
        ..., metavar="RUN", help="a run directory written by Probe(store=...)"
    ),
    as_json: bool = typer.Option(
        False, "--json", help="print the findings as JSON (see FINDINGS_JSON_SCHEMA)"
    ),
) -> None:
    """Diagnose a recorded run: findings with their numbers and ranked remedies."""
    run_dir = existing_run_dir(run)

    from rich.table import Table

    from .diagnose import diagnose, no_findings_note

    findings = diagnose(_nonempty_run(run_dir))
    if as_json:
        print(findings.to_json())
        return
    if not findings:
        # The note says what was checked (and skipped), so it replaces the lines below.
        console.print(f"{findings.run_name}: {no_findings_note(findings)}", markup=False)
        return
    from .story import story_lines

    # The story first: the root cause, the one action to take, what follows from it.
    for line in story_lines(findings):
        console.print(line, markup=False, soft_wrap=True)
    console.print("")
    table = Table(
        "severity",
        "finding",
        "explained by",
        "what was measured",
        "remedies, best first",
        show_lines=True,
    )
    for f in findings:
        fixes = "\n".join(f"{i}. {r.name}" for i, r in enumerate(f.remedies[:3], start=1))
        table.add_row(f.severity, f.kind, f.cause or "(root)", f.summary, fixes)
    console.print(table)
    for kind, why in findings.skipped.items():
        console.print(f"skipped {kind}: {why}", markup=False)


@app.command("report", cls=_Command)
def report_command(
    runs: list[str] = typer.Argument(  # noqa: B008 (typer reads the default)
        ..., metavar="RUN", help="one or more run directories (several: side by side)"
    ),
    output: str = typer.Option(
        "report.html", "-o", "--output", metavar="FILE", help="the HTML file to write"
    ),
) -> None:
    """Write one self-contained HTML report of one run, or several compared side by side."""
    run_dirs = [existing_run_dir(r) for r in runs]
    target = output_file(output, "--output", example="report.html")

    from .plots import PLOTS
    from .report import report

    loaded = [_nonempty_run(r) for r in run_dirs]
    with _removed_on_failure(target), _progress_bar() as bar:
        task = bar.add_task("report", total=len(PLOTS) + 2)
        path = report(
            loaded, target, progress=lambda what: bar.update(task, advance=1, description=what)
        )
    console.print(f"wrote {path}", markup=False, soft_wrap=True)


# torch.manual_seed and NumPy's legacy seeding both take 32-bit seeds without surprise.
_MAX_SEED = 2**32 - 1


@app.command("demo", cls=_Command)
def demo_command(
    out: str = typer.Option(
        "runs/demo", "--out", metavar="DIR", help="folder for the runs, table and report.html"
    ),
    seed: str = typer.Option(
        "0", "--seed", metavar="N", help="seed of data split, initialisation and batches (≥ 0)"
    ),
) -> None:
    """Train a 20-layer sigmoid MLP on digits, diagnose it, train the proposed remedies, compare."""
    out_dir = output_dir(out, "--out")
    seed_value = non_negative_int(seed, "--seed", maximum=_MAX_SEED)

    from rich.table import Table

    from .demo import DemoConfig, run_demo

    with _removed_on_failure(out_dir), _progress_bar() as bar:
        task = bar.add_task("demo", total=5)

        def tick(what: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=what)

        result = run_demo(out_dir, DemoConfig(seed=seed_value), progress=tick)
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
        "final train loss",
        "error ratio first/last",
        "max dead frac",
        "findings",
        title="before / after (same data, seed, optimizer, steps)",
    )
    for row in result.table.itertuples():
        table.add_row(
            row.model,
            f"{row.val_acc:.3f}",
            f"{row.final_train_loss:.3g}",
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


@export_app.command("tensorboard", cls=_Command)
def export_tensorboard_command(
    run: str = typer.Argument(
        ..., metavar="RUN", help="a run directory written by Probe(store=...)"
    ),
    logdir: str = typer.Option(
        ..., "--logdir", metavar="DIR", help="TensorBoard log directory to write"
    ),
    every_stat: bool = typer.Option(
        False,
        "--all",
        help="every statistic, not only the default set (error/gradient norms, update "
        "ratios, global norms before/after clipping, loss, lr)",
    ),
) -> None:
    """Scalars (stat/name), activation histograms and the diagnosis as TensorBoard event files."""
    run_dir = existing_run_dir(run)
    log_dir = output_dir(logdir, "--logdir")
    try:
        from .integrations.tensorboard import export
    except ImportError as exc:
        raise GradprobeError(
            f"TensorBoard export needs the tensorboard package ({exc.name} is missing)",
            "pip install 'gradprobe[tensorboard]'",
        ) from None
    from .run import load

    recorded = load(run_dir)
    with _removed_on_failure(log_dir):
        path = export(recorded, log_dir, stats="all" if every_stat else "default")
    console.print(
        f"wrote {path} (open with: tensorboard --logdir {path})", markup=False, soft_wrap=True
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradprobe`` command; returns the exit code."""
    try:
        app(args=argv, standalone_mode=False, prog_name="gradprobe")
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
