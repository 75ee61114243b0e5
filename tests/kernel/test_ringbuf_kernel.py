"""The mapped ring buffer reader on the real kernel: a one-page ring buffer
wraps dozens of times and every record arrives once and whole."""

from __future__ import annotations

import os
import socket

import pytest

from tcptrace import ringbuf
from tcptrace.events import RecordKind, SocketRecord
from tcptrace.probes import Capture, CaptureConfig

pytestmark = pytest.mark.kernel


def test_one_page_ring_buffer_wraps_without_loss(root: None) -> None:
    assert ringbuf.supported(), "the bulk reader is what runs on this machine"
    rounds, per_round = 60, 5  # 10 deaths per round fit a page (26 frames)
    expected: set[int] = set()
    records: list[SocketRecord] = []
    with Capture(CaptureConfig(pids=(os.getpid(),), ringbuf_pages=1)) as cap:
        assert cap._ring is not None  # the mapped reader, not bcc's callback
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            for _ in range(rounds):
                for _ in range(per_round):
                    client = socket.create_connection(("127.0.0.1", port))
                    server, _addr = listener.accept()
                    expected.add(client.getsockname()[1])
                    client.close()
                    server.close()
                cap.drain(records.append)
            for _ in range(50):  # the last destroys may trail close() slightly
                if sum(r.kind is RecordKind.DEATH for r in records) >= 2 * rounds * per_round:
                    break
                socket.socket().close()
                cap.drain(records.append)
        stats = cap.stats()
    deaths = [r for r in records if r.kind is RecordKind.DEATH]
    # 2 sockets per connection crossed a 4 KiB ring ~25 times over.
    assert len(deaths) * 152 > 20 * 4096
    client_ports = [r.lport for r in deaths if r.lport in expected and r.rport == port]
    assert sorted(client_ports) == sorted(expected)  # each once
    server_sides = [r for r in deaths if r.lport == port and r.rport in expected]
    assert len(server_sides) == len(expected)
    assert stats["events_dropped"] == 0
    assert stats["records_undecodable"] == 0
