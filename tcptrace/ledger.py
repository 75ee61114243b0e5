"""The ledger: a pure state machine from kernel records to open sockets per process.

No bcc, no root: it is fed decoded `SocketRecord`s (births, deaths, process
events), periodic scans of the in-kernel ledger map, and snapshots of sockets
that predate tracing, and it answers "what is open, since when, opened where".
Tests drive it from recorded sequences.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from tcptrace.events import (
    Direction,
    RawSocketRecord,
    RecordFlag,
    RecordKind,
    SocketRecord,
    TcpState,
    family_name,
)
from tcptrace.sockets import CloseCause, Connection, StackStatus


class StackResolver(Protocol):
    def resolve(
        self, tgid: int, stack_id: int, kernel_stack_id: int = -1
    ) -> tuple[tuple[str, ...], StackStatus]: ...


class Clock(Protocol):
    def to_epoch(self, monotonic_ns: int) -> float: ...

    def now(self) -> float: ...


# Names of the ledger's own loss/anomaly counters (shown with the kernel's).
LEDGER_COUNTERS = (
    "deaths_lost",  # vanished from the kernel map without a death record
    "sockets_untracked",  # kernel ledger map was full: shown, never classified
    "sockets_replaced",  # sock address reused before we saw its destroy
    "states_corrected",  # issue 7: a state change the kernel program missed, fixed from sock_diag
    # issue 7: preexisting sockets of a process whose fds could no longer be read at the
    # last check (it became another user's, or non-dumpable): reported open as last seen,
    # unverified (their age still grows, so they may be flagged). A current value, not a
    # running total.
    "preexisting_unverified",
)


class Ledger:
    """Open sockets per process, and the closed ones handed to `on_closed`."""

    def __init__(
        self,
        clock: Clock,
        stacks: StackResolver,
        on_closed: Callable[[Connection], None] | None = None,
    ) -> None:
        self._clock = clock
        self._stacks = stacks
        self._open: dict[int, Connection] = {}
        self._by_pid: dict[int, set[int]] = {}
        self._closed: list[Connection] = []
        self._on_closed = on_closed if on_closed is not None else self._closed.append
        self._exited: dict[int, int] = {}  # tgid -> exit time (monotonic ns)
        self._missing: set[int] = set()  # kernel-tracked keys absent from the last scan
        # A kernel socket is its sock address *and* birth time: addresses are
        # reused, and a scan can show the next socket at an address before the
        # previous one's death record has been drained.
        self._birth_ns: dict[int, int] = {}
        self._signature: dict[int, int] = {}  # last scanned state/flags/ports, packed
        # Incarnations replaced at their address, death record still to come.
        self._superseded: dict[tuple[int, int], tuple[Connection, int]] = {}
        self._closed_by_exit: set[tuple[int, int]] = set()  # death record still to come
        self._closed_ranges: dict[int, list[tuple[int, int, int]]] = {}  # pid -> close_range()s
        self.counters: Counter[str] = Counter({name: 0 for name in LEDGER_COUNTERS})
        # Not losses: the kernel streams births only for a call site's first socket,
        # so most sockets are first seen by a scan, or at their death.
        self.activity: Counter[str] = Counter(
            {
                "sockets_first_seen_by_scan": 0,
                "sockets_first_seen_at_death": 0,
                "snapshot_duplicates_merged": 0,
            }
        )
        # (pid, fd) -> key of a socket from the start-up snapshot (keys < 0). The
        # snapshot runs while the targets work, so it can catch a socket born after
        # attach whose birth reaches us later (a scan, a record): the same socket
        # must not be listed twice (issue 6: +10% rows at 100k held sockets).
        self._preexisting_fds: dict[tuple[int, int], int] = {}
        self._preexisting_open = 0  # keys < 0 in _open (checked every tick: no scan of 100k)
        self.closed_count = 0

    # -- queries ---------------------------------------------------------
    def open_sockets(self) -> list[Connection]:
        return list(self._open.values())

    def open_for(self, pid: int) -> list[Connection]:
        return [self._open[k] for k in self._by_pid.get(pid, ())]

    def closed_sockets(self) -> list[Connection]:
        """Closed rows kept in memory (empty when an `on_closed` sink was given)."""
        return list(self._closed)

    def has_preexisting(self) -> bool:
        """Whether any socket from the start-up snapshot is still open (keys < 0)."""
        return self._preexisting_open > 0

    def pids(self) -> set[int]:
        return {pid for pid, keys in self._by_pid.items() if keys}

    def exited(self) -> set[int]:
        return set(self._exited)

    # -- kernel records --------------------------------------------------
    def apply(self, record: SocketRecord) -> None:
        if record.kind is RecordKind.BIRTH:
            self._birth(record)
        elif record.kind is RecordKind.DEATH:
            self._death(record)
        elif record.kind is RecordKind.EXIT:
            self.process_exited(record.tgid, record.ts_ns)
        elif record.kind is RecordKind.CLOSE_RANGE:
            self._close_range(record.tgid, record.fd, record.aux, record.ts_ns)
        # FORK needs nothing here: the kernel already follows the child.

    def _birth(self, record: SocketRecord) -> None:
        if self._holds(record.sk, record.birth_ns):
            return  # a scan found it before its birth record was drained
        if record.sk in self._open:
            self._supersede(record.sk)  # its death record is in flight, or lost
        conn = self._from_record(record)
        if conn.untracked:
            self.counters["sockets_untracked"] += 1
        self._insert(conn, record.birth_ns)

    def _holds(self, key: int, birth_ns: int) -> bool:
        return key in self._open and self._birth_ns.get(key) == birth_ns

    def _death(self, record: SocketRecord) -> None:
        key, incarnation = record.sk, (record.sk, record.birth_ns)
        conn: Connection | None = None
        if record.flags & RecordFlag.REPLACED:  # counted on every path (== sk_reused)
            self.counters["sockets_replaced"] += 1
        if self._holds(key, record.birth_ns):
            self._missing.discard(key)
            conn = self._open[key]
            self._remove(key)
        elif incarnation in self._superseded:
            conn = self._superseded.pop(incarnation)[0]
        elif incarnation in self._closed_by_exit:
            self._closed_by_exit.discard(incarnation)
            return  # already closed by the exit of its process
        if conn is None:
            self.activity["sockets_first_seen_at_death"] += 1
            conn = self._from_record(record)
        conn = dataclasses.replace(
            conn,
            laddr=record.laddr or conn.laddr,
            lport=record.lport or conn.lport,
            raddr=record.raddr or conn.raddr,
            rport=record.rport or conn.rport,
            bytes_sent=record.bytes_acked,
            bytes_received=record.bytes_received,
        )
        fd_closed = (
            conn.fd_closed
            or bool(record.flags & RecordFlag.FD_CLOSED)
            or self._closed_by_range(record.tgid, record.fd, record.birth_ns, record.ts_ns)
        )
        if fd_closed:
            cause = CloseCause.APP
        elif record.tgid in self._exited:
            cause = CloseCause.EXIT
        else:
            cause = CloseCause.KERNEL
        final = record.state if record.state is not None else TcpState.CLOSE
        self._close(dataclasses.replace(conn, fd_closed=fd_closed), record.ts_ns, cause, final)

    def apply_deaths(self, deaths: np.ndarray) -> Any:
        """Death records in bulk (numpy, RECORD_DTYPE). Sockets the ledger holds go
        through the per-record path; the rest, born and gone between two scans,
        come back as `connections` rows (an Arrow table, tcptrace.history.death_table)."""
        from tcptrace.history import death_table

        if len(deaths) == 0:
            return death_table(deaths, self._epoch_array, self._stacks.resolve, self._exited)

        pairs = zip(deaths["sk"].tolist(), deaths["birth_ns"].tolist(), strict=True)
        held = np.fromiter(
            (
                self._holds(k, b) or (k, b) in self._superseded or (k, b) in self._closed_by_exit
                for k, b in pairs
            ),
            dtype=bool,
            count=len(deaths),
        )
        for index in np.flatnonzero(held).tolist():
            raw = RawSocketRecord.from_buffer_copy(deaths[index].tobytes())
            self._death(SocketRecord.from_raw(raw))
        fresh = deaths[~held]
        self.counters["sockets_replaced"] += int(
            np.count_nonzero(fresh["flags"] & RecordFlag.REPLACED)
        )
        self.activity["sockets_first_seen_at_death"] += len(fresh)
        self.closed_count += len(fresh)
        return death_table(
            fresh,
            self._epoch_array,
            self._stacks.resolve,
            self._exited,
            self._closed_by_range if self._closed_ranges else None,
        )

    def _epoch_array(self, monotonic_ns: np.ndarray) -> np.ndarray:
        offset = self._clock.to_epoch(0)
        return offset + monotonic_ns.astype(np.float64) / 1e9

    def process_exited(self, pid: int, ts_ns: int) -> None:
        """Every socket of `pid` leaves the ledger, closed by exit."""
        self._exited[pid] = ts_ns
        for key in list(self._by_pid.get(pid, ())):
            conn = self._open[key]
            if key > 0:
                self._closed_by_exit.add((key, self._birth_ns[key]))
            self._remove(key)
            self._close(conn, ts_ns, CloseCause.EXIT, conn.state)

    def _closed_by_range(self, pid: int, fd: int, birth_ns: int, death_ns: int) -> bool:
        """Whether a close_range() of `pid` closed `fd` while this socket held it."""
        return fd >= 0 and any(
            low <= fd <= high and birth_ns <= ts <= death_ns
            for low, high, ts in self._closed_ranges.get(pid, ())
        )

    def _close_range(self, pid: int, low: int, high: int, ts_ns: int = 0) -> None:
        self._closed_ranges.setdefault(pid, []).append((low, high, ts_ns))
        for key in list(self._by_pid.get(pid, ())):
            conn = self._open[key]
            if conn.fd >= 0 and low <= conn.fd <= high:
                self._open[key] = dataclasses.replace(conn, fd_closed=True)

    # -- reconciliation with the kernel map --------------------------------
    def reconcile(self, scan: np.ndarray, complete: bool = True) -> None:
        """Bring open sockets up to date with a scan of the in-kernel ledger
        (RECORD_DTYPE rows, as Capture.scan_raw returns them).

        Call right after draining the ring buffer. A socket absent from two
        complete scans in a row without a death record lost its death; one in
        the map but unknown here is added (births are announced once per call
        site). Only rows that changed since the last scan are decoded, so a
        scan of 100k quiet sockets costs little.
        """
        seen: set[int] = set()
        # What a scan can change, packed in one int per row (one small object per
        # socket kept between scans, not a tuple: 100k sockets, issue 6).
        signatures = (
            scan["state"].astype(np.uint64)
            | (scan["flags"].astype(np.uint64) << np.uint64(8))
            | (scan["lport"].astype(np.uint64) << np.uint64(24))
            | (scan["rport"].astype(np.uint64) << np.uint64(40))
        )
        columns = zip(
            scan["sk"].tolist(),
            scan["birth_ns"].tolist(),
            scan["tgid"].tolist(),
            signatures.tolist(),
            strict=True,
        )
        for index, (key, birth_ns, tgid, sig) in enumerate(columns):
            seen.add(key)
            conn = self._open.get(key)
            if conn is not None and self._birth_ns.get(key) != birth_ns:
                # The next socket at this address: the previous one's death
                # record is in flight (or lost; _age_superseded decides).
                self._supersede(key)
                conn = None
            if conn is None and tgid in self._exited:
                continue
            if conn is not None and self._signature.get(key) == sig:
                continue
            self._signature[key] = sig
            rec = SocketRecord.decode(scan[index].tobytes())
            if conn is None:
                self.activity["sockets_first_seen_by_scan"] += 1
                self._insert(self._from_record(rec), birth_ns)
                continue
            self._open[key] = dataclasses.replace(
                conn,
                state=rec.state if rec.state is not None else conn.state,
                laddr=rec.laddr or conn.laddr,
                lport=rec.lport or conn.lport,
                raddr=rec.raddr or conn.raddr,
                rport=rec.rport or conn.rport,
                fd_closed=conn.fd_closed or bool(rec.flags & RecordFlag.FD_CLOSED),
            )
        if not complete:
            return  # a partial read proves nothing about what it did not return
        now_missing = {
            key
            for key, conn in self._open.items()
            if key > 0 and not conn.untracked and key not in seen
        }
        for key in now_missing & self._missing:
            conn = self._open[key]
            self.counters["deaths_lost"] += 1
            self._close_now(conn, CloseCause.KERNEL)
        self._missing = now_missing - self._missing
        self._age_superseded()

    def _supersede(self, key: int) -> None:
        conn = self._open[key]
        self._superseded[(key, self._birth_ns[key])] = (conn, 0)
        self._remove(key)

    def _age_superseded(self) -> None:
        """A replaced incarnation whose death has not arrived by two scans later lost it."""
        for incarnation, (conn, scans) in list(self._superseded.items()):
            if scans >= 2:
                del self._superseded[incarnation]
                self.counters["deaths_lost"] += 1
                self._emit_closed(conn, self._clock.now(), CloseCause.KERNEL, conn.state)
            else:
                self._superseded[incarnation] = (conn, scans + 1)

    def _close_now(self, conn: Connection, cause: CloseCause) -> None:
        # No timestamp from the kernel: the scan time is an upper bound.
        self._remove(conn.key)
        self._emit_closed(conn, self._clock.now(), cause, conn.state)

    # -- sockets that predate tracing ------------------------------------
    def add_preexisting(self, conns: Iterable[Connection]) -> None:
        """Seed sockets found by the start-up snapshot, unless we already saw them born."""
        held = {(c.pid, c.fd) for c in self._open.values() if c.fd >= 0}
        for conn in conns:
            if (conn.pid, conn.fd) in held or conn.key in self._open:
                continue
            self._insert(conn)

    def refresh_preexisting(
        self, current: Iterable[Connection], now: float, unreadable: Iterable[int] = ()
    ) -> None:
        """Update preexisting sockets from a fresh snapshot; those gone were closed.

        Sockets of `unreadable` pids (alive, but their fds may not be read any more)
        are kept as they were, and counted as preexisting_unverified: absent from a
        snapshot that could not look is not closed."""
        fresh = {c.key: c for c in current}
        blind = set(unreadable)
        unverified = 0
        for key, conn in list(self._open.items()):
            if conn.direction is not Direction.PREEXISTING:
                continue
            if conn.pid in blind:
                unverified += 1
                continue
            new = fresh.get(key)
            if new is None:
                self._remove(key)
                cause = CloseCause.EXIT if conn.pid in self._exited else CloseCause.APP
                self._emit_closed(
                    dataclasses.replace(conn, fd_closed=True), now, cause, TcpState.CLOSE
                )
            else:
                # A reset socket drops out of sock_diag: keep the address we knew.
                self._open[key] = dataclasses.replace(
                    conn,
                    state=new.state,
                    raddr=new.raddr or conn.raddr,
                    rport=new.rport or conn.rport,
                )
        self.counters["preexisting_unverified"] = unverified

    # --- issue 7: states the kernel program could not record -----------------
    def correct_states(self, current: Iterable[Connection]) -> int:
        """Set the TCP state of traced open sockets from a sock_diag snapshot.

        The in-kernel record is updated by the state-change program, which the
        kernel skips when it would nest on a CPU (counted as recursion misses):
        the record then keeps a stale state, e.g. ESTABLISHED for a socket the
        peer closed (CLOSE_WAIT), and the report would misclassify it. A socket
        is matched by (pid, fd) and the same ports, so a reused fd is not
        mistaken for it. Returns (and counts) the sockets corrected.
        """
        by_fd = {(c.pid, c.fd): c for c in current if c.fd >= 0}
        fixed = 0
        for key, conn in list(self._open.items()):
            if conn.direction is Direction.PREEXISTING or conn.fd < 0 or conn.fd_closed:
                continue
            seen = by_fd.get((conn.pid, conn.fd))
            if seen is None or (seen.lport, seen.rport) != (conn.lport, conn.rport):
                continue
            if seen.state is not conn.state:
                self._open[key] = dataclasses.replace(conn, state=seen.state)
                fixed += 1
        self.counters["states_corrected"] += fixed
        return fixed

    # -- internals -------------------------------------------------------
    def _from_record(self, rec: SocketRecord) -> Connection:
        frames, status = self._stacks.resolve(rec.tgid, rec.user_stack_id, rec.kernel_stack_id)
        direction = rec.direction if rec.direction is not None else Direction.CONNECT
        return Connection(
            key=rec.sk,
            pid=rec.tgid,
            tid=rec.tid,
            comm=rec.comm,
            fd=rec.fd,
            family=family_name(rec.family),
            laddr=rec.laddr,
            lport=rec.lport,
            raddr=rec.raddr,
            rport=rec.rport,
            state=rec.state if rec.state is not None else TcpState.CLOSE,
            direction=direction,
            opened_at=self._clock.to_epoch(rec.birth_ns),
            first_seen=self._clock.to_epoch(rec.birth_ns),
            stack=frames,
            stack_status=status,
            fd_closed=bool(rec.flags & RecordFlag.FD_CLOSED),
            user_stack_id=rec.user_stack_id,
            untracked=bool(rec.flags & RecordFlag.UNTRACKED),
        )

    def _insert(self, conn: Connection, birth_ns: int | None = None) -> None:
        if conn.key < 0 and conn.key not in self._open:
            self._preexisting_open += 1
        if conn.fd >= 0:
            if conn.key < 0:
                self._preexisting_fds[(conn.pid, conn.fd)] = conn.key
            elif self._preexisting_fds:
                self._merge_snapshot_twin(conn)
        self._open[conn.key] = conn
        self._by_pid.setdefault(conn.pid, set()).add(conn.key)
        if birth_ns is not None:
            self._birth_ns[conn.key] = birth_ns

    def _merge_snapshot_twin(self, conn: Connection) -> None:
        """A traced socket took the fd of a snapshot socket: the same socket if it
        was born before the snapshot saw it, else the snapshot's socket was closed
        and its fd reused."""
        twin_key = self._preexisting_fds.get((conn.pid, conn.fd))
        twin = self._open.get(twin_key) if twin_key is not None else None
        if twin is None or twin_key is None:
            return
        self._remove(twin_key)
        born = conn.opened_at if conn.opened_at is not None else conn.first_seen
        if born <= twin.first_seen:
            self.activity["snapshot_duplicates_merged"] += 1
            return
        cause = CloseCause.EXIT if twin.pid in self._exited else CloseCause.APP
        self._emit_closed(dataclasses.replace(twin, fd_closed=True), born, cause, TcpState.CLOSE)

    def _remove(self, key: int) -> None:
        self._birth_ns.pop(key, None)
        self._signature.pop(key, None)
        conn = self._open.pop(key)
        if key < 0:
            self._preexisting_open -= 1
        if key < 0 and self._preexisting_fds.get((conn.pid, conn.fd)) == key:
            del self._preexisting_fds[(conn.pid, conn.fd)]
        keys = self._by_pid.get(conn.pid)
        if keys is not None:
            keys.discard(key)

    def _close(self, conn: Connection, ts_ns: int, cause: CloseCause, final: TcpState) -> None:
        """Hand a socket already removed from the open set to the closed sink."""
        self._emit_closed(conn, self._clock.to_epoch(ts_ns), cause, final)

    def _emit_closed(
        self, conn: Connection, closed_at: float, cause: CloseCause, final: TcpState
    ) -> None:
        self.closed_count += 1
        self._on_closed(
            dataclasses.replace(
                conn,
                closed_at=closed_at,
                close_cause=cause,
                state=final,
                fd_closed=conn.fd_closed or cause in (CloseCause.APP, CloseCause.EXIT),
            )
        )
