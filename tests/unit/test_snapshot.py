"""tcptrace.snapshot without root: sock_diag message decoding, /proc parsing, the join.

The message dicts and raw netlink bytes below were recorded from a 6.18 kernel
(little-endian x86_64) with a process holding: an IPv4 listener on 127.0.0.1, a
dual-stack IPv6 listener on ::, an IPv4 CLOSE_WAIT socket whose peer had closed (the
peer then an orphan in FIN_WAIT2, inode 0), an IPv4 client of the IPv6 listener (its
accepted side IPv4-mapped) and an ::1 pair.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from tcptrace import snapshot
from tcptrace.errors import TargetError, TargetUnreadable
from tcptrace.events import Direction, TcpState
from tcptrace.snapshot import (
    KernelSocket,
    decode_inet_diag_msg,
    kernel_socket_from_msg,
    open_inodes,
    parse_socket_link,
    preexisting_connections,
    preexisting_key,
    socket_fds,
    sockets_by_inode,
    split_preexisting_key,
)
from tcptrace.sockets import StackStatus

# pyroute2 0.9.7 `MarshalDiag().parse(...)` of RAW_MESSAGES below (fields as decoded;
# addresses are inet_ntop text, so the mapped one reads "::ffff:127.0.0.1").
RECORDED_MSGS: list[dict[str, Any]] = [
    {
        "header": {"type": 20},
        "idiag_family": 2,
        "idiag_state": 10,
        "idiag_timer": 0,
        "idiag_retrans": 0,
        "idiag_sport": 49919,
        "idiag_dport": 0,
        "idiag_src": "127.0.0.1",
        "idiag_dst": "0.0.0.0",
        "idiag_if": 0,
        "idiag_cookie": 12310,
        "idiag_expires": 0,
        "idiag_rqueue": 0,
        "idiag_wqueue": 128,
        "idiag_uid": 0,
        "idiag_inode": 375216,
        "attrs": [
            ("INET_DIAG_SHUTDOWN", 0),
            ("INET_DIAG_MARK", "00:00:00:00"),
            ("INET_DIAG_CGROUP_ID", 1),
        ],
    },
    {
        "header": {"type": 20},
        "idiag_family": 2,
        "idiag_state": 8,
        "idiag_timer": 0,
        "idiag_retrans": 0,
        "idiag_sport": 57828,
        "idiag_dport": 49919,
        "idiag_src": "127.0.0.1",
        "idiag_dst": "127.0.0.1",
        "idiag_if": 0,
        "idiag_cookie": 12319,
        "idiag_expires": 0,
        "idiag_rqueue": 1,
        "idiag_wqueue": 0,
        "idiag_uid": 0,
        "idiag_inode": 375218,
    },
    {
        "header": {"type": 20},
        "idiag_family": 2,
        "idiag_state": 1,
        "idiag_timer": 0,
        "idiag_retrans": 0,
        "idiag_sport": 43772,
        "idiag_dport": 37129,
        "idiag_src": "127.0.0.1",
        "idiag_dst": "127.0.0.1",
        "idiag_if": 0,
        "idiag_cookie": 12324,
        "idiag_expires": 0,
        "idiag_rqueue": 0,
        "idiag_wqueue": 0,
        "idiag_uid": 0,
        "idiag_inode": 375220,
    },
    {
        "header": {"type": 20},
        "idiag_family": 2,
        "idiag_state": 5,
        "idiag_timer": 3,
        "idiag_retrans": 0,
        "idiag_sport": 49919,
        "idiag_dport": 57828,
        "idiag_src": "127.0.0.1",
        "idiag_dst": "127.0.0.1",
        "idiag_if": 0,
        "idiag_cookie": 14392,
        "idiag_expires": 59800,
        "idiag_rqueue": 0,
        "idiag_wqueue": 0,
        "idiag_uid": 0,
        "idiag_inode": 0,
    },
    {
        "header": {"type": 20},
        "idiag_family": 10,
        "idiag_state": 10,
        "idiag_timer": 0,
        "idiag_retrans": 0,
        "idiag_sport": 37129,
        "idiag_dport": 0,
        "idiag_src": "::",
        "idiag_dst": "::",
        "idiag_if": 0,
        "idiag_cookie": 14408,
        "idiag_expires": 0,
        "idiag_rqueue": 0,
        "idiag_wqueue": 128,
        "idiag_uid": 0,
        "idiag_inode": 375217,
    },
    {
        "header": {"type": 20},
        "idiag_family": 10,
        "idiag_state": 1,
        "idiag_timer": 0,
        "idiag_retrans": 0,
        "idiag_sport": 37129,
        "idiag_dport": 43772,
        "idiag_src": "::ffff:127.0.0.1",
        "idiag_dst": "::ffff:127.0.0.1",
        "idiag_if": 0,
        "idiag_cookie": 14409,
        "idiag_expires": 0,
        "idiag_rqueue": 0,
        "idiag_wqueue": 0,
        "idiag_uid": 0,
        "idiag_inode": 375380,
    },
    {
        "header": {"type": 20},
        "idiag_family": 10,
        "idiag_state": 1,
        "idiag_timer": 0,
        "idiag_retrans": 0,
        "idiag_sport": 37129,
        "idiag_dport": 40496,
        "idiag_src": "::1",
        "idiag_dst": "::1",
        "idiag_if": 0,
        "idiag_cookie": 14410,
        "idiag_expires": 0,
        "idiag_rqueue": 0,
        "idiag_wqueue": 0,
        "idiag_uid": 0,
        "idiag_inode": 375400,
    },
    {
        "header": {"type": 20},
        "idiag_family": 10,
        "idiag_state": 1,
        "idiag_timer": 0,
        "idiag_retrans": 0,
        "idiag_sport": 40496,
        "idiag_dport": 37129,
        "idiag_src": "::1",
        "idiag_dst": "::1",
        "idiag_if": 0,
        "idiag_cookie": 14411,
        "idiag_expires": 0,
        "idiag_rqueue": 0,
        "idiag_wqueue": 0,
        "idiag_uid": 0,
        "idiag_inode": 375389,
    },
]

MAPPED = str(ipaddress.ip_address("::ffff:127.0.0.1"))  # "::ffff:7f00:1" before 3.13

EXPECTED = [
    KernelSocket(
        375216, 12310, "ipv4", TcpState.LISTEN, "127.0.0.1", 49919, "0.0.0.0", 0, 0, 0, 128
    ),
    KernelSocket(
        375218, 12319, "ipv4", TcpState.CLOSE_WAIT, "127.0.0.1", 57828, "127.0.0.1", 49919, 0, 1, 0
    ),
    KernelSocket(
        375220, 12324, "ipv4", TcpState.ESTABLISHED, "127.0.0.1", 43772, "127.0.0.1", 37129, 0
    ),
    KernelSocket(0, 14392, "ipv4", TcpState.FIN_WAIT2, "127.0.0.1", 49919, "127.0.0.1", 57828, 0),
    KernelSocket(375217, 14408, "ipv6", TcpState.LISTEN, "::", 37129, "::", 0, 0, 0, 128),
    KernelSocket(375380, 14409, "ipv6", TcpState.ESTABLISHED, MAPPED, 37129, MAPPED, 43772, 0),
    KernelSocket(375400, 14410, "ipv6", TcpState.ESTABLISHED, "::1", 37129, "::1", 40496, 0),
    KernelSocket(375389, 14411, "ipv6", TcpState.ESTABLISHED, "::1", 40496, "::1", 37129, 0),
]

# The same eight SOCK_DIAG_BY_FAMILY messages as the kernel sent them (with NLAs).
RAW_MESSAGES = [
    bytes.fromhex(h)
    for h in (
        "7c0000001400020001000000091e0000020a0000c2ff00007f000001000000000000000000000000"
        "00000000000000000000000000000000000000001630000000000000000000000000000080000000"
        "00000000b0b90500050008000000000008000f00000000000c001500010000000000000006001600"
        "52000000",
        "7c0000001400020001000000091e000002080000e1e4c2ff7f000001000000000000000000000000"
        "7f000001000000000000000000000000000000001f30000000000000000000000100000000000000"
        "00000000b2b90500050008000100000008000f00000000000c001500010000000000000006001600"
        "52000000",
        "7c0000001400020001000000091e000002010000aafc91097f000001000000000000000000000000"
        "7f000001000000000000000000000000000000002430000000000000000000000000000000000000"
        "00000000b4b90500050008000000000008000f00000000000c001500010000000000000006001600"
        "52000000",
        "600000001400020001000000091e000002050300c2ffe1e47f000001000000000000000000000000"
        "7f00000100000000000000000000000000000000383800000000000098e900000000000000000000"
        "000000000000000008000f0000000000",
        "840000001400020001000000091e00000a0a00009109000000000000000000000000000000000000"
        "00000000000000000000000000000000000000004838000000000000000000000000000080000000"
        "00000000b1b90500050008000000000005000b000000000008000f00000000000c00150001000000"
        "000000000600160012000000",
        "7c0000001400020001000000091e00000a0100009109aafc00000000000000000000ffff7f000001"
        "00000000000000000000ffff7f000001000000004938000000000000000000000000000000000000"
        "0000000054ba0500050008000000000008000f00000000000c001500010000000000000006001600"
        "12000000",
        "7c0000001400020001000000091e00000a01000091099e3000000000000000000000000000000001"
        "00000000000000000000000000000001000000004a38000000000000000000000000000000000000"
        "0000000068ba0500050008000000000008000f00000000000c001500010000000000000006001600"
        "12000000",
        "7c0000001400020001000000091e00000a0100009e30910900000000000000000000000000000001"
        "00000000000000000000000000000001000000004b38000000000000000000000000000000000000"
        "000000005dba0500050008000000000008000f00000000000c001500010000000000000006001600"
        "12000000",
    )
]

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="recorded on a little-endian machine"
)


def _nlmsg(mtype: int, flags: int, payload: bytes, seq: int = 1) -> bytes:
    length = 16 + len(payload)
    pad = b"\0" * ((4 - length % 4) % 4)
    return struct.pack("=IHHII", length, mtype, flags, seq, 0) + payload + pad


# ----------------------------------------------------------------- message decoding


def test_recorded_pyroute2_dicts_become_kernel_sockets() -> None:
    assert [kernel_socket_from_msg(m) for m in RECORDED_MSGS] == EXPECTED


def test_mapped_address_is_spelled_like_events_format_address() -> None:
    from tcptrace.events import format_address

    raw = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
    got = kernel_socket_from_msg(RECORDED_MSGS[5])
    assert got is not None
    assert got.family == "ipv6"  # stays IPv6, not unmapped to 127.0.0.1
    assert got.laddr == format_address(socket.AF_INET6, raw) == MAPPED


@little_endian_only
def test_fast_decoder_agrees_with_pyroute2_decoder() -> None:
    from pyroute2.netlink.diag import MarshalDiag

    data = b"".join(RAW_MESSAGES)
    stock = [kernel_socket_from_msg(m) for m in MarshalDiag().parse(data)]
    offset, fast = 0, []
    for raw in RAW_MESSAGES:
        fast.append(kernel_socket_from_msg(decode_inet_diag_msg(data, offset)))
        offset += len(raw)
    assert stock == fast == EXPECTED


@little_endian_only
def test_fast_decoder_fields() -> None:
    msg = decode_inet_diag_msg(RAW_MESSAGES[3])
    assert msg["header"]["type"] == 20
    assert msg["header"]["length"] == len(RAW_MESSAGES[3])
    assert msg["idiag_state"] == TcpState.FIN_WAIT2
    assert msg["idiag_timer"] == 3
    assert msg["idiag_expires"] == 59800
    assert msg["idiag_src"] == bytes([127, 0, 0, 1]) + bytes(12)
    assert msg["idiag_cookie"] == 14392


def test_fast_decoder_reads_both_cookie_halves() -> None:
    body = struct.pack(
        "=BBBB2s2s16s16sIIIIIIII",
        socket.AF_INET,
        TcpState.ESTABLISHED,
        0,
        0,
        (80).to_bytes(2, "big"),
        (443).to_bytes(2, "big"),
        bytes([10, 0, 0, 1]) + bytes(12),
        bytes([10, 0, 0, 2]) + bytes(12),
        0,
        0x89ABCDEF,  # idiag_cookie[0]: low half
        0x01234567,  # idiag_cookie[1]: high half
        0,
        5,
        6,
        1000,
        4242,
    )
    msg = decode_inet_diag_msg(_nlmsg(20, 2, body))
    assert msg["idiag_cookie"] == 0x0123456789ABCDEF
    got = kernel_socket_from_msg(msg)
    assert got == KernelSocket(
        4242, 0x0123456789ABCDEF, "ipv4", TcpState.ESTABLISHED, "10.0.0.1", 80, "10.0.0.2", 443,
        1000, 5, 6,
    )  # fmt: skip


def test_fast_decoder_rejects_a_short_message() -> None:
    with pytest.raises(ValueError, match="too short"):
        decode_inet_diag_msg(_nlmsg(20, 2, b"\x02\x01"))


def test_messages_that_are_not_tcp_records_give_none() -> None:
    base = dict(RECORDED_MSGS[2])
    assert kernel_socket_from_msg({**base, "header": {"type": 3}}) is None  # NLMSG_DONE
    assert kernel_socket_from_msg({**base, "header": {"type": 2}}) is None  # NLMSG_ERROR
    assert kernel_socket_from_msg({**base, "idiag_family": socket.AF_UNIX}) is None
    assert kernel_socket_from_msg({"header": {"type": 2}}) is None
    assert kernel_socket_from_msg({**base, "idiag_state": 13}) is None  # unknown to us
    no_header = {k: v for k, v in base.items() if k != "header"}
    assert kernel_socket_from_msg(no_header) == EXPECTED[2]


def test_undecoded_address_words_are_accepted() -> None:
    msg = {**RECORDED_MSGS[6], "idiag_src": (0, 0, 0, 1), "idiag_dst": (0, 0, 0xFFFF, 0x7F000001)}
    got = kernel_socket_from_msg(msg)
    assert got is not None
    assert (got.laddr, got.raddr) == ("::1", MAPPED)
    with pytest.raises(ValueError):
        kernel_socket_from_msg({**msg, "idiag_src": 12})


# ------------------------------------------------------------------- the marshal


@little_endian_only
def test_fast_marshal_parses_a_dump_buffer() -> None:
    assert snapshot._fast_marshal_fits(), "pyroute2 changed parse_one_message: slow path in use"
    done = _nlmsg(3, 2, struct.pack("=i", 0))
    msgs = list(snapshot._FastDiagMarshal().parse(b"".join(RAW_MESSAGES) + done))
    socks = [kernel_socket_from_msg(m) for m in msgs]
    assert socks[:-1] == EXPECTED
    assert socks[-1] is None
    assert msgs[-1]["header"]["type"] == 3


def test_fast_marshal_raises_netlink_errors() -> None:
    # NLMSG_ERROR with -EINVAL: stock MarshalDiag would hand back an empty message.
    payload = struct.pack("=i", -errno.EINVAL) + struct.pack("=IHHII", 72, 20, 0x301, 1, 0)
    (msg,) = snapshot._FastDiagMarshal().parse(_nlmsg(2, 0, payload))
    error = msg["header"]["error"]
    assert isinstance(error, OSError)
    assert error.errno == errno.EINVAL
    assert kernel_socket_from_msg(msg) is None


def test_fast_marshal_raises_on_a_done_carrying_an_error() -> None:
    # What the kernel sends for a protocol without a diag handler.
    (msg,) = snapshot._FastDiagMarshal().parse(_nlmsg(3, 2, struct.pack("=i", -errno.ENOENT)))
    error = msg["header"]["error"]
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOENT
    (ok,) = snapshot._FastDiagMarshal().parse(_nlmsg(3, 2, struct.pack("=i", 0)))
    assert ok["header"]["type"] == 3
    assert ok["header"].get("error") is None


def test_dump_family_treats_missing_ipv6_as_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    class Failing:
        def get_sock_stats(self, **_: object) -> tuple[object, ...]:
            raise OSError(errno.ENOENT, "no handler")

    assert snapshot._dump_family(Failing(), socket.AF_INET6, snapshot.ALL_STATES) == []  # type: ignore[arg-type]
    from tcptrace.errors import KernelSupportError

    with pytest.raises(KernelSupportError):
        snapshot._dump_family(Failing(), socket.AF_INET, snapshot.ALL_STATES)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- /proc


@pytest.mark.parametrize(
    ("target", "inode"),
    [
        ("socket:[12345]", 12345),
        ("socket:[0]", 0),
        ("socket:[4294967295]", 4294967295),
        ("pipe:[12345]", None),
        ("anon_inode:[eventpoll]", None),
        ("/dev/null", None),
        ("/tmp/socket:[1]", None),
        ("socket:[12]x", None),
        ("socket:[]", None),
    ],
)
def test_parse_socket_link(target: str, inode: int | None) -> None:
    assert parse_socket_link(target) == inode


def _fake_proc(root: Path, pid: int, links: dict[str, str], comm: str = "server") -> None:
    fd_dir = root / str(pid) / "fd"
    fd_dir.mkdir(parents=True)
    for name, target in links.items():
        (fd_dir / name).symlink_to(target)
    (root / str(pid) / "comm").write_text(comm + "\n")


def test_socket_fds_maps_inodes_to_lowest_fd(tmp_path: Path) -> None:
    _fake_proc(
        tmp_path,
        100,
        {
            "0": "/dev/null",
            "3": "socket:[500]",
            "4": "pipe:[77]",
            "7": "socket:[501]",
            "5": "socket:[501]",  # dup'd: the lowest fd wins
            "9": "socket:[502]",
        },
    )
    (tmp_path / "100" / "fd" / "notanfd").write_text("")
    assert socket_fds(100, proc=str(tmp_path)) == {500: 3, 501: 5, 502: 9}


def test_socket_fds_of_a_missing_pid_raises(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="999"):
        socket_fds(999, proc=str(tmp_path))


def test_socket_fds_of_a_missing_pid_raises_on_real_proc() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    with pytest.raises(TargetError):
        socket_fds(pid_max + 1)


def test_socket_fds_skips_fds_that_vanish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_proc(tmp_path, 100, {"3": "socket:[500]", "4": "socket:[501]"})
    real_readlink = os.readlink

    def flaky(path: str | os.PathLike[str]) -> str:
        if str(path).endswith("/4"):
            raise FileNotFoundError(errno.ENOENT, "gone", str(path))
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", flaky)
    assert socket_fds(100, proc=str(tmp_path)) == {500: 3}


def test_socket_fds_of_own_process() -> None:
    with socket.socket() as s:
        inode = os.fstat(s.fileno()).st_ino
        assert socket_fds(os.getpid()).get(inode) == s.fileno()


def test_open_inodes_gone_pid_holds_nothing(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 100, {"3": "socket:[500]", "4": "socket:[501]"})
    assert open_inodes([100, 101], proc=str(tmp_path)) == {100: {500, 501}, 101: set()}


# --------------------------------------------------------------------------- keys


def test_preexisting_keys_are_negative_unique_and_invertible() -> None:
    keys = {preexisting_key(pid, ino) for pid in (1, 2, 4194304) for ino in (1, 2, 2**32 - 1)}
    assert len(keys) == 9
    assert all(k < 0 for k in keys)
    assert split_preexisting_key(preexisting_key(4194304, 2**32 - 1)) == (4194304, 2**32 - 1)
    assert split_preexisting_key(preexisting_key(1, 1)) == (1, 1)
    assert all(k >= -(2**63) for k in keys)  # fits a signed 64-bit column


@pytest.mark.parametrize(("pid", "inode"), [(0, 1), (1, 0), (1, 2**32), (-1, 5)])
def test_preexisting_key_rejects_nonsense(pid: int, inode: int) -> None:
    with pytest.raises(ValueError):
        preexisting_key(pid, inode)
    with pytest.raises(ValueError):
        split_preexisting_key(5)


# --------------------------------------------------------------------------- the join


def _with_fake_dump(
    monkeypatch: pytest.MonkeyPatch, sockets: list[KernelSocket]
) -> list[str | None]:
    calls: list[str | None] = []

    def fake(netns: str | None = None, states: int = snapshot.ALL_STATES) -> list[KernelSocket]:
        assert states == snapshot.HELD_STATES  # TIME_WAIT and NEW_SYN_RECV left in the kernel
        calls.append(netns)
        return list(sockets)

    monkeypatch.setattr(snapshot, "list_tcp_sockets", fake)
    return calls


def test_preexisting_connections_join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_proc(
        tmp_path,
        100,
        {
            "3": f"socket:[{EXPECTED[0].inode}]",  # listener
            "4": f"socket:[{EXPECTED[1].inode}]",  # CLOSE_WAIT
            "6": f"socket:[{EXPECTED[6].inode}]",  # ::1 established
            "8": "socket:[999]",  # a UDP or unix socket: not in the TCP dump
            "9": "/dev/null",
        },
        comm="my server",
    )
    calls = _with_fake_dump(monkeypatch, EXPECTED)
    conns = preexisting_connections([100, 100], now=1000.5, proc=str(tmp_path))
    assert calls == [None]  # one dump, our own namespace
    assert [(c.fd, c.state, c.family, c.lport, c.rport) for c in conns] == [
        (3, TcpState.LISTEN, "ipv4", 49919, 0),
        (4, TcpState.CLOSE_WAIT, "ipv4", 57828, 49919),
        (6, TcpState.ESTABLISHED, "ipv6", 37129, 40496),
    ]
    for conn, sock in zip(conns, (EXPECTED[0], EXPECTED[1], EXPECTED[6]), strict=True):
        assert conn.key == preexisting_key(100, sock.inode) < 0
        assert (conn.pid, conn.tid, conn.comm) == (100, 100, "my server")
        assert (conn.laddr, conn.raddr) == (sock.laddr, sock.raddr)
        assert conn.direction is Direction.PREEXISTING
        assert conn.opened_at is None
        assert conn.first_seen == 1000.5
        assert conn.stack == ()
        assert conn.stack_status is StackStatus.UNKNOWN
        assert conn.is_open and not conn.fd_closed


def test_shared_socket_appears_under_each_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inode = EXPECTED[0].inode
    _fake_proc(tmp_path, 100, {"3": f"socket:[{inode}]"}, comm="parent")
    _fake_proc(tmp_path, 101, {"5": f"socket:[{inode}]"}, comm="child")
    _with_fake_dump(monkeypatch, EXPECTED)
    conns = preexisting_connections([100, 101], now=1.0, proc=str(tmp_path))
    assert [(c.pid, c.fd, c.comm) for c in conns] == [(100, 3, "parent"), (101, 5, "child")]
    assert len({c.key for c in conns}) == 2


def test_missing_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_proc(tmp_path, 100, {"3": f"socket:[{EXPECTED[0].inode}]"})
    _with_fake_dump(monkeypatch, EXPECTED)
    with pytest.raises(TargetError):
        preexisting_connections([100, 555], now=1.0, proc=str(tmp_path))
    conns = preexisting_connections([555, 100], now=1.0, proc=str(tmp_path), missing_ok=True)
    assert [c.pid for c in conns] == [100]


def test_process_without_sockets_needs_no_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_proc(tmp_path, 100, {"0": "/dev/null"})
    calls = _with_fake_dump(monkeypatch, EXPECTED)
    assert preexisting_connections([100], now=1.0, proc=str(tmp_path)) == []
    assert calls == []


def test_tcp_socket_unseen_by_sock_diag_is_reported_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_proc(tmp_path, 100, {"3": "socket:[700]", "4": "socket:[701]", "5": "socket:[702]"})
    _with_fake_dump(monkeypatch, EXPECTED)
    names = {"/3": b"TCPv6\0", "/4": b"UDP\0", "/5": b"TCP\0"}

    def fake_getxattr(path: str, attr: str) -> bytes:
        assert attr == "system.sockprotoname"
        return names[path[path.rindex("/") :]]

    monkeypatch.setattr(os, "getxattr", fake_getxattr)
    conns = preexisting_connections([100], now=1.0, proc=str(tmp_path))
    assert [(c.fd, c.family, c.state, c.laddr, c.lport) for c in conns] == [
        (3, "ipv6", TcpState.CLOSE, "", 0),
        (5, "ipv4", TcpState.CLOSE, "", 0),
    ]


def test_sockets_by_inode_drops_inode_zero() -> None:
    by_inode = sockets_by_inode(EXPECTED)
    assert 0 not in by_inode
    assert len(by_inode) == len(EXPECTED) - 1
    assert by_inode[375218].state is TcpState.CLOSE_WAIT


def test_a_process_that_became_unreadable_is_unknown_not_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 7: a target that drops privileges mid-trace (another user, not dumpable):
    # without CAP_SYS_PTRACE its fds cannot be read. That must not read as "no sockets".
    _fake_proc(tmp_path, 100, {"3": "socket:[500]"})
    _fake_proc(tmp_path, 101, {"3": "socket:[600]"})
    real_readlink = os.readlink

    def denied(path: str | os.PathLike[str]) -> str:
        if "/101/" in str(path):
            raise PermissionError(errno.EACCES, "denied", str(path))
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", denied)
    with pytest.raises(TargetUnreadable, match="101"):
        socket_fds(101, proc=str(tmp_path))
    unreadable: set[int] = set()
    monkeypatch.setattr(snapshot, "list_tcp_sockets", lambda netns=None, states=0: [])
    monkeypatch.setattr(snapshot, "_netns_of", lambda pid, proc: None)
    monkeypatch.setattr(snapshot, "held_tcp_inodes", lambda *a, **k: {500: socket.AF_INET})
    got = snapshot.preexisting_connections(
        [100, 101], 1.0, missing_ok=True, proc=str(tmp_path), unreadable=unreadable
    )
    assert unreadable == {101}
    assert [(c.pid, c.fd) for c in got] == [(100, 3)]
