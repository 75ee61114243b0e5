"""Build and run the workload programs that tcptrace's kernel tests and `tcptrace demo` trace.

The sources ship inside this package (``*.go``, ``*.c``, ``go.mod``). `build` compiles one
program into a cache directory keyed by a hash of its sources and build flags and returns the
binary; `start` builds, launches it, and waits for its ``READY {json}`` line.

C programs are built with ``-O1 -g -fno-omit-frame-pointer -pthread`` and Go with a plain
``go build`` (frame pointers are on by default on amd64; no ``-ldflags "-s -w"``), so symbols
and DWARF stay and user stacks can be walked by frame pointer. The sources are copied next to
the binary and kept there, so the DWARF file paths stay valid for symbolizers.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.resources
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tcptrace.errors import TcptraceError
from tcptrace.launch import terminate

__all__ = [
    "C_FLAGS",
    "PROGRAMS",
    "RunningWorkload",
    "WorkloadBuildError",
    "WorkloadStartError",
    "build",
    "cache_root",
    "start",
]

C_FLAGS: tuple[str, ...] = ("-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-Wall")
# -buildvcs=false: the cache may sit inside a git checkout; stamping VCS info would need git.
GO_BUILD_FLAGS: tuple[str, ...] = ("-buildvcs=false",)
BUILD_TIMEOUT_S = 600.0
_KEY_VERSION = "tcptrace-workloads-1"
_PACKAGE = "tcptrace.workloads"


@dataclass(frozen=True)
class _Program:
    lang: str  # "c" or "go"
    sources: tuple[str, ...]  # files copied into the build directory; the first is the main one


PROGRAMS: dict[str, _Program] = {
    "leakydemo": _Program("go", ("leakydemo.go", "go.mod")),
    "accept_server": _Program("c", ("accept_server.c", "wlcommon.c")),
    "dialer": _Program("c", ("dialer.c", "wlcommon.c")),
    "failconnect": _Program("c", ("failconnect.c", "wlcommon.c")),
    "churn": _Program("c", ("churn.c", "wlcommon.c")),
    "busy": _Program("c", ("busy.c", "wlcommon.c")),
}


class WorkloadBuildError(TcptraceError):
    """A workload could not be compiled (unknown name, missing compiler, compiler error)."""

    def __init__(self, message: str, hint: str = "", stderr: str = "") -> None:
        super().__init__(message, hint)
        self.stderr = stderr


class WorkloadStartError(TcptraceError):
    """A workload exited, or printed no READY line in time, after it was started."""

    def __init__(
        self, message: str, hint: str = "", stderr: str = "", pid: int | None = None
    ) -> None:
        super().__init__(message, hint)
        self.stderr = stderr
        self.pid = pid


def cache_root() -> Path:
    """Where builds go: ``$TCPTRACE_CACHE/workloads``, else ``~/.cache/tcptrace/workloads``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when it is set.
    """
    env = os.environ.get("TCPTRACE_CACHE")
    if env:
        return Path(env) / "workloads"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "tcptrace" / "workloads"


def _program(name: str) -> _Program:
    try:
        return PROGRAMS[name]
    except KeyError:
        raise WorkloadBuildError(
            f"unknown workload {name!r}", hint="one of: " + ", ".join(sorted(PROGRAMS))
        ) from None


def _read_sources(prog: _Program) -> dict[str, bytes]:
    pkg = importlib.resources.files(_PACKAGE)
    out: dict[str, bytes] = {}
    for fname in prog.sources:
        try:
            out[fname] = pkg.joinpath(fname).read_bytes()
        except OSError as e:
            raise WorkloadBuildError(
                f"workload source {fname} is missing from the {_PACKAGE} package: {e}",
                hint="reinstall tcptrace",
            ) from e
    return out


def _find_c_compiler() -> list[str]:
    cc = os.environ.get("CC", "").strip()
    if cc:
        argv = shlex.split(cc)
        if shutil.which(argv[0]):
            return argv
        raise WorkloadBuildError(
            f"C compiler {argv[0]!r} (from $CC) not found",
            hint="fix $CC or unset it to use gcc",
        )
    for candidate in ("gcc", "cc"):
        path = shutil.which(candidate)
        if path:
            return [path]
    raise WorkloadBuildError(
        "no C compiler found (looked for $CC, gcc, cc on $PATH)",
        hint="install gcc, e.g. apt-get install gcc",
    )


def _find_go() -> str:
    path = shutil.which("go")
    if path:
        return path
    candidates = ["/usr/local/go/bin/go", "/usr/lib/go/bin/go"]
    candidates += sorted(glob.glob("/usr/lib/go-*/bin/go"), reverse=True)
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    raise WorkloadBuildError(
        "the Go toolchain (go) was not found on $PATH or in /usr/local/go, /usr/lib/go*",
        hint="install Go >= 1.19, e.g. apt-get install golang-go",
    )


def _key(name: str, prog: _Program, sources: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    parts: list[bytes] = [_KEY_VERSION.encode(), name.encode(), prog.lang.encode()]
    parts += [" ".join(C_FLAGS if prog.lang == "c" else GO_BUILD_FLAGS).encode()]
    for fname in sorted(sources):
        parts += [fname.encode(), sources[fname]]
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _is_fresh(binary: Path, stamp: Path, key: str) -> bool:
    try:
        return (
            stamp.read_text(encoding="ascii").strip() == key
            and binary.is_file()
            and os.access(binary, os.X_OK)
        )
    except OSError:
        return False


def _write_if_changed(path: Path, data: bytes) -> None:
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _go_env(go_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GOFLAGS": "-mod=mod",  # no vendoring; there are no dependencies anyway
            "GOPROXY": "off",  # standard library only: never touch the network
            "GO111MODULE": "on",
            "GOWORK": "off",
            "GOENV": "off",  # ignore `go env -w` settings (e.g. GOFLAGS=-ldflags=-s)
            "GOTOOLCHAIN": "local",  # newer go: never download another toolchain
            "CGO_ENABLED": "0",  # pure-Go static binary, no libc frames in stacks
        }
    )
    env.setdefault("GOCACHE", str(go_cache))
    if "HOME" not in env and "GOPATH" not in env:
        env["GOPATH"] = str(go_cache.parent / "gopath")
    return env


def _compile(name: str, prog: _Program, src_dir: Path, out: Path) -> None:
    if prog.lang == "c":
        argv = [*_find_c_compiler(), *C_FLAGS, "-o", str(out), str(src_dir / prog.sources[0])]
        env = None
    else:
        argv = [_find_go(), "build", *GO_BUILD_FLAGS, "-o", str(out), "."]
        env = _go_env(cache_root() / "go-build")
    try:
        res = subprocess.run(
            argv,
            cwd=src_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise WorkloadBuildError(
            f"building workload {name!r} timed out after {BUILD_TIMEOUT_S:.0f}s: "
            + shlex.join(argv)
        ) from e
    except OSError as e:
        raise WorkloadBuildError(
            f"cannot run the compiler for workload {name!r}: {e}",
            hint="install gcc" if prog.lang == "c" else "install Go >= 1.19",
        ) from e
    if res.returncode != 0 or not out.is_file():
        stderr = (res.stderr or "").strip() or (res.stdout or "").strip()
        raise WorkloadBuildError(
            f"building workload {name!r} failed (exit {res.returncode}): {shlex.join(argv)}\n"
            + stderr,
            stderr=stderr,
        )


def build(name: str, out_dir: Path | None = None) -> Path:
    """Compile workload `name` and return the path of its binary.

    The build goes to ``out_dir`` if given, else to ``cache_root()/<sha256 of sources>/``.
    A build whose key (hash of the sources and flags) matches is reused. Sources are copied to
    ``<dir>/<name>-src/`` and kept there, so the paths in the binary's DWARF stay valid.
    Raises `WorkloadBuildError` (a `TcptraceError`) with the compiler's stderr on failure.
    """
    prog = _program(name)
    sources = _read_sources(prog)
    key = _key(name, prog, sources)
    directory = Path(out_dir) if out_dir is not None else cache_root() / key[:24]
    binary = directory / name
    stamp = directory / f"{name}.key"
    if _is_fresh(binary, stamp, key):
        return binary
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkloadBuildError(
            f"cannot create the workload build directory {directory}: {e}",
            hint="set TCPTRACE_CACHE to a writable directory",
        ) from e
    with _locked(directory / f".{name}.lock"):
        if _is_fresh(binary, stamp, key):  # built by a concurrent caller meanwhile
            return binary
        src_dir = directory / f"{name}-src"
        src_dir.mkdir(exist_ok=True)
        for fname, data in sources.items():
            _write_if_changed(src_dir / fname, data)
        tmp = directory / f".{name}.{os.getpid()}.building"
        try:
            _compile(name, prog, src_dir, tmp)
            os.replace(tmp, binary)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _write_if_changed(stamp, (key + "\n").encode("ascii"))
    return binary


class _LineReader:
    """Drains a process's stdout on a thread so the pipe never fills, and keeps every line."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._eof = False
        self._taken: set[int] = set()
        self._cond = threading.Condition()
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name="workload-stdout", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in self._stream:
                with self._cond:
                    self.lines.append(raw.rstrip("\n"))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # stream closed under us by stop()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def take(self, tag: str, deadline: float) -> str | None:
        """The first line ``TAG ...`` not taken yet, or None at EOF; TimeoutError at deadline.

        Lines of other tags stay available to later calls, whatever the order of the calls.
        """
        prefix = tag + " "
        with self._cond:
            while True:
                for i, line in enumerate(self.lines):
                    if i not in self._taken and line.startswith(prefix):
                        self._taken.add(i)
                        return line
                if self._eof:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._cond.wait(left)

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)

    def join(self, timeout: float) -> bool:
        """Wait for EOF on the stream; True when the reader thread has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


@dataclass
class RunningWorkload:
    """A started workload process. Use as a context manager, or call `stop`."""

    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, Any]
    argv: list[str]
    _reader: _LineReader = field(repr=False)
    _stderr: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def lines(self) -> list[str]:
        """Every stdout line read so far (READY included)."""
        return self._reader.snapshot()

    def stderr_text(self) -> str:
        """What the process wrote to stderr so far."""
        try:
            fd = self._stderr.fileno()
            # pread: the child shares this file's offset, so it must not move.
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        except (OSError, ValueError):
            return ""
        return data.decode("utf-8", "replace")

    def wait_line(self, tag: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for a stdout line ``TAG {json}`` (DONE, CLOSED, ACCEPTED) and return its JSON.

        Each line is returned once; repeated calls return the following lines with that tag.
        """
        return _wait_tagged(self.name, self.proc, self._reader, tag, timeout, self.stderr_text)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; raises subprocess.TimeoutExpired."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status. Idempotent."""
        terminate(self.proc, timeout)
        if self._reader.join(2.0) and self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def close(self) -> None:
        """Stop the process and release the stderr capture file."""
        self.stop()
        self._stderr.close()

    def __enter__(self) -> RunningWorkload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _wait_tagged(
    name: str,
    proc: subprocess.Popen[str],
    reader: _LineReader,
    tag: str,
    timeout: float,
    stderr_text: Callable[[], str],
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    try:
        line = reader.take(tag, deadline)
    except TimeoutError:
        raise WorkloadStartError(
            f"workload {name!r} (pid {proc.pid}) printed no {tag} line within {timeout:g}s",
            stderr=stderr_text(),
            pid=proc.pid,
        ) from None
    if line is None:
        try:
            status = f"exited with status {proc.wait(5.0)}"
        except subprocess.TimeoutExpired:
            status = "closed its stdout"
        err = stderr_text()
        raise WorkloadStartError(
            f"workload {name!r} (pid {proc.pid}) {status} before printing {tag}"
            + (f": {err.strip()}" if err.strip() else ""),
            stderr=err,
            pid=proc.pid,
        )
    try:
        value = json.loads(line[len(tag) + 1 :])
    except ValueError as e:
        raise WorkloadStartError(
            f"workload {name!r} printed a bad {tag} line {line!r}: {e}", pid=proc.pid
        ) from e
    if not isinstance(value, dict):
        raise WorkloadStartError(
            f"workload {name!r} printed a {tag} line that is not a JSON object: {line!r}",
            pid=proc.pid,
        )
    return value


def start(name: str, *args: str, timeout: float = 20) -> RunningWorkload:
    """Build workload `name`, run it with `args`, and wait up to `timeout` s for READY.

    Returns a `RunningWorkload` whose ``ready`` is the READY line's JSON. On a timeout or an
    early exit raises `WorkloadStartError`; the process is never left running on error.
    The build (done first, possibly slow the first time) does not count against `timeout`.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    binary = build(name)
    argv = [str(binary), *args]
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the RunningWorkload
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            close_fds=True,
        )
    except OSError as e:
        stderr.close()
        raise WorkloadStartError(f"cannot start workload {name!r}: {e}") from e
    assert proc.stdout is not None
    reader = _LineReader(proc.stdout)
    wl = RunningWorkload(name, proc, {}, argv, reader, stderr)
    try:
        wl.ready = _wait_tagged(name, proc, reader, "READY", timeout, wl.stderr_text)
    except BaseException:
        wl.stop(timeout=2.0)
        stderr.close()
        raise
    return wl
