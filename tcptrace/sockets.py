"""What the ledger knows about one socket, and how a long-lived one is classified."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tcptrace.events import Direction, TcpState


class LeakClass(enum.Enum):
    CLOSE_WAIT = "close_wait"  # peer closed, the app never did: a definite leak
    ESTABLISHED = "established"  # long-lived or idle: a pool or a leak
    FD_ON_CLOSED_SOCKET = "fd_on_closed_socket"  # TCP is CLOSED, the app still holds the fd
    ORPHAN = "orphan"  # the app let go; the kernel is finishing FIN_WAIT/LAST_ACK
    LISTENER = "listener"  # a listening socket: reported, never counted as a leak
    OTHER = "other"  # SYN_SENT and friends past the threshold


class StackStatus(enum.Enum):
    OK = "ok"  # captured and symbolized
    UNKNOWN = "unknown"  # the socket predates tracing: no stack exists
    FAILED = "failed"  # the kernel could not capture it (counted in losses)
    UNSYMBOLIZED = "unsymbolized"  # captured, but the process was gone before we read it


class CloseCause(enum.Enum):
    APP = "app"  # the process closed its fd
    EXIT = "exit"  # the process exited holding it
    KERNEL = "kernel"  # destroyed without a close we saw (e.g. close_range, dup'd fd)
    NOT_CLOSED = ""  # still open at the end


_ORPHAN_STATES = frozenset(
    {
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
        TcpState.TIME_WAIT,
    }
)


@dataclass(frozen=True, slots=True)
class Connection:
    """One TCP socket of a traced process, from birth (or first sight) to death.

    Times are seconds since the epoch. `opened_at` is None for a preexisting socket
    whose birth we did not see; `first_seen` is then a lower bound of its age.
    """

    key: int  # struct sock address, or a synthetic negative key for preexisting sockets
    pid: int
    tid: int
    comm: str
    fd: int  # -1 when unknown
    family: str  # "ipv4" | "ipv6"
    laddr: str
    lport: int
    raddr: str
    rport: int
    state: TcpState
    direction: Direction
    opened_at: float | None
    first_seen: float
    stack: tuple[str, ...]  # outermost caller first
    stack_status: StackStatus
    fd_closed: bool = False  # the process closed its fd (or exited)
    closed_at: float | None = None
    close_cause: CloseCause = CloseCause.NOT_CLOSED
    bytes_sent: int | None = None
    bytes_received: int | None = None
    user_stack_id: int = -1
    # The kernel ledger map was full at birth: no death will be seen, so the
    # socket is shown but never called a leak (counted in losses instead).
    untracked: bool = False

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    def age_s(self, now: float) -> float:
        """Age at `now` (or at close); for a preexisting socket, a lower bound."""
        start = self.opened_at if self.opened_at is not None else self.first_seen
        end = self.closed_at if self.closed_at is not None else now
        return max(0.0, end - start)

    @property
    def folded_stack(self) -> str:
        return ";".join(self.stack)


def classify(conn: Connection) -> LeakClass:
    """Leak class of an open socket, from who holds it and its TCP state."""
    if conn.fd_closed:
        return LeakClass.ORPHAN if conn.state in _ORPHAN_STATES else LeakClass.OTHER
    if conn.state is TcpState.CLOSE_WAIT:
        return LeakClass.CLOSE_WAIT
    if conn.state is TcpState.CLOSE:
        return LeakClass.FD_ON_CLOSED_SOCKET
    if conn.state is TcpState.LISTEN:
        return LeakClass.LISTENER
    if conn.state is TcpState.ESTABLISHED:
        return LeakClass.ESTABLISHED
    if conn.state in _ORPHAN_STATES:
        # FIN_WAIT with the fd still held: the app called shutdown() and kept it.
        return LeakClass.OTHER
    return LeakClass.OTHER


def is_leak(conn: Connection, now: float, threshold_s: float) -> bool:
    """Flagged: open, old enough, and not a listener (listeners live by design)."""
    if not conn.is_open or conn.untracked or conn.age_s(now) < threshold_s:
        return False
    return classify(conn) is not LeakClass.LISTENER
