"""The TCP sockets that exist right now: sock_diag joined with /proc/PID/fd.

Tracing only sees sockets born after it starts. This module takes the census of
what a process already holds at that moment, so the ledger can account for it as
PREEXISTING (no stack, age a lower bound), and later reconcile which of those the
process still holds.

Two sources, joined by socket inode:

* the kernel's sock_diag netlink interface (through pyroute2's `DiagSocket`), for
  every TCP socket of a network namespace: state, addresses, queues, cookie;
* /proc/PID/fd, whose socket links ("socket:[INODE]") say which process holds which
  socket under which fd.

A TCP socket that no hash table holds any more (connect() refused, reset by the peer,
never bound) is invisible to sock_diag, yet the process may still hold its fd: the
"fd on a closed socket" leak. Such fds are found by the socket's protocol name (the
`system.sockprotoname` xattr of the fd) and reported in state CLOSE with unknown
addresses.

This is the only module of the project that imports pyroute2.

Addresses are text as `tcptrace.events.format_address` writes them (Python's
`ipaddress`), so a snapshot and a traced record of the same socket agree. An
IPv4-mapped IPv6 address stays an IPv6 address; its exact spelling is ipaddress's
on the running interpreter ("::ffff:7f00:1" before Python 3.13).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import inspect
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import DiagSocket
from pyroute2.netlink import NETLINK_SOCK_DIAG
from pyroute2.netlink.diag import MarshalDiag
from pyroute2.netlink.nlsocket import NetlinkSocket

from tcptrace.errors import KernelSupportError, TargetError, TargetUnreadable
from tcptrace.events import Direction, TcpState, family_name, format_address
from tcptrace.sockets import Connection, StackStatus

__all__ = [
    "ALL_STATES",
    "KernelSocket",
    "decode_inet_diag_msg",
    "held_tcp_inodes",
    "kernel_socket_from_msg",
    "list_tcp_sockets",
    "open_inodes",
    "parse_socket_link",
    "preexisting_connections",
    "preexisting_key",
    "socket_fds",
    "sockets_by_inode",
    "split_preexisting_key",
]

PROC = "/proc"

SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3

# Every state bit. pyroute2's SS_ALL stops at bit 11: it misses NEW_SYN_RECV (12) and
# the bound-inactive pseudo state (13, kernel >= 6.8), under which the kernel reports
# sockets that are bound but neither listening nor connected (in state CLOSE).
ALL_STATES = 0xFFFFFFFF
# States a socket held by a file descriptor can be in: not TIME_WAIT (6) nor
# NEW_SYN_RECV (12), whose mini-sockets have no inode. Left out in the kernel, a dump
# for the preexisting snapshot skips what it would throw away: on a host churning
# 2,000 connections/s that is ~120,000 TIME_WAIT entries, 100+ MB decoded in
# Python at the end of a trace (issue 7, soak).
HELD_STATES: Final = ALL_STATES & ~((1 << 6) | (1 << 12))

_NLMSG_HEADER = struct.Struct("=IHHII")
# struct inet_diag_msg: family, state, timer, retrans, sport(be), dport(be),
# src[16], dst[16], if, cookie[2] (two native u32), expires, rqueue, wqueue, uid, inode.
_INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
_INET_DIAG_MSG_MIN_LEN = _NLMSG_HEADER.size + _INET_DIAG_MSG.size

# Socket inodes the sockprotoname xattr names as TCP over IPv4 / IPv6 ("MPTCP" is not).
_TCP_PROTONAMES = {"TCP": "ipv4", "TCPv6": "ipv6"}

_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]\Z")


@dataclass(frozen=True, slots=True)
class KernelSocket:
    """One TCP socket as sock_diag reports it.

    `inode` is 0 for sockets no file refers to (TIME_WAIT, request sockets, orphans).
    `cookie` is the kernel socket cookie (what bpf_get_socket_cookie() returns); 0
    when unknown. For a LISTEN socket `rqueue` is the accept backlog and `wqueue` its
    limit; otherwise they are the bytes queued to read / not yet acknowledged.
    """

    inode: int
    cookie: int
    family: str  # "ipv4" | "ipv6"
    state: TcpState
    laddr: str
    lport: int
    raddr: str
    rport: int
    uid: int
    rqueue: int = 0
    wqueue: int = 0


# --------------------------------------------------------------------------- parsing


@functools.lru_cache(maxsize=4096)
def _address_from_bytes(family: int, raw: bytes) -> str:
    return format_address(family, raw)


@functools.lru_cache(maxsize=4096)
def _address_from_text(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _address(family: int, value: object) -> str:
    """Canonical text of a sock_diag address, whichever decoder produced it."""
    if isinstance(value, bytes | bytearray):
        return _address_from_bytes(family, bytes(value))
    if isinstance(value, str):
        # pyroute2 decodes with inet_ntop: "::ffff:127.0.0.1" for a mapped address.
        return _address_from_text(value)
    if isinstance(value, tuple | list) and len(value) == 4:
        # Undecoded '>4I' field (pyroute2 before it converts it to text).
        raw = struct.pack(">4I", *value)
        return _address_from_bytes(family, raw)
    raise ValueError(f"cannot read an address from {value!r}")


def kernel_socket_from_msg(msg: Mapping[str, Any]) -> KernelSocket | None:
    """A `KernelSocket` from one decoded sock_diag message, or None if it is not one.

    Accepts pyroute2's own decoded `inet_diag_msg` (dict-like, addresses as text) and
    the dicts of `decode_inet_diag_msg` (addresses as raw bytes). Messages that are
    not socket records (errors, NLMSG_DONE), of another family, or in a state the
    kernel numbering does not know give None.
    """
    header = msg.get("header")
    if isinstance(header, Mapping) and header.get("type", SOCK_DIAG_BY_FAMILY) != (
        SOCK_DIAG_BY_FAMILY
    ):
        return None
    family = msg.get("idiag_family")
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    state = TcpState.from_kernel(int(msg["idiag_state"]))
    if state is None:
        return None
    return KernelSocket(
        inode=int(msg["idiag_inode"]),
        cookie=int(msg.get("idiag_cookie", 0)),
        family=family_name(family),
        state=state,
        laddr=_address(family, msg["idiag_src"]),
        lport=int(msg["idiag_sport"]),
        raddr=_address(family, msg["idiag_dst"]),
        rport=int(msg["idiag_dport"]),
        uid=int(msg.get("idiag_uid", 0)),
        rqueue=int(msg.get("idiag_rqueue", 0)),
        wqueue=int(msg.get("idiag_wqueue", 0)),
    )


def decode_inet_diag_msg(data: bytes, offset: int = 0) -> dict[str, Any]:
    """Decode the netlink message at `offset` as an inet_diag_msg, without its NLAs.

    Returns a dict with pyroute2's field names ("header", "idiag_family", ...), the
    addresses as 16 raw bytes in network order. About five times faster than
    pyroute2's generic decoder, which also decodes every attribute.
    """
    length, mtype, flags, seq, pid = _NLMSG_HEADER.unpack_from(data, offset)
    if length < _INET_DIAG_MSG_MIN_LEN or offset + _INET_DIAG_MSG_MIN_LEN > len(data):
        raise ValueError(f"inet_diag_msg of {length} bytes is too short")
    (
        family,
        state,
        timer,
        retrans,
        sport,
        dport,
        src,
        dst,
        ifindex,
        cookie_lo,
        cookie_hi,
        expires,
        rqueue,
        wqueue,
        uid,
        inode,
    ) = _INET_DIAG_MSG.unpack_from(data, offset + _NLMSG_HEADER.size)
    return {
        "header": {
            "length": length,
            "type": mtype,
            "flags": flags,
            "sequence_number": seq,
            "pid": pid,
            "error": None,
        },
        "idiag_family": family,
        "idiag_state": state,
        "idiag_timer": timer,
        "idiag_retrans": retrans,
        "idiag_sport": int.from_bytes(sport, "big"),
        "idiag_dport": int.from_bytes(dport, "big"),
        "idiag_src": src,
        "idiag_dst": dst,
        "idiag_if": ifindex,
        # __u32 idiag_cookie[2]: [0] holds the low half.
        "idiag_cookie": cookie_lo | (cookie_hi << 32),
        "idiag_expires": expires,
        "idiag_rqueue": rqueue,
        "idiag_wqueue": wqueue,
        "idiag_uid": uid,
        "idiag_inode": inode,
    }


def parse_socket_link(target: str) -> int | None:
    """The inode of a /proc/PID/fd link target "socket:[N]", or None for other files."""
    match = _SOCKET_LINK.match(target)
    return int(match.group(1)) if match else None


def preexisting_key(pid: int, inode: int) -> int:
    """Synthetic ledger key of a preexisting socket: negative, unique per (pid, inode).

    The ledger keys traced sockets by their (positive) struct sock address; these
    never collide with them. Inodes of sockets fit 32 bits (sock_diag carries them as
    u32), pids fit 22.
    """
    if pid <= 0 or not 0 < inode < (1 << 32):
        raise ValueError(f"no preexisting key for pid {pid}, inode {inode}")
    return -((pid << 32) | inode)


def split_preexisting_key(key: int) -> tuple[int, int]:
    """(pid, inode) of a key made by `preexisting_key`."""
    if key >= 0:
        raise ValueError(f"{key} is not a preexisting key")
    value = -key
    return value >> 32, value & 0xFFFFFFFF


# ------------------------------------------------------------------------ sock_diag


class _FastDiagMarshal(MarshalDiag):  # type: ignore[misc]
    """MarshalDiag that decodes TCP records with `decode_inet_diag_msg`.

    Also turns kernel errors into a raised OSError. MarshalDiag disables error
    parsing (its error_type is -1, because the family byte it dispatches on is not
    the message type), so an NLMSG_ERROR would come back as an empty message; and a
    dump the kernel cannot do at all (no diag handler for the protocol) ends with an
    NLMSG_DONE carrying -ENOENT, which pyroute2 takes for an empty dump.
    """

    def parse_one_message(
        self, key: int, flags: int, sequence_number: int, data: bytes, offset: int, length: int
    ) -> Any:
        (mtype,) = struct.unpack_from("=H", data, offset + 4)
        if (
            mtype == SOCK_DIAG_BY_FAMILY
            and key in (socket.AF_INET, socket.AF_INET6)
            and length >= _INET_DIAG_MSG_MIN_LEN
        ):
            return decode_inet_diag_msg(data, offset)
        if mtype in (NLMSG_ERROR, NLMSG_DONE) and length >= _NLMSG_HEADER.size + 4:
            (code,) = struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)
            error = OSError(-code, os.strerror(-code)) if code < 0 else None
            if mtype == NLMSG_DONE and error is None:
                return super().parse_one_message(key, flags, sequence_number, data, offset, length)
            return {
                "header": {
                    "length": length,
                    "type": mtype,
                    "flags": flags,
                    "sequence_number": sequence_number,
                    "error": error,
                }
            }
        return super().parse_one_message(key, flags, sequence_number, data, offset, length)


def _fast_marshal_fits() -> bool:
    """Whether this pyroute2 calls parse_one_message the way _FastDiagMarshal expects."""
    try:
        params = list(inspect.signature(MarshalDiag.parse_one_message).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["self", "key", "flags", "sequence_number", "data", "offset", "length"]


_USE_FAST_MARSHAL = _fast_marshal_fits()


class _DiagSocket(DiagSocket):  # type: ignore[misc]
    """DiagSocket that can be opened in another network namespace.

    pyroute2's DiagSocket takes no `netns`; NetlinkSocket does (it forks a child that
    enters the namespace and passes the socket back).
    """

    def __init__(self, netns: str | None = None) -> None:
        if netns is None:
            DiagSocket.__init__(self)
        else:
            # flags=0: never create a namespace that is not there.
            NetlinkSocket.__init__(self, NETLINK_SOCK_DIAG, netns=netns, flags=0)
        self.set_marshal(_FastDiagMarshal() if _USE_FAST_MARSHAL else MarshalDiag())


def _dump_family(ds: _DiagSocket, family: int, states: int) -> list[KernelSocket]:
    try:
        messages = ds.get_sock_stats(
            family=family, states=states, protocol=socket.IPPROTO_TCP, extensions=0
        )
    except OSError as exc:
        if exc.errno == errno.ENOENT and family == socket.AF_INET6:
            return []  # IPv6 disabled: no inet6 diag handler, and no IPv6 sockets
        if exc.errno == errno.ENOENT:
            raise KernelSupportError(
                "sock_diag cannot dump TCP sockets",
                hint="the kernel lacks CONFIG_INET_DIAG/tcp_diag (try: modprobe tcp_diag)",
            ) from exc
        raise
    result = []
    for msg in messages:
        sock = kernel_socket_from_msg(msg)
        if sock is not None:
            result.append(sock)
    return result


def list_tcp_sockets(netns: str | None = None, states: int = ALL_STATES) -> list[KernelSocket]:
    """Every TCP socket (IPv4 and IPv6) of a network namespace in `states` (a bit
    mask of TCP states, 1 << state; all by default).

    `netns` is the path of a namespace file (e.g. "/proc/PID/ns/net"); None means our
    own namespace. Sockets may come and go during the dump: each one is consistent in
    itself, the list as a whole is not an atomic picture.

    Safe to call from a thread running an asyncio loop (pyroute2's synchronous API
    runs a loop of its own, which cannot nest: the dump then runs in a worker thread).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _list_tcp_sockets(netns, states)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sock_diag") as pool:
        return pool.submit(_list_tcp_sockets, netns, states).result()


def _list_tcp_sockets(netns: str | None, states: int) -> list[KernelSocket]:
    try:
        ds = _DiagSocket(netns)
    except OSError as exc:
        if netns is not None:
            denied = exc.errno in (errno.EPERM, errno.EACCES)
            raise TargetError(
                f"cannot enter network namespace {netns}: {exc}",
                hint="entering another namespace needs CAP_SYS_ADMIN" if denied else "",
            ) from exc
        raise KernelSupportError(f"cannot open a sock_diag netlink socket: {exc}") from exc
    except RuntimeError as exc:  # pyroute2's netns helper process died
        if netns is None:
            raise
        raise TargetError(f"cannot enter network namespace {netns}: {exc}") from exc
    with ds:
        ds.bind()
        return _dump_family(ds, socket.AF_INET, states) + _dump_family(ds, socket.AF_INET6, states)


def sockets_by_inode(sockets: Iterable[KernelSocket] | None = None) -> dict[int, KernelSocket]:
    """Sockets that a file refers to (inode != 0), by inode; dumps them if not given."""
    if sockets is None:
        sockets = list_tcp_sockets(states=HELD_STATES)
    return {s.inode: s for s in sockets if s.inode}


# --------------------------------------------------------------------------- /proc


def socket_fds(pid: int, *, proc: str = PROC) -> dict[int, int]:
    """inode -> fd of every socket process `pid` holds (the lowest fd if dup'd).

    Fds closed while we read are skipped. Raises TargetError if the process does not
    exist or its fds cannot be read.
    """
    fd_dir = os.path.join(proc, str(pid), "fd")
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError as exc:
        raise TargetError(f"no process with pid {pid}") from exc
    except PermissionError as exc:
        raise TargetUnreadable(
            f"cannot read the fds of pid {pid}", hint="run as root or as the process owner"
        ) from exc
    except OSError as exc:  # e.g. ESRCH on a process being reaped
        raise TargetError(f"cannot read the fds of pid {pid}: {exc}") from exc
    result: dict[int, int] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except PermissionError as exc:  # it became unreadable since listdir
            raise TargetUnreadable(
                f"cannot read the fds of pid {pid}", hint="run as root or as the process owner"
            ) from exc
        except OSError:
            continue  # closed since listdir (ENOENT) or the process is exiting
        inode = parse_socket_link(target)
        if inode is None:
            continue
        fd = int(name)
        if inode not in result or fd < result[inode]:
            result[inode] = fd
    return result


def open_inodes(pids: Iterable[int], *, proc: str = PROC) -> dict[int, set[int]]:
    """pid -> inodes of the sockets it holds now, for reconciling preexisting sockets.

    A process that is gone holds nothing: it maps to an empty set, no error.
    """
    result: dict[int, set[int]] = {}
    for pid in pids:
        try:
            result[pid] = set(socket_fds(pid, proc=proc))
        except TargetError:
            result[pid] = set()
    return result


def _tcp_protoname_family(pid: int, fd: int, inode: int, proc: str) -> str | None:
    """Family of fd `fd` of `pid` if it is TCP socket `inode` (by sockprotoname), else None.

    The link is read before and after the xattr, so an fd closed and reused for
    another socket meanwhile is not mistaken for `inode`.
    """
    path = os.path.join(proc, str(pid), "fd", str(fd))
    try:
        if parse_socket_link(os.readlink(path)) != inode:
            return None
        raw = os.getxattr(path, "system.sockprotoname")
        if parse_socket_link(os.readlink(path)) != inode:
            return None
    except OSError:
        return None
    return _TCP_PROTONAMES.get(raw.rstrip(b"\0").decode("ascii", "replace"))


def held_tcp_inodes(
    pid: int, fds: Mapping[int, int], known: Mapping[int, KernelSocket], *, proc: str = PROC
) -> dict[int, str]:
    """inode -> family of the TCP sockets in `fds` (inode -> fd) missing from `known`.

    These are TCP sockets sock_diag cannot see because no hash table holds them any
    more (or yet): closed after a reset or a refused connect, or never bound.
    """
    result: dict[int, str] = {}
    for inode, fd in fds.items():
        if inode in known:
            continue
        family = _tcp_protoname_family(pid, fd, inode, proc)
        if family is not None:
            result[inode] = family
    return result


def _read_comm(pid: int, proc: str) -> str:
    with open(os.path.join(proc, str(pid), "comm"), encoding="utf-8", errors="replace") as f:
        return f.read().rstrip("\n")


def _netns_of(pid: int, proc: str) -> str | None:
    """Path of pid's network namespace if it is not ours, else None (also if unknown)."""
    path = os.path.join(proc, str(pid), "ns", "net")
    try:
        theirs = os.stat(path)
        ours = os.stat(os.path.join(proc, "self", "ns", "net"))
    except OSError:
        return None
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return None
    return path


def _netns_id(netns: str | None) -> tuple[int, int] | None:
    if netns is None:
        return None
    try:
        st = os.stat(netns)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True, slots=True)
class _Holder:
    pid: int
    comm: str
    fds: dict[int, int]  # inode -> fd
    netns: str | None  # None: our own namespace


def _holder(pid: int, proc: str) -> _Holder:
    fds = socket_fds(pid, proc=proc)
    try:
        comm = _read_comm(pid, proc)
    except OSError as exc:
        raise TargetError(f"process {pid} exited while we read it") from exc
    return _Holder(pid, comm, fds, _netns_of(pid, proc) if fds else None)


def preexisting_connections(
    pids: Iterable[int],
    now: float,
    *,
    missing_ok: bool = False,
    proc: str = PROC,
    unreadable: set[int] | None = None,
) -> list[Connection]:
    """The TCP sockets the given processes hold right now, as PREEXISTING connections.

    One Connection per (pid, socket): a socket shared by two processes (inherited
    over fork) appears under both. Listening sockets are included. A process in
    another network namespace is looked up in its own namespace (which needs the
    right to enter it). A TCP socket the process holds but sock_diag does not show is
    reported in state CLOSE with empty addresses and ports 0.

    The fds are read before the sockets are dumped, so a socket opened in between is
    left out (tracing sees it born) rather than mistaken for a closed one.

    Raises TargetError for a pid that does not exist (or vanishes while we read it),
    unless `missing_ok`, which skips it. A pid that exists but whose fds may not be
    read any more (it became another user's, or non-dumpable) is skipped too, and added
    to `unreadable`: its sockets are unknown, not closed.
    """
    holders: list[_Holder] = []
    for pid in dict.fromkeys(pids):
        try:
            holders.append(_holder(pid, proc))
        except TargetError as exc:
            if not missing_ok:
                raise
            if isinstance(exc, TargetUnreadable) and unreadable is not None:
                unreadable.add(pid)
    dumps: dict[tuple[int, int] | None, dict[int, KernelSocket]] = {}
    result: list[Connection] = []
    for holder in holders:
        if not holder.fds:
            continue
        ns_key = _netns_id(holder.netns)
        if ns_key not in dumps:
            dumps[ns_key] = sockets_by_inode(list_tcp_sockets(holder.netns, HELD_STATES))
        known = dumps[ns_key]
        unseen = held_tcp_inodes(holder.pid, holder.fds, known, proc=proc)
        for inode, fd in sorted(holder.fds.items(), key=lambda item: item[1]):
            sock = known.get(inode)
            if sock is not None:
                family, state = sock.family, sock.state
                laddr, lport, raddr, rport = sock.laddr, sock.lport, sock.raddr, sock.rport
            elif inode in unseen:
                family, state = unseen[inode], TcpState.CLOSE
                laddr, lport, raddr, rport = "", 0, "", 0
            else:
                continue  # not a TCP socket
            result.append(
                Connection(
                    key=preexisting_key(holder.pid, inode),
                    pid=holder.pid,
                    tid=holder.pid,
                    comm=holder.comm,
                    fd=fd,
                    family=family,
                    laddr=laddr,
                    lport=lport,
                    raddr=raddr,
                    rport=rport,
                    state=state,
                    direction=Direction.PREEXISTING,
                    opened_at=None,
                    first_seen=now,
                    stack=(),
                    stack_status=StackStatus.UNKNOWN,
                )
            )
    return result
