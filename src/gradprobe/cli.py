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
            console.print(f"wrote {plot}", markup=False)


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
        console.print(f"wrote {path}", markup=False)


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
