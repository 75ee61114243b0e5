"""Facts about the running kernel and processes, read from /proc and /sys (no bcc).

Used by `tcptrace doctor`, by `--probes auto`, and to validate `--pid`.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from tcptrace.errors import (
    KernelSupportError,
    KernelThreadTarget,
    PermissionProblem,
    TargetError,
)

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BTF_PATH = "/sys/kernel/btf/vmlinux"
PF_KTHREAD = 0x00200000
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
# What a user other than root needs (found by experiment on 6.18, README "On a
# production host"): BPF + PERFMON to load and attach, DAC_READ_SEARCH to read
# tracefs (mode 0700, root's), SYS_PTRACE for another user's /proc/PID/{fd,maps}.
NEEDED_CAPS = "CAP_BPF + CAP_PERFMON + CAP_DAC_READ_SEARCH (+ CAP_SYS_PTRACE)"


def tracefs_root() -> str | None:
    for root in TRACEFS_CANDIDATES:
        if os.path.isfile(os.path.join(root, "available_events")):
            return root
    return None


def tracepoint_exists(category: str, name: str) -> bool:
    root = tracefs_root()
    return root is not None and os.path.isdir(os.path.join(root, "events", category, name))


def kprobes_available() -> bool:
    """CONFIG_KPROBES leaves kprobe_events in tracefs; without it bcc's attach fails."""
    root = tracefs_root()
    return root is not None and os.path.exists(os.path.join(root, "kprobe_events"))


def btf_present() -> bool:
    from tcptrace.btf import default_btf_path  # issue 7: honours TCPTRACE_BTF_PATH

    return os.path.isfile(default_btf_path())


def kernel_release() -> str:
    return platform.release()


def effective_caps() -> int | None:
    """CapEff of this process (None when /proc/self/status cannot tell)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def tracefs_denied() -> bool:
    """True when tracefs is mounted but this process may not read it.

    bcc attaches a tracepoint by reading its id from tracefs, whose root is mode
    0700 and root's: a user other than root needs CAP_DAC_READ_SEARCH (or
    CAP_DAC_OVERRIDE) there, root needs nothing. Tried for real, with an open().
    """
    denied = False
    for root in TRACEFS_CANDIDATES:
        try:
            with open(os.path.join(root, "events", "sock", "inet_sock_set_state", "id"), "rb"):
                return False
        except PermissionError:
            denied = True
        except OSError:
            continue  # not mounted there, or no such tracepoint: not a privilege problem
    return denied


def missing_capabilities() -> list[str]:
    """The capabilities this process lacks to trace (empty when it can).

    issue 7: judged by capabilities, not by uid. Root is not always privileged (a
    container or a systemd unit may run uid 0 with every capability dropped, and
    then loading BPF fails with EPERM deep in bcc), and a user other than root
    traces fine with the right ones. CAP_SYS_PTRACE is checked per target, in
    validate_targets: only another user's process needs it.
    """
    found = effective_caps()
    if found is None:  # no /proc/self/status: trust the uid, bcc will tell
        return [] if os.geteuid() == 0 else ["CAP_BPF", "CAP_PERFMON"]
    caps = found

    def has(bit: int) -> bool:
        return bool(caps & (1 << bit))

    missing = []
    if not has(CAP_SYS_ADMIN):  # CAP_SYS_ADMIN alone stands for both
        missing += [
            name
            for bit, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"))
            if not has(bit)
        ]
    if tracefs_denied():
        missing.append("CAP_DAC_READ_SEARCH")
    return missing


def can_trace() -> bool:
    return not missing_capabilities()


_RELEVANT_CAPS = (
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (CAP_BPF, "CAP_BPF"),
    (CAP_PERFMON, "CAP_PERFMON"),
    (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    (CAP_DAC_OVERRIDE, "CAP_DAC_OVERRIDE"),
    (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
)


def held_capabilities() -> list[str]:
    """Which of the capabilities tracing may use this process has (for doctor)."""
    caps = effective_caps() or 0
    return [name for bit, name in _RELEVANT_CAPS if caps & (1 << bit)]


def require_privileges() -> None:
    """Raise PermissionProblem naming the missing capabilities and the fix."""
    missing = missing_capabilities()
    if not missing:
        return
    lacking = ", ".join(missing)
    if os.geteuid() == 0:  # issue 7: root without the capabilities
        raise PermissionProblem(
            f"tracing needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN), and this root process"
            f" lacks {lacking}",
            "grant them; containers and systemd units may drop them, e.g. docker run "
            + " ".join(f"--cap-add {name.removeprefix('CAP_')}" for name in missing),
        )
    raise PermissionProblem(
        f"tracing needs root, or {NEEDED_CAPS}; this process lacks {lacking}",
        "run it with sudo, or give it those capabilities, e.g. AmbientCapabilities="
        "CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH CAP_SYS_PTRACE in a systemd unit",
    )


def inspection_denied(pid: int) -> bool:
    """True when this process may not follow pid's /proc links (fd, root).

    The start-up snapshot reads the /proc/PID/fd links, and bcc opens the
    binaries to symbolize through /proc/PID/root: both need ptrace read access,
    which another user's process (or one that is not dumpable) only grants with
    CAP_SYS_PTRACE (CAP_PERFMON opens /proc/PID/maps, not these). False for a
    process that is gone: the trace deals with exits.
    """
    try:
        os.readlink(f"/proc/{pid}/root")  # the same check as /proc/PID/fd/N
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def has_capability(bit: int) -> bool:
    """Whether this process holds capability `bit` (CAP_*) in its effective set."""
    return bool((effective_caps() or 0) & (1 << bit))


def require_inspectable(pid: int, comm: str) -> None:
    """Raise PermissionProblem if this process may not follow pid's /proc links.

    Without it the report would silently lack the sockets open before tracing
    and every name (see inspection_denied).
    """
    if inspection_denied(pid):
        raise PermissionProblem(
            f"cannot inspect pid {pid} ({comm}): reading its /proc/{pid}/fd and /proc/{pid}/root"
            " needs CAP_SYS_PTRACE (it belongs to another user, or is not dumpable)",
            "run it with sudo, or add CAP_SYS_PTRACE",
        )


def build_headers() -> tuple[str | None, bool]:
    """(path bcc will use for kernel headers, whether they match the running kernel)."""
    release = kernel_release()
    build = Path(f"/lib/modules/{release}/build")
    if not build.exists():
        return None, False
    target = os.path.realpath(build)
    return target, release in os.path.basename(target) or _headers_release(target) == release


def _headers_release(path: str) -> str:
    try:
        text = Path(path, "include/config/kernel.release").read_text().strip()
    except OSError:
        return ""
    return text


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    comm: str
    is_kernel_thread: bool
    # issue 7: clock ticks after boot (stat field 22); a reused pid has another.
    start_time: int | None = None


def process_info(pid: int) -> ProcessInfo:
    """Validate a --pid: it exists and is a user process."""
    if pid <= 0:
        raise TargetError(f"--pid {pid} is not a process id", "give a positive pid")
    base = Path("/proc") / str(pid)
    try:
        stat = (base / "stat").read_text()
        comm = (base / "comm").read_text().strip()
    except FileNotFoundError:
        raise TargetError(f"no process with pid {pid}", "check it with `ps -p PID`") from None
    except OSError as exc:
        raise TargetError(f"cannot read /proc/{pid}: {exc.strerror}") from exc
    # Fields after the ")" of comm; flags is field 9 overall, 7th after it.
    fields = stat.rsplit(")", 1)[1].split()
    flags = int(fields[6])
    tgid = _status_field(base, "Tgid")
    if tgid is not None and tgid != pid:
        raise TargetError(
            f"pid {pid} is a thread of process {tgid}", f"trace the process: --pid {tgid}"
        )
    return ProcessInfo(
        pid=pid,
        comm=comm,
        is_kernel_thread=bool(flags & PF_KTHREAD),
        start_time=int(fields[19]),
    )


def _status_field(base: Path, name: str) -> int | None:
    try:
        for line in (base / "status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def validate_targets(pids: tuple[int, ...]) -> list[ProcessInfo]:
    infos = []
    for pid in pids:
        info = process_info(pid)
        if info.is_kernel_thread:
            raise KernelThreadTarget(
                f"pid {pid} ({info.comm}) is a kernel thread: it holds no sockets of its own",
                "give the pid of a user-space process",
            )
        require_inspectable(pid, info.comm)  # issue 7
        infos.append(info)
    return infos


def is_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def nofile_limit(pid: int) -> int | None:
    """Soft RLIMIT_NOFILE of a process (None when unknown or unlimited)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- issue 5: fds in use at start and end, for the time-to-RLIMIT_NOFILE estimate
def open_fd_count(pid: int) -> int | None:
    """Entries in /proc/PID/fd (None when unreadable, e.g. the process has exited)."""
    try:
        return sum(1 for _ in os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# --- end issue 5


# --- issue 7: a pid is a process only together with its start time.
def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot, None if it is gone or a zombie.

    Pids are recycled: a process that exits may hand its pid to a new one within
    milliseconds on a busy host, so "pid exists" is not "my target lives".
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class ProcessWatch:
    """Which traced pids still hold the process they named when first seen.

    The start time is remembered at the first look (for --pid targets: at
    validation, before attach); a later look that finds another start time
    means the pid was reused, and the new process is not the target.
    """

    def __init__(self, known: dict[int, int | None] | None = None) -> None:
        self._start: dict[int, int] = {p: t for p, t in (known or {}).items() if t is not None}
        self._gone: set[int] = set()

    def alive(self, pid: int) -> bool:
        if pid in self._gone:
            return False  # once gone, a later process with this pid is someone else
        now = process_start_time(pid)
        first = self._start.setdefault(pid, now) if now is not None else None
        if now is None or first != now:
            self._gone.add(pid)
            return False
        return True

    def reused(self, pid: int) -> bool:
        """True when `pid` exists now but is not the process first seen under it."""
        first = self._start.get(pid)
        now = process_start_time(pid)
        return first is not None and now is not None and now != first


# --- end issue 7


# Kernel functions the kprobe set attaches to (bpf/kprobes.bpf.c; the attach table
# in tcptrace/probes.py must name exactly these, a unit test checks it).
KPROBE_FUNCTIONS: tuple[str, ...] = (
    "tcp_set_state",
    "tcp_connect",
    "inet_csk_listen_start",
    "inet_csk_accept",
    "tcp_close",
)
KALLSYMS = "/proc/kallsyms"
KPROBE_BLACKLIST = "/sys/kernel/debug/kprobes/blacklist"


def kernel_text_symbols(path: str | None = None) -> set[str] | None:
    """Names of the core kernel's functions, or None when kallsyms is unreadable.

    A function the compiler inlined everywhere, or only kept as a renamed clone
    (`tcp_set_state.isra.0`), has no symbol of its own name: a kprobe cannot attach.
    """
    names: set[str] = set()
    try:
        with open(path or KALLSYMS, "rb") as f:
            for line in f:
                parts = line.split()
                # "addr type name" for the core kernel; modules add "[module]".
                if len(parts) == 3 and parts[1] in (b"t", b"T", b"w", b"W"):
                    names.add(parts[2].decode("ascii", "replace"))
    except OSError:
        return None
    return names


def kprobe_blacklist(path: str | None = None) -> set[str]:
    """Functions the kernel refuses to kprobe (debugfs; empty when unreadable)."""
    try:
        with open(path or KPROBE_BLACKLIST) as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def kprobe_set_problem() -> str | None:
    """Why the kprobe probe set cannot run on this kernel, or None when it can."""
    if tracefs_root() is None:
        return "tracefs is not mounted"
    if not kprobes_available():
        return "this kernel has no kprobes (CONFIG_KPROBES is off: tracefs has no kprobe_events)"
    if not tracepoint_exists("tcp", "tcp_destroy_sock"):
        return "tracepoint tcp:tcp_destroy_sock is missing (the kprobe set takes deaths from it)"
    symbols = kernel_text_symbols()
    blacklist = kprobe_blacklist()
    for fn in KPROBE_FUNCTIONS:
        if symbols is not None and fn not in symbols:
            return (
                f"kernel function {fn} is not traceable here (no symbol of that name in "
                f"{KALLSYMS}: inlined or renamed by the compiler)"
            )
        if fn in blacklist or (symbols is not None and f"_kbl_addr_{fn}" in symbols):
            return f"kernel function {fn} is on the kprobe blacklist"
    return None


def choose_probe_set(requested: str) -> tuple[str, str]:
    """(probe set, why) for --probes auto|tracepoint|kprobe on this kernel."""
    have_tp = tracepoint_exists("sock", "inet_sock_set_state") and tracepoint_exists(
        "tcp", "tcp_destroy_sock"
    )
    if requested == "tracepoint":
        if not have_tp:
            raise KernelSupportError(
                "tracepoint probe set unavailable: sock:inet_sock_set_state or "
                "tcp:tcp_destroy_sock is missing",
                "mount tracefs (mount -t tracefs nodev /sys/kernel/tracing) or use --probes kprobe",
            )
        return "tracepoint", "requested with --probes tracepoint"
    if requested not in ("kprobe", "auto"):
        raise KernelSupportError(
            f"unknown probe set {requested!r}", "use auto, tracepoint or kprobe"
        )
    problem = kprobe_set_problem()
    if requested == "kprobe":
        if problem is not None:
            raise KernelSupportError(
                f"kprobe probe set unavailable: {problem}",
                "use --probes tracepoint or auto",
            )
        return "kprobe", "requested with --probes kprobe"
    if problem is None:
        return "kprobe", "auto: kprobes available and " + ", ".join(KPROBE_FUNCTIONS) + " traceable"
    if have_tp:
        return "tracepoint", f"auto: kprobe set unavailable, {problem}"
    if tracefs_root() is None:
        raise KernelSupportError(
            "tracefs is not mounted, so no tracepoint can be found",
            "mount -t tracefs nodev /sys/kernel/tracing",
        )
    raise KernelSupportError(
        "no usable probe set: this kernel lacks sock:inet_sock_set_state/tcp:tcp_destroy_sock "
        f"and the kprobe set is unavailable ({problem})",
        "tcptrace needs Linux >= 5.8 with tracepoints or kprobes",
    )
