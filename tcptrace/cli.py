"""Command line. Thin: parse, call library code, map typed errors to one line + exit code."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from tcptrace import __version__
from tcptrace.closed_stdout import STDOUT_CLOSED_EXIT, discard_stdout, stdout_closed
from tcptrace.errors import (
    EXIT_CODES,
    INTERNAL_ERROR_EXIT,
    ReportRescued,
    TcptraceError,
    UsageError,
)
from tcptrace.interrupts import EXIT_STATUS, SignalLatch

F = TypeVar("F", bound=Callable[..., Any])


def _fail(exc: TcptraceError) -> NoReturn:
    click.echo(f"tcptrace: error: {exc}", err=True)
    sys.exit(exc.exit_code)


# --- issue 7: one line for every error, never a traceback.
DEBUG_ENV = "TCPTRACE_DEBUG"  # set to 1 to see Python tracebacks of internal errors


def _internal_error(exc: BaseException) -> NoReturn:
    """A bug: one line for the user, the traceback in a private file for the report."""
    text = "".join(traceback.format_exception(exc))
    where = ""
    try:
        fd, name = tempfile.mkstemp(prefix="tcptrace-crash-", suffix=".txt")  # mode 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        where = f"; details in {name}"
    except OSError:
        pass
    first = (str(exc).strip().splitlines() or [""])[0]
    click.echo(
        f"tcptrace: internal error: {type(exc).__name__}: {first}{where}"
        " (please report it; rerun with TCPTRACE_DEBUG=1 to see the traceback)",
        err=True,
    )
    sys.exit(INTERNAL_ERROR_EXIT)


@contextlib.contextmanager
def _quiet_exit_if_stdout_closed() -> Iterator[None]:
    """`tcptrace doctor | head -1`: the reader left. Exit quietly, as a C tool would by
    SIGPIPE, not as an internal error. A trace never gets here: its messages to a
    closed stdout are dropped (tracer.tell) and the report is written."""
    try:
        yield
    except BrokenPipeError:
        if not stdout_closed():
            raise  # another pipe or socket broke: a real error
        discard_stdout()
        sys.exit(STDOUT_CLOSED_EXIT)


class OneLineErrors(click.Group):
    """click's own errors (bad option values, unknown options) as one line on stderr.

    click prints usage, a "Try --help" line and the error on three lines; a
    script reading stderr, and a person, both want the one line that names the
    problem and the fix. Exit codes stay click's (2 for a bad option value).
    """

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        # The console script (tcptrace.entry) installed a latch already; an
        # in-process caller (tests) gets one for the duration of the call.
        owned = SignalLatch.active() is None
        if owned:
            SignalLatch().install()
        try:
            rv = super().main(*args, **kwargs)
        except click.ClickException as exc:
            message = exc.format_message().rstrip(".")
            hint = " (see `tcptrace --help`)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"tcptrace: error: {message[:1].lower()}{message[1:]}{hint}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("tcptrace: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # outside any command (parsing): still one line
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            _internal_error(exc)
        finally:
            latch = SignalLatch.active()
            if owned and latch is not None:
                latch.restore()
        sys.exit(rv if isinstance(rv, int) else 0)

    # click ends a broken pipe in its own output (--help, --version) with exit 1,
    # silently: 1 is our "internal error". Parsing happens in these two.
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _quiet_exit_if_stdout_closed():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _quiet_exit_if_stdout_closed():
            return super().invoke(ctx)


def _release_signals() -> None:
    """For commands other than a trace: default signal handling back, and if a
    SIGINT/SIGTERM came while the command line was parsed, honour it now."""
    latch = SignalLatch.active()
    name = latch.restore() if latch is not None else None
    if name is not None:
        click.echo(f"tcptrace: stopped by {name}", err=True)
        sys.exit(EXIT_STATUS.get(name, 130))


def mapped_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _quiet_exit_if_stdout_closed():
                return func(*args, **kwargs)
        except TcptraceError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            click.echo("tcptrace: interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # OneLineErrors prints these
        except Exception as exc:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            _internal_error(exc)

    return wrapper  # type: ignore[return-value]


def _power_of_two(_ctx: Any, _param: Any, value: int | None) -> int | None:
    if value is not None and (value < 1 or value & (value - 1)):
        raise click.BadParameter(f"{value} is not a power of two (1, 2, 4, ...)")
    return value


_EXIT_CODE_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES
)
# --- end issue 7


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


@click.group(
    cls=OneLineErrors,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_EXIT_CODE_HELP,
)
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
@click.option(
    "--live",
    is_flag=True,
    help="Show a live screen of open sockets per call site;"
    " q or Ctrl-C stops and writes the report.",
)
# Hidden: shrink the kernel maps to provoke and test overload handling (issue 7).
@click.option("--max-sockets", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--max-stacks", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--ringbuf-pages", type=int, default=None, callback=_power_of_two, hidden=True)
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
    live: bool,
    max_sockets: int | None,
    max_stacks: int | None,
    ringbuf_pages: int | None,
) -> None:
    """Find the code that opened TCP sockets a process never closed.

    \b
      sudo tcptrace --pid 1234                 trace until Ctrl-C
      sudo tcptrace --pid 1234 --duration 5m   trace for five minutes
      sudo tcptrace demo                       a bundled leaky program, traced
      sudo tcptrace doctor                     can this machine trace?
    """
    if ctx.invoked_subcommand is not None:
        _release_signals()  # issue 7
        return
    # issue 7: a SIGINT/SIGTERM latched since start, or arriving from now on, is
    # a request to stop and write the report, even while the tracer's imports run.
    latch = SignalLatch.active() or SignalLatch().install()
    try:
        if not pids:
            click.echo(ctx.get_help())
            raise UsageError("give at least one --pid (or a command such as `tcptrace demo`)")
        if live and not sys.stdout.isatty():
            raise UsageError(
                "--live needs a terminal on stdout", "run it in a terminal, or drop --live"
            )
        _trace(
            latch,
            pids=pids,
            threshold=threshold,
            duration=duration,
            output=output,
            force=force,
            probes=probes,
            follow_forks=follow_forks,
            interval=interval,
            kernel_stacks=kernel_stacks,
            live=live,
            limits={
                "max_sockets": max_sockets,
                "max_stacks": max_stacks,
                "ringbuf_pages": ringbuf_pages,
            },
        )
    finally:
        latch.restore()


def _trace(
    latch: SignalLatch,
    *,
    pids: Sequence[int],
    threshold: float,
    duration: float | None,
    output: Path | None,
    force: bool,
    probes: str,
    follow_forks: bool,
    interval: float,
    kernel_stacks: bool,
    live: bool,
    limits: dict[str, int | None],
) -> None:
    import math

    from tcptrace.tracer import StopFlag, TraceOptions, default_output_dir, run_trace

    stop = StopFlag()
    latch.forward_to(stop.set)
    requested = output or default_output_dir()
    view: Any = None
    out: Any = sys.stdout
    if live:
        from tcptrace.live import LiveView

        view = LiveView(stop.set, stop.is_set, "pids " + " ".join(str(p) for p in pids))
        out = view.stdout  # what is said under the live screen is printed after it
    options = TraceOptions(
        pids=tuple(pids),
        output_dir=requested,
        threshold_s=threshold,
        duration_s=duration,
        probes=probes,
        follow_forks=follow_forks,
        # The live screen replaces the periodic summary.
        summary_interval_s=math.inf if live else interval,
        kernel_stacks=kernel_stacks,
        force=force,
        on_tick=view.tick if view is not None else None,
        max_sockets=limits["max_sockets"],
        max_stacks=limits["max_stacks"],
        ringbuf_pages=limits["ringbuf_pages"],
    )
    if view is not None:
        with view:
            result = run_trace(options, out=out, stop=stop)
    else:
        result = run_trace(options, out=out, stop=stop)
    wanted = Path(requested).expanduser().resolve()
    if Path(result.output_dir).resolve() != wanted:
        raise ReportRescued(
            f"the report could not be written to {wanted}; it was written whole to"
            f" {result.output_dir} instead",
            "move it where you need it",
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
