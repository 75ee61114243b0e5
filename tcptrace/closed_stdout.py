"""stdout whose reader went away (`tcptrace doctor | head -1`): not a bug, not worth a word.

A C tool writing to a pipe nobody reads dies of SIGPIPE, silently. Python ignores
SIGPIPE, so the write raises BrokenPipeError instead, which would otherwise reach
the CLI as an "internal error". The Python docs' advice (signal module, "Note on
SIGPIPE"): point stdout at /dev/null, so the interpreter's last flush does not
fail again, and exit. Not SIG_DFL for SIGPIPE: that would also kill tcptrace for
a socket or child pipe closed under it.

Stdlib only: tcptrace.entry imports this before anything heavy.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Final

# What a shell reports for a tool SIGPIPE killed; 1, the docs' choice, is our
# "internal error".
STDOUT_CLOSED_EXIT: Final = 128 + signal.SIGPIPE


def stdout_closed() -> bool:
    """True when nobody reads our stdout any more (a pipe or socket whose reader left).

    Asked of the kernel (poll: POLLERR on a pipe without readers, POLLHUP on a
    socket the peer shut), not guessed from an exception: a BrokenPipeError from
    another pipe or socket is a real error and must stay one.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False  # not a real file (e.g. captured by a test)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def discard_stdout() -> None:
    """From now on stdout writes go to /dev/null (data still buffered included)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
