"""The `tcptrace` console script: take SIGINT/SIGTERM/SIGHUP before importing anything heavy.

See tcptrace.interrupts. The import of the CLI happens after the latch is in
place, on purpose (hence the import inside the function).
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    # issue 7: Arrow on glibc's malloc in every part of it (Parquet and CSV writers
    # included), which only this variable reaches, and only before Arrow's first
    # allocation; see tcptrace.history.use_system_allocator. An explicit choice wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    from tcptrace.interrupts import SignalLatch

    SignalLatch().install()
    from tcptrace.cli import main as cli_main

    try:
        cli_main()
    finally:
        _forget_closed_stdout()


def _forget_closed_stdout() -> None:
    """If stdout's reader went away (`| head`, a hung-up terminal), say nothing more.

    Otherwise the interpreter's last flush fails on the way out and turns the
    exit code into 120 after a trace whose report was written fine.
    """
    from tcptrace.closed_stdout import discard_stdout

    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        discard_stdout()


if __name__ == "__main__":  # pragma: no cover
    main()
