"""Typed errors raised by library code; the CLI maps each to one line and an exit code."""

from __future__ import annotations


class TcptraceError(Exception):
    """Base of every error a user can cause or fix. `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(TcptraceError):
    """Bad option values (durations, paths)."""

    exit_code = 2


class PermissionProblem(TcptraceError):
    """Without the capabilities tracing needs (CAP_BPF + CAP_PERFMON, ...): see system.py."""

    exit_code = 3


class TargetError(TcptraceError):
    """A --pid that does not exist, is a kernel thread, or cannot be traced."""

    exit_code = 4


class TargetUnreadable(TargetError):
    """A process whose /proc/PID/fd tcptrace may not read (another user's, or not
    dumpable, without CAP_SYS_PTRACE): it exists, so its sockets are not gone."""


class KernelSupportError(TcptraceError):
    """No usable probe set, no BTF, no tracefs, bcc cannot compile."""

    exit_code = 5


class BtfError(KernelSupportError):
    """BTF missing, unreadable, or lacking a type/member we need."""

    exit_code = 8  # issue 7: told apart from "no probe set" (5): the fix differs


class ReportError(TcptraceError):
    """A report directory that cannot be written or read (missing, foreign, bad version)."""

    exit_code = 6


# --- issue 7: one exit code per kind of mistake, so a script can tell them apart.
# Subclasses keep the broad classes above catchable (`except TargetError`).
INTERNAL_ERROR_EXIT = 1  # a bug in tcptrace: one line, traceback saved to a file


class KernelThreadTarget(TargetError):
    """A --pid that is a kernel thread: it owns no sockets."""

    exit_code = 7


class OutputDirNotEmpty(UsageError):
    """--output names a non-empty directory and --force was not given."""

    exit_code = 9


class OutputDirFull(ReportError):
    """The report file system has no space (or quota) left."""

    exit_code = 10


class ReportRescued(ReportError):
    """The report could not go where asked but was written, whole, somewhere else."""

    exit_code = 11


class TraceInternalError(TcptraceError):
    """A bug hit during the trace: the report of what was traced until then was
    written anyway, and the traceback saved to a file next to it."""

    exit_code = 12


# Documented in `tcptrace --help` and the README; a unit test keeps them distinct.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "the trace ran and the report was written"),
    (INTERNAL_ERROR_EXIT, "internal error (a bug: the traceback is saved to a file)"),
    (UsageError.exit_code, "bad option value"),
    (PermissionProblem.exit_code, "not root, nor the capabilities tracing needs (README)"),
    (TargetError.exit_code, "no such process (or a thread id)"),
    (KernelSupportError.exit_code, "no usable probe set on this kernel"),
    (ReportError.exit_code, "report directory not writable"),
    (KernelThreadTarget.exit_code, "the pid is a kernel thread"),
    (BtfError.exit_code, "no usable kernel BTF"),
    (OutputDirNotEmpty.exit_code, "report directory not empty (use --force)"),
    (OutputDirFull.exit_code, "no space left for the report"),
    (ReportRescued.exit_code, "report written to a fallback directory instead"),
    (TraceInternalError.exit_code, "internal error during the trace; report and traceback written"),
)
# --- end issue 7
