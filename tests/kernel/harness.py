"""Trace real workloads with the real tracer, from a test.

`Traced` starts the tracer in a thread on gated processes (their pids are known
before they run), releases them once the probes are attached, lets the test
drive them, then stops the trace and loads the report it wrote.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tcptrace.launch import GatedProcess
from tcptrace.tracer import StopFlag, TraceOptions, TraceResult, run_trace


class LineLog:
    """Every stdout line of a process, read by one thread; wait for `TAG {json}` lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self._lines: list[str] = []
        self._taken: set[int] = set()
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait(self, tag: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, line in enumerate(self._lines):
                    if i not in self._taken and line.startswith(tag + " "):
                        self._taken.add(i)
                        value = json.loads(line[len(tag) + 1 :])
                        assert isinstance(value, dict)
                        return value
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(
                        f"no {tag!r} line from pid {self._proc.pid} within {timeout}s "
                        f"(exit code {self._proc.poll()}); got {self._lines!r}"
                    )
                self._cond.wait(left)


@dataclass
class Traced:
    """Context manager: gated workloads traced from birth."""

    argvs: Sequence[Sequence[str]]
    output_dir: Path
    threshold_s: float = 1.0
    extra_pids: tuple[int, ...] = ()
    follow_forks: bool = False
    kernel_stacks: bool = False
    procs: list[GatedProcess] = field(default_factory=list)
    logs: list[LineLog] = field(default_factory=list)
    result: TraceResult | None = None
    log: io.StringIO = field(default_factory=io.StringIO)
    _stop: StopFlag = field(default_factory=StopFlag)
    _attached: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def __enter__(self) -> Traced:
        try:
            for argv in self.argvs:
                proc = GatedProcess(argv, stdout=subprocess.PIPE)
                self.procs.append(proc)
                self.logs.append(LineLog(proc.proc))
            options = TraceOptions(
                pids=tuple(p.pid for p in self.procs) + self.extra_pids,
                output_dir=self.output_dir,
                threshold_s=self.threshold_s,
                summary_interval_s=3600,
                poll_interval_s=0.05,
                scan_interval_s=0.5,
                follow_forks=self.follow_forks,
                kernel_stacks=self.kernel_stacks,
                # scripts/vm-test runs the same tests under each probe set.
                probes=os.environ.get("TCPTRACE_PROBES", "auto"),
                on_attached=self._attached.set,
            )
            self._thread = threading.Thread(target=self._run, args=(options,), daemon=True)
            self._thread.start()
            if not self._attached.wait(60):
                raise AssertionError(
                    f"tracer did not attach: {self._error!r}\n{self.log.getvalue()}"
                )
        except BaseException:
            self._cleanup()
            raise
        return self

    def _run(self, options: TraceOptions) -> None:
        try:
            self.result = run_trace(options, out=self.log, stop=self._stop)
        except BaseException as exc:  # surfaced in stop()
            self._error = exc
            self._attached.set()

    def release(self, index: int) -> GatedProcess:
        self.procs[index].release()
        return self.procs[index]

    def wait_line(self, index: int, tag: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for `TAG {json}` from workload `index` (each line is returned once)."""
        return self.logs[index].wait(tag, timeout)

    def stop(self, timeout: float = 60.0) -> TraceResult:
        """End the trace (the workloads keep running) and return its result."""
        time.sleep(0.3)  # let the last records reach the ring buffer
        self._stop.set("test finished")
        assert self._thread is not None
        self._thread.join(timeout)
        if self._error is not None:
            raise AssertionError(f"tracer failed: {self._error!r}\n{self.log.getvalue()}")
        assert self.result is not None, self.log.getvalue()
        return self.result

    def wait_for_stop(self, timeout: float) -> TraceResult:
        """Wait for the tracer to stop by itself (e.g. every target exited)."""
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("tracer did not stop by itself\n" + self.log.getvalue())
        if self._error is not None:
            raise AssertionError(f"tracer failed: {self._error!r}\n{self.log.getvalue()}")
        assert self.result is not None
        return self.result

    def _cleanup(self) -> None:
        self._stop.set("test cleanup")
        if self._thread is not None:
            self._thread.join(60)
        for proc in self.procs:
            proc.stop()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup()
