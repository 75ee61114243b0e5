"""Ledger.correct_states (issue 7): a state change the kernel program missed is
fixed from a sock_diag snapshot, matched by (pid, fd) and ports, and counted."""

from __future__ import annotations

from tcptrace.events import Direction, RecordFlag, RecordKind, TcpState
from tcptrace.ledger import Ledger
from tcptrace.sockets import Connection, LeakClass, StackStatus, classify
from tests.unit.test_ledger import FakeClock, FakeStacks, rec


def _diag(pid: int, fd: int, lport: int, rport: int, state: TcpState) -> Connection:
    """What snapshot.preexisting_connections returns for one socket."""
    return Connection(
        key=-fd, pid=pid, tid=pid, comm="app", fd=fd, family="ipv4", laddr="127.0.0.1",
        lport=lport, raddr="127.0.0.1", rport=rport, state=state,
        direction=Direction.PREEXISTING, opened_at=None, first_seen=0.0, stack=(),
        stack_status=StackStatus.UNKNOWN,
    )


def test_stale_state_is_corrected_and_counted() -> None:
    ledger = Ledger(FakeClock(), FakeStacks())
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, fd=5, state=TcpState.ESTABLISHED,
                     direction=Direction.ACCEPT, lport=8080, rport=50000))
    ledger.apply(rec(RecordKind.BIRTH, sk=0xB, fd=6, state=TcpState.ESTABLISHED,
                     direction=Direction.ACCEPT, lport=8080, rport=50001))
    snapshot = [
        _diag(100, 5, 8080, 50000, TcpState.CLOSE_WAIT),  # the peer closed: missed here
        _diag(100, 6, 8080, 50001, TcpState.ESTABLISHED),  # agrees
    ]
    assert ledger.correct_states(snapshot) == 1
    states = {c.fd: c.state for c in ledger.open_sockets()}
    assert states == {5: TcpState.CLOSE_WAIT, 6: TcpState.ESTABLISHED}
    fixed = next(c for c in ledger.open_sockets() if c.fd == 5)
    assert classify(fixed) is LeakClass.CLOSE_WAIT  # the definite leak, not "established"
    assert ledger.counters["states_corrected"] == 1


def test_a_reused_fd_or_another_process_is_not_matched() -> None:
    ledger = Ledger(FakeClock(), FakeStacks())
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, fd=5, state=TcpState.ESTABLISHED,
                     lport=40000, rport=80))
    snapshot = [
        _diag(100, 5, 41000, 80, TcpState.CLOSE_WAIT),  # same fd, other socket (fd reused)
        _diag(200, 5, 40000, 80, TcpState.CLOSE_WAIT),  # same fd number in another pid
    ]
    assert ledger.correct_states(snapshot) == 0
    assert ledger.open_sockets()[0].state is TcpState.ESTABLISHED
    assert ledger.counters["states_corrected"] == 0


def test_preexisting_and_closed_fds_are_left_alone() -> None:
    ledger = Ledger(FakeClock(), FakeStacks())
    pre = _diag(100, 7, 9000, 9001, TcpState.ESTABLISHED)
    ledger.add_preexisting([pre])
    ledger.apply(rec(RecordKind.BIRTH, sk=0xA, fd=5, state=TcpState.FIN_WAIT1,
                     lport=40000, rport=80, flags=RecordFlag.FD_CLOSED))
    snapshot = [
        _diag(100, 7, 9000, 9001, TcpState.CLOSE_WAIT),
        _diag(100, 5, 40000, 80, TcpState.CLOSE_WAIT),
    ]
    # Preexisting sockets are refresh_preexisting's; a closed fd is no longer the app's.
    assert ledger.correct_states(snapshot) == 0
