"""Writing report files safely: atomically, privately, and owned by the user who ran sudo.

A report is written by root (BPF needs it) but read by the user who typed
`sudo tcptrace ...`; files they cannot delete afterwards are a papercut, and
half-written files after a crash or a full disk are worse.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tcptrace.errors import OutputDirFull, OutputDirNotEmpty, ReportError, UsageError

log = logging.getLogger(__name__)

FILE_MODE = 0o600
# Reports hold call stacks and peer addresses: private by default.
DIR_MODE = 0o700


def sudo_owner() -> tuple[int, int] | None:
    """(uid, gid) of the user who invoked sudo, when we are root under sudo; else None."""
    if os.geteuid() != 0:
        return None
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if not uid or not gid:
        return None
    try:
        return int(uid), int(gid)
    except ValueError:
        return None


def _give_to_invoking_user(path: Path | str, fd: int | None = None) -> None:
    owner = sudo_owner()
    if owner is None:
        return
    try:
        if fd is not None:
            os.fchown(fd, *owner)
        else:
            os.chown(path, *owner)
    except OSError as exc:
        # Not fatal: the data is intact, only the owner is wrong (e.g. NFS root_squash).
        log.warning("could not hand %s to uid %d: %s", path, owner[0], exc.strerror or exc)


def _write_error(exc: OSError, path: Path) -> ReportError:
    """One-line ReportError for an OSError met while writing `path`."""
    # issue 7: every message says what to do, and a full disk has its own exit code.
    elsewhere = "free some space there or choose another --output"
    if exc.errno == errno.ENOSPC:
        return OutputDirFull(f"no space left on device while writing {path}", elsewhere)
    if exc.errno == errno.EDQUOT:
        return OutputDirFull(f"disk quota exceeded while writing {path}", elsewhere)
    other = "choose another --output"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ReportError(f"permission denied writing {path}", other)
    if exc.errno == errno.EROFS:
        return ReportError(f"cannot write {path}: read-only file system", other)
    return ReportError(f"cannot write {path}: {exc.strerror or exc}", other)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems refuse fsync on a directory.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path | str) -> Iterator[BinaryIO]:
    """Binary handle whose contents replace `path` only if the block completes.

    Writes a temp file in the same directory (so the rename cannot cross file
    systems), fsyncs it, sets mode 0600, hands it to the sudo user, then
    os.replace()s it over `path`. On any error the temp file is removed and the
    old `path` (if any) is untouched. OSErrors become ReportError.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp already creates 0600; stated explicitly so it survives a refactor.
            os.fchmod(handle.fileno(), FILE_MODE)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            _give_to_invoking_user(tmp, handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _write_error(exc, path) from exc


def write_atomic(path: Path | str, data: bytes) -> None:
    """Replace `path` with `data` atomically (see atomic_writer)."""
    with atomic_writer(path) as handle:
        handle.write(data)


def prepare_output_dir(path: Path | str, force: bool) -> Path:
    """Make `path` ready to receive a report and return it.

    Creates it (and missing parents, handed to the sudo user) if absent. Refuses
    an existing non-empty directory unless `force`, with UsageError; raises
    ReportError if the location cannot be created or written.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"report path {path} exists and is not a directory", "choose another --output"
        )

    if path.is_dir():
        try:
            non_empty = any(path.iterdir())
        except OSError as exc:
            raise ReportError(
                f"cannot read report directory {path}: {exc.strerror or exc}"
            ) from exc
        if non_empty and not force:
            raise OutputDirNotEmpty(
                f"report directory {path} is not empty",
                hint="pass --force to write into it, replacing any previous report",
            )
    else:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(
                f"cannot create report directory {path}: {exc.strerror or exc}",
                "choose another --output",
            ) from exc
        for created in reversed(missing):
            _give_to_invoking_user(created)

    if not os.access(path, os.W_OK | os.X_OK):
        raise ReportError(
            f"report directory {path} is not writable", "choose another --output"
        )
    return path


# --- issue 7: find out at start, not after an hour of tracing, that a report cannot land.
PROBE_BYTES = 64 * 1024


def probe_writable(directory: Path | str) -> None:
    """Write, fsync and delete a scratch file in `directory`; raise what a report would meet.

    os.access() cannot see a full file system (and root passes every permission
    check): only a real write can. 64 KiB, because a file system with a few
    blocks left accepts a tiny file and then fails the report.
    """
    directory = Path(directory)
    try:
        fd, name = tempfile.mkstemp(prefix=".tcptrace-probe.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(b"\0" * PROBE_BYTES)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            Path(name).unlink(missing_ok=True)
    except OSError as exc:
        elsewhere = "choose another --output"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputDirFull(
                f"no space left for the report in {directory}",
                "free some space there or " + elsewhere,
            ) from exc
        if exc.errno == errno.EROFS:
            raise ReportError(
                f"report directory {directory} is on a read-only file system", elsewhere
            ) from exc
        raise ReportError(
            f"report directory {directory} is not writable: {exc.strerror or exc}", elsewhere
        ) from exc


# --- end issue 7
