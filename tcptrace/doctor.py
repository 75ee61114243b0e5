"""`tcptrace doctor`: can this machine trace, and with which probe set?"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from tcptrace import system
from tcptrace.errors import TcptraceError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = True  # a failed optional check is information, not a verdict

    def line(self) -> str:
        mark = "OK  " if self.ok else ("FAIL" if self.required else "INFO")
        text = f"{mark} {self.name}: {self.detail}"
        if not self.ok and self.hint:
            text += f" -- fix: {self.hint}"
        return text


def run_checks() -> list[Check]:
    privileges = _privileges_check()
    checks: list[Check] = [privileges]
    release = system.kernel_release()
    major_minor = tuple(int(x) for x in release.split(".")[:2] if x.isdigit())
    new_enough = major_minor >= (5, 8)  # BPF ring buffer
    checks.append(
        Check(
            "kernel",
            new_enough,
            f"{release} ({platform.machine()})",
            "tcptrace needs Linux >= 5.8 (BPF ring buffer)",
        )
    )
    checks.append(
        Check(
            "btf",
            system.btf_present(),
            system.BTF_PATH + (" present" if system.btf_present() else " missing"),
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    )
    offsets_ok, offsets_detail = _btf_offsets()
    checks.append(Check("btf offsets", offsets_ok, offsets_detail, "see the error above"))
    root = system.tracefs_root()
    checks.append(
        Check(
            "tracefs",
            root is not None,
            f"mounted at {root}" if root else "not mounted",
            "mount -t tracefs nodev /sys/kernel/tracing",
        )
    )
    have_tp = system.tracepoint_exists("sock", "inet_sock_set_state")
    checks.append(
        Check(
            "tracepoint sock:inet_sock_set_state",
            have_tp,
            "present" if have_tp else "missing",
            "Linux >= 4.16 with tracefs mounted",
        )
    )
    have_destroy = system.tracepoint_exists("tcp", "tcp_destroy_sock")
    checks.append(
        Check(
            "tracepoint tcp:tcp_destroy_sock",
            have_destroy,
            "present" if have_destroy else "missing",
            "Linux >= 5.17",
        )
    )
    kp = system.kprobes_available()
    checks.append(
        Check(
            "kprobes",
            kp,
            "available" if kp else "not available (CONFIG_KPROBES off)",
            "none needed: the tracepoint set works without kprobes",
            required=False,
        )
    )
    headers, matching = system.build_headers()
    checks.append(
        Check(
            "kernel headers for bcc",
            headers is not None,
            (
                f"{headers} ({'matches' if matching else 'does NOT match'} {release}; "
                "tcptrace takes struct offsets from BTF, never from headers)"
            )
            if headers
            else "none",
            "scripts/setup installs and wires them",
        )
    )
    bcc_check = _bcc_check(privileges.ok)
    checks.append(bcc_check)
    if bcc_check.ok:
        checks.append(_live_check())
    try:
        picked, why = system.choose_probe_set("auto")
        checks.append(Check("probe set (auto)", True, f"{picked}: {why}"))
    except TcptraceError as exc:
        checks.append(Check("probe set (auto)", False, exc.message, exc.hint))
    return checks


def _privileges_check() -> Check:
    """issue 7: judged by the effective capabilities, as the trace itself does."""
    missing = system.missing_capabilities()
    fix = "run with sudo, or grant " + system.NEEDED_CAPS
    if missing:
        return Check("privileges", False, "lacks " + ", ".join(missing), fix)
    uid = os.geteuid()
    if uid == 0:
        return Check("privileges", True, "root or CAP_BPF+CAP_PERFMON")
    held = system.held_capabilities()
    detail = f"uid {uid} with " + ", ".join(held)
    if "CAP_SYS_PTRACE" not in held:
        detail += f" (no CAP_SYS_PTRACE: only processes of uid {uid} can be traced)"
    return Check("privileges", True, detail)


def _btf_offsets() -> tuple[bool, str]:
    try:
        from tcptrace.btf import kernel_offsets

        offsets = kernel_offsets()
    except TcptraceError as exc:
        return False, str(exc)
    d = offsets.as_dict()
    return (
        True,
        f"{len(d)} struct offsets resolved (e.g. task_struct.files={d['TT_OFF_TASK_FILES']})",
    )


def _bcc_check(privileged: bool) -> Check:
    try:
        from tcptrace.probes import compile_check
    except TcptraceError as exc:
        return Check("bcc", False, exc.message, exc.hint)
    if not privileged:
        return Check("bcc", False, "cannot load a program without privileges", "run with sudo")
    try:
        seconds = compile_check()
    except TcptraceError as exc:
        return Check("bcc", False, exc.message, exc.hint or "run scripts/setup")
    return Check("bcc", True, f"compiled and loaded a tracepoint program in {seconds:.2f}s")


def _live_check() -> Check:
    from tcptrace.probes import selftest_loopback

    try:
        seen = selftest_loopback()
    except TcptraceError as exc:
        return Check("live tracepoint", False, exc.message, exc.hint)
    except Exception as exc:  # bcc load/attach failures surface as bare exceptions
        return Check("live tracepoint", False, f"could not attach: {exc}")
    ok = seen.get("SYN_SENT", 0) >= 1 and seen.get("CLOSE", 0) >= 2
    detail = "state changes of one loopback connection: " + (
        " ".join(f"{k}={v}" for k, v in seen.items()) or "none"
    )
    return Check("live tracepoint", ok, detail, "the tracepoint is attached but sees nothing")
