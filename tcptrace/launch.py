"""Start a program whose pid is known before it runs a single instruction of its own.

The child blocks on a pipe between fork and exec; the tracer attaches to its
pid; `release()` lets it exec. The pid survives exec, so every socket the
program opens is born under the probes (used by `tcptrace demo` and the tests).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any

# Runs in the child: wait for the gate byte, then become the program. EOF on
# the gate means the tracer died before attaching: do not run untraced.
_TRAMPOLINE = (
    "import ctypes, os, sys\n"
    # Take the program's name now (PR_SET_NAME), so the tracer shows it from the start.
    "ctypes.CDLL(None).prctl(15, os.path.basename(sys.argv[2]).encode()[:15], 0, 0, 0)\n"
    "fd = int(sys.argv[1])\n"
    "if os.read(fd, 1) != b'x':\n"
    "    os._exit(125)\n"
    "os.close(fd)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class GatedProcess:
    def __init__(self, argv: Sequence[str], **popen_kwargs: Any) -> None:
        # Popen waits for exec to succeed, so the gate cannot sit between fork
        # and exec (preexec_fn would deadlock): a tiny Python trampoline holds it.
        read_fd, self._write_fd = os.pipe()
        try:
            self.proc: subprocess.Popen[str] = subprocess.Popen(
                [sys.executable, "-c", _TRAMPOLINE, str(read_fd), *argv],
                pass_fds=(read_fd,),
                text=True,
                **popen_kwargs,
            )
        finally:
            os.close(read_fd)
        self.pid = self.proc.pid
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            os.write(self._write_fd, b"x")
            os.close(self._write_fd)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL; always reaps the child."""
        if not self._released:
            self.release()
        return terminate(self.proc, timeout)

    def __enter__(self) -> GatedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def terminate(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """Stop a child: SIGTERM, then SIGKILL after `timeout`; reap it; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode
