"""The only module that imports bcc: compile, attach, poll, scan, count losses.

Everything above this module works on decoded `SocketRecord`s and plain dicts,
so it imports and tests without root.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.resources
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from tcptrace.btf import KernelOffsets, kernel_offsets
from tcptrace.errors import KernelSupportError, PermissionProblem
from tcptrace.events import KERNEL_STAT_COUNT, KernelStat, RawSocketRecord, SocketRecord


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
    ringbuf_pages: int = 1024
    max_targets: int = 1024
    # Per-record wakeups cost the traced service ~45% of its churn; a timed
    # poll costs ~10% (design.md). Tests may ask for wakeups to cut latency.
    wakeup_per_record: bool = False
    extra_cflags: tuple[str, ...] = field(default_factory=tuple)


def bpf_source(probe_set: ProbeSet) -> tuple[str, str]:
    """(C text, include dir) of a probe set, from the installed package."""
    root = importlib.resources.files("tcptrace.bpf")
    name = {ProbeSet.TRACEPOINT: "tracepoints.bpf.c", ProbeSet.KPROBE: "kprobes.bpf.c"}[probe_set]
    src = root.joinpath(name)
    if not src.is_file():
        raise KernelSupportError(f"BPF source {name} is missing from the installed package")
    return src.read_text(), str(root)


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
    flags += list(config.extra_cflags)
    return flags


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


class Capture:
    """Loaded and attached BPF programs for a set of target processes.

    Use as a context manager: leaving it detaches everything. The kernel also
    detaches our perf-event based attachments if this process dies, so even a
    SIGKILL leaves no probe behind.
    """

    def __init__(self, config: CaptureConfig, offsets: KernelOffsets | None = None) -> None:
        if os.geteuid() != 0:
            raise PermissionProblem(
                "tracing needs root (or CAP_BPF + CAP_PERFMON)", "run it with sudo"
            )
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
        self._handler: Callable[[SocketRecord], None] | None = None
        self._decode_errors = 0
        try:
            targets = self._bpf["targets"]
            for pid in config.pids:
                targets[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            self._socks = self._bpf["socks"]
            self._stacks = self._bpf["stacks"]
            self._stats = self._bpf["stats"]
            self._bpf["events"].open_ring_buffer(self._on_ring_record)
        except Exception:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
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

    # -- records ---------------------------------------------------------
    def _on_ring_record(self, _ctx: Any, data: Any, size: int) -> int:
        try:
            raw = RawSocketRecord.from_buffer_copy(ctypes.string_at(data, size))
            record = SocketRecord.from_raw(raw)
        except (ValueError, TypeError):
            self._decode_errors += 1
            return 0
        if self._handler is not None:
            self._handler(record)
        return 0

    def drain(self, handler: Callable[[SocketRecord], None]) -> None:
        """Hand every record waiting in the ring buffer to `handler`, without blocking."""
        self._handler = handler
        try:
            self._bpf.ring_buffer_consume()
        finally:
            self._handler = None

    def scan(self) -> list[SocketRecord]:
        """Every socket in the in-kernel ledger right now (batched map read)."""
        records: list[SocketRecord] = []
        for _key, value in self._iter_socks():
            raw = RawSocketRecord.from_buffer_copy(bytes(value))
            raw.kind = 6  # SNAPSHOT: the map holds BIRTH-kind values
            records.append(SocketRecord.from_raw(raw))
        return records

    def _iter_socks(self) -> Iterator[tuple[Any, Any]]:
        try:
            yield from self._socks.items_lookup_batch()
        except Exception:
            # Kernels without batched map ops: one key at a time (slower).
            yield from self._socks.items()

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
        return totals


@contextmanager
def capture(config: CaptureConfig) -> Iterator[Capture]:
    cap = Capture(config)
    try:
        yield cap
    finally:
        cap.close()
