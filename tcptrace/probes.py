"""The only module that imports bcc: compile, attach, poll, scan, count losses.

Everything above this module works on decoded `SocketRecord`s and plain dicts,
so it imports and tests without root.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import importlib.resources
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tcptrace import ringbuf
from tcptrace.btf import KernelOffsets, kernel_offsets
from tcptrace.errors import KernelSupportError
from tcptrace.events import (
    KERNEL_STAT_COUNT,
    RECORD_DTYPE,
    KernelStat,
    RawSocketRecord,
    RecordKind,
    SocketRecord,
)
from tcptrace.ringbuf import MappedRingBuffer


class ProbeSet(enum.Enum):
    TRACEPOINT = "tracepoint"
    KPROBE = "kprobe"


@dataclass(frozen=True)
class CaptureConfig:
    pids: tuple[int, ...]
    probe_set: ProbeSet = ProbeSet.TRACEPOINT
    follow_forks: bool = False
    kernel_stacks: bool = False
    max_sockets: int = 131072
    max_stacks: int = 16384
    # 16 MiB: ~115k records, seconds of headroom at 20k connections/s if the
    # consumer stalls (e.g. writing a history part).
    ringbuf_pages: int = 4096
    max_targets: int = 1024
    # Per-record wakeups cost the traced service ~45% of its churn; a timed
    # poll costs ~10% (design.md). Tests may ask for wakeups to cut latency.
    wakeup_per_record: bool = False
    # Stream every birth, not only the first of each call site (record-stream tests).
    announce_all_births: bool = False
    extra_cflags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class KprobeAttach:
    """One attachment of the kprobe set: BPF function `program` on kernel `function`."""

    function: str
    program: str
    is_return: bool = False
    # kretprobes only: how many calls may be in flight at once (0: kernel default).
    maxactive: int = 0


# Threads blocked in accept() sit *inside* inet_csk_accept (it sleeps there), and
# each holds a kretprobe instance for as long as it waits, in every process on the
# machine, not only ours. The kernel's default pool is max(10, 2 * ncpu) instances:
# one server with a few dozen accepting threads would exhaust it, and the return of
# every accept beyond it is silently missed. 4096 is the most the kernel takes
# (KRETPROBE_MAXACTIVE_MAX); an instance is under 100 bytes, so the pool costs under
# half a MiB. A miss is still survivable: sys_exit_accept walks the fd to its sock.
KRETPROBE_MAXACTIVE = 4096

# The attach table of bpf/kprobes.bpf.c, in attach order. inet_csk_listen_start
# returns without sleeping, so its kretprobe keeps the default pool (and the
# perf-event attach, which the kernel removes by itself if tcptrace is killed).
KPROBE_ATTACHMENTS: tuple[KprobeAttach, ...] = (
    KprobeAttach("tcp_set_state", "tt_kp_tcp_set_state"),
    KprobeAttach("tcp_connect", "tt_kp_tcp_connect"),
    KprobeAttach("inet_csk_listen_start", "tt_kp_listen_start"),
    KprobeAttach("inet_csk_listen_start", "tt_kret_listen_start", is_return=True),
    KprobeAttach(
        "inet_csk_accept",
        "tt_kret_inet_csk_accept",
        is_return=True,
        maxactive=KRETPROBE_MAXACTIVE,
    ),
    KprobeAttach("tcp_close", "tt_kp_tcp_close"),
)


@dataclass(frozen=True)
class RescueAttach:
    """A second program on a raw tracepoint: it redoes the calls the kernel skipped
    because the first program was already running on that CPU (bpf/common.bpf.h)."""

    tracepoint: str
    program: str


def _rescue(tracepoint: str) -> RescueAttach:
    return RescueAttach(tracepoint, f"rescue_{tracepoint}")


# The kprobe set's state changes come from a kprobe: the kernel skips every kprobe
# program while a kprobe or perf-tracepoint program runs on the CPU (one per-CPU
# counter), so a second kprobe program would be skipped with the first. Its deaths
# come from the shared raw tracepoint, which has a rescue.
RESCUE_ATTACHMENTS: dict[ProbeSet, tuple[RescueAttach, ...]] = {
    ProbeSet.TRACEPOINT: (_rescue("inet_sock_set_state"), _rescue("tcp_destroy_sock")),
    ProbeSet.KPROBE: (_rescue("tcp_destroy_sock"),),
}


COMMON_HEADER = "common.bpf.h"


def bpf_source(probe_set: ProbeSet) -> tuple[str, str]:
    """(C text, include dir) of a probe set, from the installed package.

    The shared header is spliced into the text in place of its #include: bcc
    generates the argument struct of a TRACEPOINT_PROBE only for probes written in
    the main text, and the probes both sets share live in that header. #line
    directives keep compiler messages pointing at the real file and line.
    """
    root = importlib.resources.files("tcptrace.bpf")
    name = {ProbeSet.TRACEPOINT: "tracepoints.bpf.c", ProbeSet.KPROBE: "kprobes.bpf.c"}[probe_set]
    src = root.joinpath(name)
    common = root.joinpath(COMMON_HEADER)
    if not src.is_file() or not common.is_file():
        raise KernelSupportError(
            f"BPF source {name} or {COMMON_HEADER} is missing from the installed package"
        )
    lines = src.read_text().splitlines(keepends=True)
    include = f'#include "{COMMON_HEADER}"'
    for i, line in enumerate(lines):
        if line.strip() == include:
            lines[i] = f'#line 1 "{COMMON_HEADER}"\n{common.read_text()}\n#line {i + 2} "{name}"\n'
            break
    return "".join(lines), str(root)


def _import_bcc() -> Any:
    try:
        import bcc  # the one import of bcc in the project
    except ImportError as exc:
        raise KernelSupportError(
            "bcc is not importable",
            "install Debian's python3-bpfcc and run tcptrace from a venv made with "
            "--system-site-packages (scripts/setup does both)",
        ) from exc
    return bcc


def build_cflags(config: CaptureConfig, offsets: KernelOffsets, include_dir: str) -> list[str]:
    flags = [f"-I{include_dir}", *offsets.as_cflags()]
    flags += [
        f"-DTT_MAX_SOCKS={config.max_sockets}",
        f"-DTT_STACKS={config.max_stacks}",
        f"-DTT_RINGBUF_PAGES={config.ringbuf_pages}",
        f"-DTT_MAX_TARGETS={config.max_targets}",
        f"-DTT_FOLLOW_FORKS={int(config.follow_forks)}",
        f"-DTT_KERNEL_STACKS={int(config.kernel_stacks)}",
    ]
    if config.wakeup_per_record:
        flags.append("-DTT_RB_FLAGS=0")
    if config.announce_all_births:
        flags.append("-DTT_ANNOUNCE_ALL=1")
    flags += list(config.extra_cflags)
    return flags


def kretprobe_misses(pid: int, profile: str | None = None) -> int:
    """Returns of our kretprobes the kernel missed because every maxactive instance
    was taken (nmissed), from tracefs's kprobe_profile ("event hits misses").

    Only kprobe_events-made probes are listed there, which is what bcc makes for a
    kretprobe with an explicit maxactive (inet_csk_accept), named *_bcc_<pid>.
    """
    if profile is None:
        from tcptrace.system import tracefs_root

        root = tracefs_root()
        if root is None:
            return 0
        profile = os.path.join(root, "kprobe_profile")
    suffix = f"_bcc_{pid}"
    missed = 0
    try:
        with open(profile) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0].startswith("r_") and parts[0].endswith(suffix):
                    missed += int(parts[2])
    except (OSError, ValueError):
        return 0
    return missed


def load_without_attaching(
    config: CaptureConfig, offsets: KernelOffsets | None = None
) -> list[str]:
    """Compile a probe set with bcc and load every program through the kernel's
    verifier, attaching no kprobe; returns the names of the programs loaded.

    bcc's constructor attaches TRACEPOINT_PROBE programs by itself (the shared
    syscall/sched/tcp tracepoints); they exist on every kernel and are detached
    again before returning. The kprobe programs are loaded as BPF_PROG_TYPE_KPROBE,
    which needs no CONFIG_KPROBES, so this runs on kernels that cannot attach them.
    """
    bcc = _import_bcc()
    text, include_dir = bpf_source(config.probe_set)
    cflags = build_cflags(config, offsets or kernel_offsets(), include_dir)
    try:
        prog = bcc.BPF(text=text, cflags=cflags)
    except Exception as exc:
        raise KernelSupportError(
            f"the {config.probe_set.value} probe set did not compile or load: {exc}"
        ) from exc
    try:
        loaded = sorted(
            name.decode() if isinstance(name, bytes) else str(name) for name in prog.funcs
        )
        # The programs bcc does not attach by itself: (name, type, what it is).
        by_hand = [
            (r.program, bcc.BPF.RAW_TRACEPOINT, "rescue")
            for r in RESCUE_ATTACHMENTS[config.probe_set]
        ]
        if config.probe_set is ProbeSet.KPROBE:
            by_hand += [(att.program, bcc.BPF.KPROBE, "kprobe") for att in KPROBE_ATTACHMENTS]
        for program, prog_type, kind in by_hand:
            try:
                prog.load_func(program, prog_type)
            except Exception as exc:
                raise KernelSupportError(
                    f"the verifier refused {kind} program {program}: {exc}"
                ) from exc
            loaded.append(program)
        return sorted(set(loaded))
    finally:
        prog.cleanup()


def compile_check() -> float:
    """Compile and load a trivial tracepoint program; seconds it took (doctor)."""
    bcc = _import_bcc()
    started = time.monotonic()
    try:
        prog = bcc.BPF(
            text="TRACEPOINT_PROBE(sock, inet_sock_set_state) { return 0; }",
            debug=0,
        )
    except Exception as exc:  # bcc raises bare Exception for compile/load failures
        raise KernelSupportError(f"bcc could not compile a trivial program: {exc}") from exc
    try:
        return time.monotonic() - started
    finally:
        prog.cleanup()


_SELFTEST_PROGRAM = r"""
BPF_ARRAY(seen, u64, 16);
TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != 6 || (args->sport != PORT && args->dport != PORT))
        return 0;
    int idx = args->newstate & 15;
    u64 *v = seen.lookup(&idx);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
"""


def selftest_loopback() -> dict[str, int]:
    """Load a tiny tracepoint program, make one real loopback TCP connection,
    and return how many times each TCP state was entered by its sockets."""
    import socket

    from tcptrace.events import TcpState

    bcc = _import_bcc()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        prog = bcc.BPF(text=_SELFTEST_PROGRAM, cflags=[f"-DPORT={port}"])
        try:
            client = socket.create_connection(("127.0.0.1", port))
            server, _ = listener.accept()
            client.close()
            server.close()
            time.sleep(0.05)  # FIN/ACK handshake on loopback completes in softirq
            seen = prog["seen"]
            counts = {}
            for state in TcpState:
                value = int(seen[ctypes.c_int(state.value & 15)].value)
                if value:
                    counts[state.name] = value
            return counts
        finally:
            prog.cleanup()


@dataclass(frozen=True)
class ProgramStats:
    name: str
    run_count: int
    run_time_ns: int
    recursion_misses: int  # runs the kernel skipped because the program was already running


_BPF_OBJ_GET_INFO_BY_FD = 15
_SYS_BPF = 321  # x86_64


class _InfoAttr(ctypes.Structure):
    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


_PROG_INFO_FIELDS: dict[str, tuple[int, int]] | None = None


def _prog_info_fields() -> dict[str, tuple[int, int]]:
    """Offsets in struct bpf_prog_info, from BTF like every other kernel struct."""
    global _PROG_INFO_FIELDS
    if _PROG_INFO_FIELDS is None:
        from tcptrace.btf import KernelBtf

        btf = KernelBtf.load()
        _PROG_INFO_FIELDS = {
            name: (m.offset, m.size)
            for name in ("run_time_ns", "run_cnt", "recursion_misses")
            for m in [btf.member("bpf_prog_info", name)]
        }
    return _PROG_INFO_FIELDS


def program_stats(name: str, fd: int) -> ProgramStats:
    fields = _prog_info_fields()
    size = max(off + width for off, width in fields.values())
    buf = ctypes.create_string_buffer(size)
    attr = _InfoAttr(fd, size, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr), ctypes.sizeof(attr)):
        return ProgramStats(name, 0, 0, 0)
    raw = buf.raw

    def field_value(key: str) -> int:
        off, width = fields[key]
        return int.from_bytes(raw[off : off + width], "little")

    return ProgramStats(
        name, field_value("run_cnt"), field_value("run_time_ns"), field_value("recursion_misses")
    )


_MADV_DONTNEED = 4
_COMPILER_LIBRARIES = ("libLLVM", "libclang")


def release_compiler_memory() -> None:
    """Give back the memory the BPF compile used and nothing will use again (issue 6).

    bcc compiles with clang/LLVM in this process: ~40 MB of freed heap stays
    with malloc, and ~70 MB of LLVM's code pages stay counted in our RSS for the
    whole trace. malloc_trim returns the first; MADV_DONTNEED on the libraries'
    executable mappings drops the second from our page tables (clean, file-backed
    pages: the kernel rereads them should LLVM ever run again).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with suppress(AttributeError):  # not glibc
        libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or fields[1] != "r-xp":
                continue  # only code: data mappings hold relocated, private state
            if not any(lib in fields[5] for lib in _COMPILER_LIBRARIES):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, _MADV_DONTNEED)


class Capture:
    """Loaded and attached BPF programs for a set of target processes.

    Use as a context manager: leaving it detaches everything. The kernel also
    detaches our perf-event based attachments if this process dies, so even a
    SIGKILL leaves no probe behind.
    """

    def __init__(self, config: CaptureConfig, offsets: KernelOffsets | None = None) -> None:
        # issue 7: the effective capabilities, not the uid (see system.missing_capabilities).
        from tcptrace.system import require_privileges

        require_privileges()
        self.config = config
        bcc = _import_bcc()
        text, include_dir = bpf_source(config.probe_set)
        cflags = build_cflags(config, offsets or kernel_offsets(), include_dir)
        try:
            self._bpf = bcc.BPF(text=text, cflags=cflags)
        except Exception as exc:
            raise KernelSupportError(
                f"the {config.probe_set.value} probe set did not load: {exc}"
            ) from exc
        self._closed = False
        self._rescue_links: list[int] = []
        release_compiler_memory()
        self._attach_rescues(bcc)
        if config.probe_set is ProbeSet.KPROBE:
            self._attach_kprobes()
        self._chunks: list[bytes] = []
        self._bcc = bcc
        self._scan_buffers: tuple[Any, Any] | None = None
        self._decode_errors = 0
        self._ring: MappedRingBuffer | None = None
        try:
            targets = self._bpf["targets"]
            for pid in config.pids:
                targets[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            self._socks = self._bpf["socks"]
            self._stacks = self._bpf["stacks"]
            self._stats = self._bpf["stats"]
            self._ring = self._open_ring()
        except Exception:
            self.close()
            raise

    def _attach_rescues(self, bcc: Any) -> None:
        """Attach the rescue programs. bcc refuses a second program on a raw
        tracepoint it attached, so these links are ours: file descriptors that the
        kernel closes, detaching them, if tcptrace dies."""
        for rescue in RESCUE_ATTACHMENTS[self.config.probe_set]:
            try:
                fn = self._bpf.load_func(rescue.program, bcc.BPF.RAW_TRACEPOINT)
                link = bcc.libbcc.lib.bpf_attach_raw_tracepoint(fn.fd, rescue.tracepoint.encode())
                if link < 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            except Exception as exc:
                self.close()
                raise KernelSupportError(
                    f"could not load or attach {rescue.program} (raw tracepoint "
                    f"{rescue.tracepoint}): {exc}"
                ) from exc
            self._rescue_links.append(int(link))

    def _attach_kprobes(self) -> None:
        """Attach the kprobe set by name (bcc attached its tracepoints already)."""
        for att in KPROBE_ATTACHMENTS:
            try:
                if att.is_return:
                    self._bpf.attach_kretprobe(
                        event=att.function, fn_name=att.program, maxactive=att.maxactive
                    )
                else:
                    self._bpf.attach_kprobe(event=att.function, fn_name=att.program)
            except Exception as exc:
                self.close()  # detach whatever did attach
                kind = "kretprobe" if att.is_return else "kprobe"
                raise KernelSupportError(
                    f"the kprobe probe set could not attach a {kind} to {att.function} "
                    f"(inlined, renamed or notrace on this kernel?): {exc}",
                    "use --probes tracepoint",
                ) from exc

    # -- lifecycle -------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            ring = getattr(self, "_ring", None)
            if ring is not None:
                ring.close()
            for link in getattr(self, "_rescue_links", ()):
                with suppress(OSError):
                    os.close(link)
            self._bpf.cleanup()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- targets ---------------------------------------------------------
    def add_target(self, pid: int) -> None:
        self._bpf["targets"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def remove_target(self, pid: int) -> None:
        with suppress(KeyError):
            del self._bpf["targets"][ctypes.c_uint32(pid)]

    # --- issue 7: bcc keeps a native symbol cache per pid for the life of the process
    # (about 0.5 MB each, never freed): a long trace with --follow-forks over many
    # short-lived processes grew ~470 MB/h in the soak. Free it once the pid is gone
    # (its stacks were symbolized while it lived; the symbolizer keeps the names).
    def forget_process(self, pid: int) -> None:
        bcc = _import_bcc()
        cache = bcc.BPF._sym_caches.pop(pid, None)
        if cache is not None:
            bcc.libbcc.lib.bcc_free_symcache(cache.cache, pid)

    # --- end issue 7

    # -- records ---------------------------------------------------------
    def _open_ring(self) -> MappedRingBuffer | None:
        """Map the ring buffer for bulk reads; where that is not safe, bcc's callback."""
        events = self._bpf["events"]
        if ringbuf.supported():
            return MappedRingBuffer(
                events.map_fd, events.max_entries, ctypes.sizeof(RawSocketRecord)
            )
        events.open_ring_buffer(self._on_ring_record)
        return None

    def _on_ring_record(self, _ctx: Any, data: Any, size: int) -> int:
        # Hot path of the fallback: one call per record. Copy the bytes and nothing
        # else; they are decoded in bulk (tcptrace.history.split_records).
        self._chunks.append(ctypes.string_at(data, size))
        return 0

    def drain_raw(self) -> bytes:
        """Every record waiting in the ring buffer, concatenated, without blocking."""
        if self._ring is not None:
            return self._ring.consume()
        self._bpf.ring_buffer_consume()
        raw = b"".join(self._chunks)
        self._chunks.clear()
        return raw

    def drain(self, handler: Callable[[SocketRecord], None]) -> None:
        """Decode and hand each waiting record to `handler` (tests, low rates)."""
        raw = self.drain_raw()
        size = ctypes.sizeof(RawSocketRecord)
        for offset in range(0, len(raw), size):
            try:
                record = SocketRecord.decode(raw[offset : offset + size])
            except ValueError:
                self._decode_errors += 1
                continue
            handler(record)

    def scan(self) -> list[SocketRecord]:
        """Every socket in the in-kernel ledger right now, decoded (tests, small maps)."""
        records, _complete = self.scan_raw()
        return [SocketRecord.decode(row.tobytes()) for row in records]

    def scan_raw(self) -> tuple[np.ndarray, bool]:
        """Every socket in the in-kernel ledger (RECORD_DTYPE rows, kind SNAPSHOT), and
        whether the read is known complete. Batched: one syscall for the whole map."""
        try:
            records, complete = self._lookup_all_batched()
        except OSError:
            # Kernels without batched map ops: one key at a time (slower, racy).
            values = b"".join(bytes(v) for _k, v in self._socks.items())
            records = np.frombuffer(values, dtype=RECORD_DTYPE).copy()
            complete = True
        records["kind"] = RecordKind.SNAPSHOT
        return records, complete

    def _lookup_all_batched(self) -> tuple[np.ndarray, bool]:
        # Not bcc's items_lookup_batch(): bcc 0.26 passes one c_uint32 as both the
        # resume token and the count, so any read needing a second call resumes at
        # the wrong place. Here they are separate, and the result says whether the
        # whole map was read (a partial scan must not be taken for lost deaths).
        lib = self._bcc.libbcc.lib
        capacity = self.config.max_sockets
        if self._scan_buffers is None:
            # np.empty, not zeroed: pages the kernel never writes are never
            # resident, so a map holding few sockets costs little memory.
            self._scan_buffers = (
                np.empty(capacity, dtype=np.uint64),
                np.empty(capacity, dtype=RECORD_DTYPE),
            )
        keys, values = self._scan_buffers
        key_at, value_at = keys.ctypes.data, values.ctypes.data
        token = ctypes.c_uint32(0)
        next_token = ctypes.c_uint32(0)
        total = 0
        for _attempt in range(64):
            count = ctypes.c_uint32(capacity - total)
            res = lib.bpf_lookup_batch(
                self._socks.map_fd,
                ctypes.byref(token) if total else None,
                ctypes.byref(next_token),
                ctypes.c_void_p(key_at + 8 * total),
                ctypes.c_void_p(value_at + RECORD_DTYPE.itemsize * total),
                ctypes.byref(count),
            )
            err = ctypes.get_errno()
            total += count.value
            if res != 0:
                if err == errno.ENOENT:  # the end of the map: complete
                    return values[:total].copy(), True
                if total == 0 and err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise OSError(err, "batched map lookup not supported")
                return values[:total].copy(), False
            if total >= capacity or count.value == 0:
                break
            token.value = next_token.value
        return values[:total].copy(), False

    def forget(self, sks: Iterable[int]) -> None:
        """Drop ledger entries user space has retired (e.g. a process exited)."""
        for sk in sks:
            with suppress(KeyError):
                del self._socks[ctypes.c_uint64(sk)]

    def stack_addresses(self, stack_id: int) -> list[int]:
        if stack_id < 0:
            return []
        try:
            trace = self._stacks.walk(stack_id)
            return [int(addr) for addr in trace]
        except KeyError:
            return []

    def symbolize(self, addr: int, pid: int) -> tuple[str, str]:
        """(symbol, module) of a user address in `pid`; symbol "[unknown]" if none."""
        sym = self._bpf.sym(addr, pid, show_module=False, show_offset=False)
        name = sym.decode("utf-8", "replace") if isinstance(sym, bytes) else str(sym)
        module = ""
        try:
            mod = self._bpf.sym(addr, pid, show_module=True, show_offset=False)
            text = mod.decode("utf-8", "replace") if isinstance(mod, bytes) else str(mod)
            if text.endswith("]") and " [" in text:
                module = text.rsplit(" [", 1)[1][:-1]
        except Exception:
            module = ""
        return name, module

    def kernel_symbol(self, addr: int) -> str:
        sym = self._bpf.ksym(addr)
        return sym.decode("utf-8", "replace") if isinstance(sym, bytes) else str(sym)

    def stats(self) -> dict[str, int]:
        """Kernel counters summed over CPUs, plus user-side decode errors."""
        totals = {stat.name.lower(): 0 for stat in KernelStat}
        for stat in KernelStat:
            if stat.value >= KERNEL_STAT_COUNT:
                continue
            values = self._stats[ctypes.c_int(stat.value)]
            totals[stat.name.lower()] = int(sum(values))
        totals["records_undecodable"] = self._decode_errors
        # Read after the rescue counter: the kernel counts a skip before the rescue
        # program can redo it, so skips minus rescues is never below the truth. A
        # rescue program's own skips are not counted: a skip it could have redone
        # is already counted as its first program's, and stays so unless redone.
        programs = self.program_stats()
        rescues = {r.program for r in RESCUE_ATTACHMENTS[self.config.probe_set]}
        skipped = sum(p.recursion_misses for p in programs if p.name not in rescues)
        # Never below 0, even should the kernel not report a program's misses.
        totals["probe_recursion_misses"] = max(0, skipped - totals["runs_rescued"])
        if self.config.probe_set is ProbeSet.KPROBE:
            totals["kretprobe_misses"] = kretprobe_misses(os.getpid())
        return totals

    def program_stats(self) -> list[ProgramStats]:
        """Per BPF program: runs, run time (when kernel.bpf_stats_enabled=1), misses."""
        return [
            program_stats(name.decode() if isinstance(name, bytes) else str(name), fn.fd)
            for name, fn in self._bpf.funcs.items()
        ]


@contextmanager
def capture(config: CaptureConfig) -> Iterator[Capture]:
    cap = Capture(config)
    try:
        yield cap
    finally:
        cap.close()
