"""The ledger as a pure state machine, driven by recorded record sequences."""

from __future__ import annotations

import dataclasses

from tcptrace.events import (
    Direction,
    RawSocketRecord,
    RecordFlag,
    RecordKind,
    SocketRecord,
    TcpState,
    records_array,
)
from tcptrace.ledger import Ledger
from tcptrace.sockets import CloseCause, Connection, LeakClass, StackStatus, classify, is_leak

S = 1_000_000_000  # ns per second


class FakeClock:
    def __init__(self) -> None:
        self.wall = 1_000_000.0

    def to_epoch(self, monotonic_ns: int) -> float:
        return 1_000_000.0 + monotonic_ns / 1e9

    def now(self) -> float:
        return self.wall


class FakeStacks:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def resolve(
        self, tgid: int, stack_id: int, kernel_stack_id: int = -1
    ) -> tuple[tuple[str, ...], StackStatus]:
        self.calls.append((tgid, stack_id))
        if stack_id < 0:
            return (), StackStatus.FAILED
        return ("main.main", f"main.site{stack_id}"), StackStatus.OK


def rec(
    kind: RecordKind, sk: int = 0, t: float = 0.0, tgid: int = 100, **kw: object
) -> SocketRecord:
    base: dict[str, object] = dict(
        kind=kind,
        ts_ns=int(t * S),
        sk=sk,
        tgid=tgid,
        tid=tgid,
        comm="app",
        fd=3,
        family=2,
        laddr="127.0.0.1",
        lport=40000,
        raddr="127.0.0.1",
        rport=80,
        state=TcpState.SYN_SENT,
        direction=Direction.CONNECT,
        flags=RecordFlag(0),
        birth_ns=int(t * S),
        state_ns=int(t * S),
        user_stack_id=1,
        kernel_stack_id=-1,
        bytes_acked=0,
        bytes_received=0,
        aux=0,
    )
    base.update(kw)
    return SocketRecord(**base)  # type: ignore[arg-type]


def reconcile(ledger: Ledger, records: list[SocketRecord]) -> None:
    ledger.reconcile(records_array(records))


def new_ledger() -> tuple[Ledger, FakeClock, FakeStacks]:
    clock, stacks = FakeClock(), FakeStacks()
    return Ledger(clock, stacks), clock, stacks


def test_birth_then_death_closes_with_app_cause() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1))
    assert [c.key for c in ledger.open_sockets()] == [0xA]
    death = rec(
        RecordKind.DEATH,
        sk=0xA,
        t=3,
        birth_ns=1 * S,
        state=TcpState.CLOSE,
        flags=RecordFlag.FD_CLOSED | RecordFlag.TCP_CLOSED,
        lport=40001,
        bytes_acked=10,
        bytes_received=20,
    )
    ledger.apply(death)
    assert ledger.open_sockets() == []
    (closed,) = ledger.closed_sockets()
    assert closed.close_cause is CloseCause.APP
    assert closed.fd_closed
    assert closed.state is TcpState.CLOSE
    assert closed.lport == 40001  # the local port is only known after connect()
    assert (closed.bytes_sent, closed.bytes_received) == (10, 20)
    assert closed.age_s(0) == 2.0
    assert closed.stack == ("main.main", "main.site1")


def test_scan_updates_state_and_flags_then_classifies() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1))
    ledger.apply(rec(RecordKind.BIRTH, sk=0xB, t=1, direction=Direction.ACCEPT, fd=4))
    ledger.apply(rec(RecordKind.BIRTH, sk=0xC, t=1, fd=5))
    ledger.apply(rec(RecordKind.BIRTH, sk=0xD, t=1, fd=6))
    reconcile(
        ledger,
        [
            rec(RecordKind.SNAPSHOT, sk=0xA, t=1, state=TcpState.ESTABLISHED),
            rec(RecordKind.SNAPSHOT, sk=0xB, t=1, state=TcpState.CLOSE_WAIT, fd=4),
            rec(
                RecordKind.SNAPSHOT,
                sk=0xC,
                t=1,
                state=TcpState.CLOSE,
                fd=5,
                flags=RecordFlag.TCP_CLOSED,
            ),
            rec(
                RecordKind.SNAPSHOT,
                sk=0xD,
                t=1,
                state=TcpState.FIN_WAIT2,
                fd=6,
                flags=RecordFlag.FD_CLOSED,
            ),
        ],
    )
    by_key = {c.key: c for c in ledger.open_sockets()}
    assert classify(by_key[0xA]) is LeakClass.ESTABLISHED
    assert classify(by_key[0xB]) is LeakClass.CLOSE_WAIT
    assert classify(by_key[0xC]) is LeakClass.FD_ON_CLOSED_SOCKET
    assert classify(by_key[0xD]) is LeakClass.ORPHAN
    now = 1_000_000.0 + 40
    assert all(is_leak(c, now, 30.0) for c in by_key.values())
    assert not any(is_leak(c, 1_000_000.0 + 10, 30.0) for c in by_key.values())


def test_exit_closes_every_socket_of_the_process_and_ignores_late_deaths() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1))
    ledger.apply(rec(RecordKind.BIRTH, sk=0xB, t=1, tgid=200))
    ledger.apply(rec(RecordKind.EXIT, t=5))
    assert [c.pid for c in ledger.open_sockets()] == [200]
    (closed,) = ledger.closed_sockets()
    assert closed.close_cause is CloseCause.EXIT and closed.closed_at == 1_000_005.0
    # The kernel destroys the socket after the exit: not a second row.
    ledger.apply(rec(RecordKind.DEATH, sk=0xA, t=6, birth_ns=1 * S, state=TcpState.CLOSE))
    assert len(ledger.closed_sockets()) == 1
    assert ledger.activity["sockets_first_seen_at_death"] == 0


def test_socket_first_seen_at_its_death_gets_a_full_row() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(
        rec(
            RecordKind.DEATH,
            sk=0xA,
            t=2,
            birth_ns=1 * S,
            state=TcpState.CLOSE,
            flags=RecordFlag.FD_CLOSED,
        )
    )
    (closed,) = ledger.closed_sockets()
    assert closed.opened_at == 1_000_001.0 and closed.closed_at == 1_000_002.0
    assert ledger.activity["sockets_first_seen_at_death"] == 1


def test_scan_finds_unannounced_sockets_and_detects_lost_deaths() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1))
    # 0xB is in the kernel map; the kernel announced only 0xA (first of its call site).
    reconcile(
        ledger, [rec(RecordKind.SNAPSHOT, sk=0xA, t=1), rec(RecordKind.SNAPSHOT, sk=0xB, t=1)]
    )
    assert {c.key for c in ledger.open_sockets()} == {0xA, 0xB}
    assert ledger.activity["sockets_first_seen_by_scan"] == 1
    # 0xA vanishes without a death: one missing scan may be a race, two is a loss.
    reconcile(ledger, [rec(RecordKind.SNAPSHOT, sk=0xB, t=1)])
    assert {c.key for c in ledger.open_sockets()} == {0xA, 0xB}
    reconcile(ledger, [rec(RecordKind.SNAPSHOT, sk=0xB, t=1)])
    assert {c.key for c in ledger.open_sockets()} == {0xB}
    assert ledger.counters["deaths_lost"] == 1
    assert ledger.closed_sockets()[0].close_cause is CloseCause.KERNEL


def test_death_in_flight_during_scan_is_not_a_loss() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1))
    reconcile(ledger, [])  # destroyed after the drain, record still in the ring
    ledger.apply(
        rec(
            RecordKind.DEATH,
            sk=0xA,
            t=2,
            birth_ns=1 * S,
            state=TcpState.CLOSE,
            flags=RecordFlag.FD_CLOSED,
        )
    )
    reconcile(ledger, [])
    assert ledger.counters["deaths_lost"] == 0
    assert len(ledger.closed_sockets()) == 1


def test_close_range_marks_fds_closed() -> None:
    ledger, _, _ = new_ledger()
    for i, fd in enumerate((3, 4, 9)):
        ledger.apply(rec(RecordKind.BIRTH, sk=0x10 + i, t=1, fd=fd))
    ledger.apply(rec(RecordKind.CLOSE_RANGE, t=2, fd=3, aux=4))
    closed = {c.fd: c.fd_closed for c in ledger.open_sockets()}
    assert closed == {3: True, 4: True, 9: False}


def test_reused_address_without_a_death_is_a_lost_death_two_scans_later() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1))
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=2, fd=9))
    assert [c.fd for c in ledger.open_sockets()] == [9]
    now = [rec(RecordKind.SNAPSHOT, sk=0xA, t=2, fd=9)]
    reconcile(ledger, now)
    reconcile(ledger, now)
    assert ledger.counters["deaths_lost"] == 0  # may still be in flight
    reconcile(ledger, now)
    assert ledger.counters["deaths_lost"] == 1
    (lost,) = ledger.closed_sockets()
    assert lost.fd == 3 and lost.close_cause is CloseCause.KERNEL


def test_death_of_a_previous_incarnation_does_not_close_the_next_one() -> None:
    """Scan shows the next socket at an address before the last one's death is drained."""
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1, direction=Direction.ACCEPT, fd=5))
    reconcile(ledger, [rec(RecordKind.SNAPSHOT, sk=0xA, t=3, fd=7)])  # born at t=3
    ledger.apply(
        rec(
            RecordKind.DEATH,
            sk=0xA,
            t=2,
            birth_ns=1 * S,
            fd=5,
            state=TcpState.CLOSE,
            direction=Direction.ACCEPT,
            flags=RecordFlag.FD_CLOSED,
        )
    )
    (old,) = ledger.closed_sockets()
    assert (old.fd, old.direction, old.closed_at) == (5, Direction.ACCEPT, 1_000_002.0)
    (new,) = ledger.open_sockets()
    assert (new.fd, new.opened_at) == (7, 1_000_003.0)
    assert ledger.counters["deaths_lost"] == 0


def test_untracked_socket_is_shown_but_never_a_leak() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(
        rec(RecordKind.BIRTH, sk=0xA, t=1, flags=RecordFlag.UNTRACKED, state=TcpState.ESTABLISHED)
    )
    (conn,) = ledger.open_sockets()
    assert conn.untracked
    assert not is_leak(conn, 1e12, 1.0)
    assert ledger.counters["sockets_untracked"] == 1


def _pre(key: int, fd: int, pid: int = 100) -> Connection:
    return Connection(
        key=key,
        pid=pid,
        tid=pid,
        comm="app",
        fd=fd,
        family="ipv4",
        laddr="127.0.0.1",
        lport=1,
        raddr="127.0.0.1",
        rport=2,
        state=TcpState.ESTABLISHED,
        direction=Direction.PREEXISTING,
        opened_at=None,
        first_seen=1_000_000.0,
        stack=(),
        stack_status=StackStatus.UNKNOWN,
    )


def test_preexisting_seeded_deduplicated_and_refreshed() -> None:
    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1, fd=3))
    ledger.add_preexisting([_pre(-1, 3), _pre(-2, 4), _pre(-3, 5)])
    keys = sorted(c.key for c in ledger.open_sockets())
    assert keys == [-3, -2, 0xA]  # fd 3 is the socket we saw born
    pre = dataclasses.replace(_pre(-2, 4), state=TcpState.CLOSE_WAIT)
    ledger.refresh_preexisting([pre], now=1_000_050.0)
    by_key = {c.key: c for c in ledger.open_sockets()}
    assert by_key[-2].state is TcpState.CLOSE_WAIT
    assert -3 not in by_key
    (gone,) = ledger.closed_sockets()
    assert gone.closed_at == 1_000_050.0 and gone.close_cause is CloseCause.APP
    # Unknown age: a lower bound from first sight.
    assert by_key[-2].opened_at is None
    assert by_key[-2].age_s(1_000_050.0) == 50.0


def test_preexisting_of_an_unreadable_process_are_kept_and_counted() -> None:
    # issue 7: the snapshot could not look at pid 100 (it became another user):
    # its sockets are unverified, not closed.
    ledger, _, _ = new_ledger()
    ledger.add_preexisting([_pre(-1, 3), _pre(-2, 4)])
    ledger.refresh_preexisting([], now=1_000_050.0, unreadable={100})
    assert sorted(c.key for c in ledger.open_sockets()) == [-2, -1]
    assert ledger.closed_sockets() == []
    assert ledger.counters["preexisting_unverified"] == 2
    ledger.refresh_preexisting([_pre(-1, 3)], now=1_000_060.0)  # readable again
    assert [c.key for c in ledger.open_sockets()] == [-1]
    assert ledger.counters["preexisting_unverified"] == 0


def test_failed_stack_capture_is_marked_not_guessed() -> None:
    ledger, _, stacks = new_ledger()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, t=1, user_stack_id=-14))
    (conn,) = ledger.open_sockets()
    assert conn.stack_status is StackStatus.FAILED and conn.stack == ()
    assert stacks.calls == [(100, -14)]


def test_close_range_counts_as_the_app_closing_for_sockets_seen_only_at_death() -> None:
    from tcptrace.history import split_records

    ledger, _, _ = new_ledger()
    ledger.apply(rec(RecordKind.CLOSE_RANGE, t=2, fd=5, aux=9))
    raw = []
    for sk, fd, born, died in ((0xA, 6, 1, 3), (0xB, 12, 1, 3), (0xC, 7, 2.5, 3)):
        r = RawSocketRecord()
        r.kind, r.sk, r.fd, r.tgid = RecordKind.DEATH, sk, fd, 100
        r.birth_ns, r.ts_ns, r.family, r.state = int(born * S), int(died * S), 2, 7
        raw.append(bytes(r))
    deaths, _ = split_records(b"".join(raw))
    frame = ledger.apply_deaths(deaths).to_pandas()
    # fd 6 was in the range when it was closed; fd 12 was not; fd 7 was born after.
    assert list(frame.close_cause) == ["app", "kernel", "kernel"]


def test_replaced_sockets_are_counted_on_the_bulk_path_too() -> None:
    # The kernel retires a stale record when its sock address is born again
    # (sk_reused). Short-lived sockets reach the ledger only as bulk deaths: the
    # ledger must count those too, so sockets_replaced matches sk_reused.
    from tcptrace.history import split_records

    ledger, _, _ = new_ledger()
    raw = []
    for sk, flags in ((0xA, RecordFlag.REPLACED | RecordFlag.FD_CLOSED), (0xB, 0)):
        r = RawSocketRecord()
        r.kind, r.sk, r.fd, r.tgid, r.flags = RecordKind.DEATH, sk, 5, 100, flags
        r.birth_ns, r.ts_ns, r.family, r.state = int(1 * S), int(2 * S), 2, 7
        raw.append(bytes(r))
    deaths, _ = split_records(b"".join(raw))
    assert len(ledger.apply_deaths(deaths)) == 2
    assert ledger.counters["sockets_replaced"] == 1


def test_snapshot_twin_of_a_socket_born_after_attach_is_merged_not_doubled() -> None:
    # The start-up snapshot runs while the target works: it can list a socket
    # born after attach, whose birth then reaches the ledger by a scan.
    ledger, _, _ = new_ledger()
    ledger.add_preexisting([dataclasses.replace(_pre(-1, 7), first_seen=1_000_005.0)])
    reconcile(ledger, [rec(RecordKind.SNAPSHOT, sk=0xB, t=2, fd=7)])
    assert [c.key for c in ledger.open_sockets()] == [0xB]
    assert ledger.closed_sockets() == []
    assert ledger.activity["snapshot_duplicates_merged"] == 1
    assert not ledger.has_preexisting()


def test_fd_of_a_snapshot_socket_reused_closes_the_old_one() -> None:
    ledger, _, _ = new_ledger()
    ledger.add_preexisting([dataclasses.replace(_pre(-2, 8), first_seen=1_000_001.0)])
    assert ledger.has_preexisting()
    ledger.apply(rec(RecordKind.BIRTH, sk=0xC, t=3, fd=8))  # born after the snapshot
    assert [c.key for c in ledger.open_sockets()] == [0xC]
    (old,) = ledger.closed_sockets()
    assert old.key == -2 and old.close_cause is CloseCause.APP
    assert old.closed_at == 1_000_003.0  # at the latest when its fd was reused
    assert ledger.activity["snapshot_duplicates_merged"] == 0
    assert not ledger.has_preexisting()
