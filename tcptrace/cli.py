"""Command line. Thin: parse, call library code, map typed errors to one line + exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from tcptrace import __version__
from tcptrace.errors import TcptraceError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(exc: TcptraceError) -> None:
    click.echo(f"tcptrace: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def mapped_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TcptraceError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            click.echo("tcptrace: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _duration(
    name: str, allow_zero: bool = False
) -> Callable[[Any, Any, str | None], float | None]:
    def convert(_ctx: Any, _param: Any, value: str | None) -> float | None:
        if value is None:
            return None
        from tcptrace.durations import parse_duration

        try:
            return parse_duration(value, allow_zero=allow_zero)
        except UsageError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None

    return convert


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pid", "pids", type=int, multiple=True, help="Process to trace (repeatable).")
@click.option(
    "--threshold",
    default="30s",
    callback=_duration("--threshold"),
    help="Flag sockets open at least this long (500ms, 30s, 5m, 1h). Default 30s.",
)
@click.option(
    "--duration",
    default=None,
    callback=_duration("--duration"),
    help="Stop after this long (default: until Ctrl-C or the targets exit).",
)
@click.option(
    "--output",
    "output",
    type=click.Path(path_type=Path),
    default=None,
    help="Report directory (created; default ./tcptrace-report-TIMESTAMP).",
)
@click.option("--force", is_flag=True, help="Write into a non-empty --output directory.")
@click.option(
    "--probes",
    type=click.Choice(["auto", "tracepoint", "kprobe"]),
    default="auto",
    show_default=True,
    help="Probe set; auto picks what the kernel supports.",
)
@click.option("--follow-forks", is_flag=True, help="Also trace children forked after attach.")
@click.option(
    "--interval",
    default="10s",
    callback=_duration("--interval"),
    help="How often to print the summary while tracing. Default 10s.",
)
@click.option("--kernel-stacks", is_flag=True, help="Also capture kernel stacks at birth.")
@click.version_option(__version__, prog_name="tcptrace")
@click.pass_context
@mapped_errors
def main(
    ctx: click.Context,
    pids: tuple[int, ...],
    threshold: float,
    duration: float | None,
    output: Path | None,
    force: bool,
    probes: str,
    follow_forks: bool,
    interval: float,
    kernel_stacks: bool,
) -> None:
    """Find the code that opened TCP sockets a process never closed.

    \b
      sudo tcptrace --pid 1234                 trace until Ctrl-C
      sudo tcptrace --pid 1234 --duration 5m   trace for five minutes
      sudo tcptrace demo                       a bundled leaky program, traced
      sudo tcptrace doctor                     can this machine trace?
    """
    if ctx.invoked_subcommand is not None:
        return
    if not pids:
        click.echo(ctx.get_help())
        raise UsageError("give at least one --pid (or a command such as `tcptrace demo`)")
    from tcptrace.tracer import TraceOptions, default_output_dir, run_trace

    run_trace(
        TraceOptions(
            pids=pids,
            output_dir=output or default_output_dir(),
            threshold_s=threshold,
            duration_s=duration,
            probes=probes,
            follow_forks=follow_forks,
            summary_interval_s=interval,
            kernel_stacks=kernel_stacks,
            force=force,
        ),
        out=sys.stdout,
    )


@main.command()
@mapped_errors
def doctor() -> None:
    """Check whether this machine can trace, and how."""
    from tcptrace.doctor import run_checks

    checks = run_checks()
    for check in checks:
        click.echo(check.line())
    ok = all(c.ok or not c.required for c in checks)
    click.echo("verdict: tracing is possible" if ok else "verdict: tracing is NOT possible here")
    sys.exit(0 if ok else 5)


@main.command()
@click.option("--leak", default=20, show_default=True, help="Connections the client leaks.")
@click.option("--ok", "ok_count", default=30, show_default=True, help="Connections it closes.")
@click.option(
    "--threshold",
    default="2s",
    callback=_duration("--threshold"),
    help="Leak threshold for the demo. Default 2s.",
)
@click.option(
    "--duration",
    default="6s",
    callback=_duration("--duration"),
    help="How long to trace. Default 6s.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Report directory (default ./tcptrace-report-TIMESTAMP).",
)
@click.option("--force", is_flag=True, help="Write into a non-empty --output directory.")
@mapped_errors
def demo(
    leak: int, ok_count: int, threshold: float, duration: float, output: Path | None, force: bool
) -> None:
    """Build and trace a bundled leaky Go client and server, then show the report."""
    from tcptrace.demo import run_demo
    from tcptrace.tracer import default_output_dir

    run_demo(
        leak=leak,
        ok=ok_count,
        threshold_s=threshold,
        duration_s=duration,
        output_dir=output or default_output_dir(),
        force=force,
        out=sys.stdout,
    )


# --- offline analysis (issue 5): `report` and `diff`; the work is in tcptrace.analysis ---


@main.command()
@click.argument("report_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Plain text for people, JSON for machines.",
)
@click.option(
    "--flamegraph",
    type=click.Path(path_type=Path),
    default=None,
    help="Write an interactive HTML flame graph of leaked sockets to FILE,"
    " and its folded stacks next to it (FILE with suffix .folded).",
)
@click.option(
    "--weight",
    type=click.Choice(["count", "socket-seconds"]),
    default="count",
    show_default=True,
    help="Flame graph weight: leaked sockets, or their summed ages.",
)
@click.option(
    "--plots",
    type=click.Path(path_type=Path),
    default=None,
    help="Write PNG plots (open sockets over time, ages, states) into this directory.",
)
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Call sites and endpoints to show (0: all).",
)
@mapped_errors
def report(
    report_dir: Path, fmt: str, flamegraph: Path | None, weight: str, plots: Path | None, top: int
) -> None:
    """Summarize a report directory: the worst call sites, growth, time to RLIMIT_NOFILE."""
    from tcptrace.analysis.cli import run_report

    click.echo(run_report(report_dir, fmt, flamegraph, weight, plots, top), nl=False)


@main.command()
@click.argument("before", type=click.Path(path_type=Path))
@click.argument("after", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Plain text for people, JSON for machines.",
)
@click.option("--top", type=click.IntRange(min=0), default=0, help="Sites to show (0: all).")
@mapped_errors
def diff(before: Path, after: Path, fmt: str, top: int) -> None:
    """Compare two reports per call site (matched by symbol names, not addresses)."""
    from tcptrace.analysis.cli import run_diff

    click.echo(run_diff(before, after, fmt, top), nl=False)


# --- end offline analysis


if __name__ == "__main__":  # pragma: no cover
    main()
