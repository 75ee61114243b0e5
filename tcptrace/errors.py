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
    """Not root and without CAP_BPF + CAP_PERFMON."""

    exit_code = 3


class TargetError(TcptraceError):
    """A --pid that does not exist, is a kernel thread, or cannot be traced."""

    exit_code = 4


class KernelSupportError(TcptraceError):
    """No usable probe set, no BTF, no tracefs, bcc cannot compile."""

    exit_code = 5


class BtfError(KernelSupportError):
    """BTF missing, unreadable, or lacking a type/member we need."""


class ReportError(TcptraceError):
    """A report directory that cannot be written or read (missing, foreign, bad version)."""

    exit_code = 6
