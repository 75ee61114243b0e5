"""Records that cross from the kernel to user space, decoded.

`RawSocketRecord` mirrors `struct tt_record` of bpf/tcptrace.h, field for field;
tests/unit/test_layout.py compiles that header and pins every offset. Everything
else in user space works on the frozen `SocketRecord` decoded from it.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

LAYOUT_VERSION = 1
COMM_LEN = 16
ADDR_LEN = 16


class TcpState(enum.IntEnum):
    """Kernel TCP state numbering (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12

    @classmethod
    def from_kernel(cls, value: int) -> TcpState | None:
        try:
            return cls(value)
        except ValueError:
            return None


class RecordKind(enum.IntEnum):
    BIRTH = 1
    DEATH = 2
    EXIT = 3
    CLOSE_RANGE = 4
    FORK = 5
    SNAPSHOT = 6


class Direction(enum.Enum):
    CONNECT = "connect"
    ACCEPT = "accept"
    LISTEN = "listen"
    PREEXISTING = "preexisting"

    @classmethod
    def from_kernel(cls, value: int) -> Direction:
        return _DIRECTION_BY_CODE[value]


_DIRECTION_BY_CODE = {
    1: Direction.CONNECT,
    2: Direction.ACCEPT,
    3: Direction.LISTEN,
    4: Direction.PREEXISTING,
}
_DIRECTION_CODE = {d: code for code, d in _DIRECTION_BY_CODE.items()}


class RecordFlag(enum.IntFlag):
    FD_CLOSED = 1
    FD_UNKNOWN = 2
    REPLACED = 4
    TCP_CLOSED = 8
    UNTRACKED = 16


class KernelStat(enum.IntEnum):
    """Indexes of the BPF `stats` array (enum tt_stat)."""

    EVENTS_DROPPED = 0
    MAP_FULL = 1
    USTACK_FAILED = 2
    KSTACK_FAILED = 3
    ACCEPT_UNRESOLVED = 4
    FD_UNRESOLVED = 5
    SK_REUSED = 6
    BIRTHS = 7
    DEATHS = 8
    FD_CLOSES = 9
    TARGETS_FULL = 10
    RUNS_RESCUED = 11


KERNEL_STAT_COUNT = 12

# Counters of work done, not of anything lost: reported apart from the losses.
ACTIVITY_STATS = frozenset(
    {KernelStat.BIRTHS, KernelStat.DEATHS, KernelStat.FD_CLOSES, KernelStat.RUNS_RESCUED}
)


class RawSocketRecord(ctypes.Structure):
    """Byte-for-byte mirror of `struct tt_record`."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("birth_ns", ctypes.c_uint64),
        ("sk", ctypes.c_uint64),
        ("bytes_acked", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("state_ns", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("user_stack_id", ctypes.c_int32),
        ("kernel_stack_id", ctypes.c_int32),
        ("aux", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("lport", ctypes.c_uint16),
        ("rport", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8),
        ("laddr", ctypes.c_uint8 * ADDR_LEN),
        ("raddr", ctypes.c_uint8 * ADDR_LEN),
        ("comm", ctypes.c_char * COMM_LEN),
        ("_pad1", ctypes.c_uint32),
        ("_pad2", ctypes.c_uint32),
    ]


RECORD_SIZE = ctypes.sizeof(RawSocketRecord)
# The same layout for numpy, to decode records in bulk (ring buffer, map scans).
RECORD_DTYPE = np.dtype(RawSocketRecord)


# Cached: a host talks to few addresses, and 100k open sockets would otherwise
# hold 200k copies of the same few strings (~11 MB, issue 6).
@functools.lru_cache(maxsize=65536)
def format_address(family: int, raw: bytes) -> str:
    """Text form of an address as the kernel stores it (network order)."""
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return ""


@functools.lru_cache(maxsize=4096)
def _comm_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


_FAMILY_NAMES: dict[int, str] = {int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6"}


def family_name(family: int) -> str:
    return _FAMILY_NAMES.get(family, f"af{family}")


@dataclass(frozen=True, slots=True)
class SocketRecord:
    """One decoded `tt_record`: a birth, a death, a scan entry or a process event."""

    kind: RecordKind
    ts_ns: int
    sk: int
    tgid: int
    tid: int
    comm: str
    fd: int
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    state: TcpState | None
    direction: Direction | None
    flags: RecordFlag
    birth_ns: int
    state_ns: int
    user_stack_id: int
    kernel_stack_id: int
    bytes_acked: int
    bytes_received: int
    aux: int

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> SocketRecord:
        if len(data) < RECORD_SIZE:
            raise ValueError(f"record of {len(data)} bytes, expected {RECORD_SIZE}")
        raw = RawSocketRecord.from_buffer_copy(bytes(data[:RECORD_SIZE]))
        return cls.from_raw(raw)

    def to_raw(self) -> RawSocketRecord:
        """Back to the kernel layout (tests build scans and record streams with it)."""
        raw = RawSocketRecord()
        for name in (
            "ts_ns",
            "sk",
            "tgid",
            "tid",
            "fd",
            "family",
            "lport",
            "rport",
            "birth_ns",
            "state_ns",
            "user_stack_id",
            "kernel_stack_id",
            "bytes_acked",
            "bytes_received",
            "aux",
        ):
            setattr(raw, name, getattr(self, name))
        raw.kind = self.kind
        raw.state = self.state.value if self.state is not None else 0
        raw.direction = _DIRECTION_CODE[self.direction] if self.direction is not None else 0
        raw.flags = int(self.flags)
        raw.comm = self.comm.encode()[:COMM_LEN]
        for field, text in (("laddr", self.laddr), ("raddr", self.raddr)):
            if text:
                packed = ipaddress.ip_address(text).packed
                getattr(raw, field)[: len(packed)] = list(packed)
        return raw

    @classmethod
    def from_raw(cls, raw: RawSocketRecord) -> SocketRecord:
        kind = RecordKind(raw.kind)
        has_socket = kind in (RecordKind.BIRTH, RecordKind.DEATH, RecordKind.SNAPSHOT)
        return cls(
            kind=kind,
            ts_ns=raw.ts_ns,
            sk=raw.sk,
            tgid=raw.tgid,
            tid=raw.tid,
            comm=_comm_text(raw.comm),
            fd=raw.fd,
            family=raw.family,
            laddr=format_address(raw.family, bytes(raw.laddr)) if has_socket else "",
            lport=raw.lport,
            raddr=format_address(raw.family, bytes(raw.raddr)) if has_socket else "",
            rport=raw.rport,
            state=TcpState.from_kernel(raw.state) if has_socket else None,
            direction=Direction.from_kernel(raw.direction) if has_socket else None,
            flags=RecordFlag(raw.flags),
            birth_ns=raw.birth_ns,
            state_ns=raw.state_ns,
            user_stack_id=raw.user_stack_id,
            kernel_stack_id=raw.kernel_stack_id,
            bytes_acked=raw.bytes_acked,
            bytes_received=raw.bytes_received,
            aux=raw.aux,
        )


def records_array(records: Iterable[SocketRecord]) -> np.ndarray:
    """SocketRecords as RECORD_DTYPE rows, as a map scan returns them."""
    raw = b"".join(bytes(r.to_raw()) for r in records)
    return np.frombuffer(raw, dtype=RECORD_DTYPE).copy()
