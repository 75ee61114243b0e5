"""Start a program whose pid is known before it runs a single instruction of its own.

The child blocks on a pipe between fork and exec; the tracer attaches to its
pid; `release()` lets it exec. The pid survives exec, so every socket the
program opens is born under the probes (used by `tcptrace demo` and the tests).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType


class GatedProcess:
    def __init__(self, argv: Sequence[str], **popen_kwargs: object) -> None:
        read_fd, self._write_fd = os.pipe()

        def wait_for_gate() -> None:
            os.close(self._write_fd)
            # EOF means the tracer died before attaching: do not run untraced.
            if os.read(read_fd, 1) != b"x":
                os._exit(125)
            os.close(read_fd)

        self.proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            list(argv),
            preexec_fn=wait_for_gate,
            pass_fds=(read_fd,),
            text=True,
            **popen_kwargs,
        )
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> GatedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
