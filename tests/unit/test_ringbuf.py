"""The bulk ring buffer parser (tcptrace.ringbuf) on hand-built frames."""

from __future__ import annotations

import struct

import pytest

from tcptrace.ringbuf import BUSY_BIT, DISCARD_BIT, committed_records, frame_size

SIZE = 20  # frames of 8 + 20 bytes, padded to 32


def _frame(payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    header = struct.pack("<II", (len(payload) if length is None else length) | flags, 0)
    body = header + payload
    return body + b"\xee" * (frame_size(SIZE) - len(body))


def _payload(i: int) -> bytes:
    return bytes([i]) * SIZE


def test_frame_size_pads_to_eight() -> None:
    assert frame_size(20) == 32
    assert frame_size(144) == 152


def test_committed_records_in_order_without_headers_or_padding() -> None:
    span = b"".join(_frame(_payload(i)) for i in range(5))
    records, used, discarded = committed_records(span, SIZE)
    assert records == b"".join(_payload(i) for i in range(5))
    assert (used, discarded) == (len(span), 0)


def test_stops_at_the_first_busy_record() -> None:
    span = _frame(_payload(1)) + _frame(_payload(2), BUSY_BIT) + _frame(_payload(3))
    records, used, _ = committed_records(span, SIZE)
    # Record 3 is committed but lies behind a busy one: it must wait.
    assert records == _payload(1)
    assert used == frame_size(SIZE)


def test_busy_first_consumes_nothing() -> None:
    assert committed_records(_frame(_payload(1), BUSY_BIT), SIZE) == (b"", 0, 0)


def test_discarded_records_are_skipped_but_consumed() -> None:
    span = _frame(_payload(1)) + _frame(_payload(2), DISCARD_BIT) + _frame(_payload(3))
    records, used, discarded = committed_records(span, SIZE)
    assert records == _payload(1) + _payload(3)
    assert (used, discarded) == (len(span), 1)


def test_a_partial_trailing_frame_is_left_for_later() -> None:
    span = _frame(_payload(1)) + _frame(_payload(2))[:10]
    records, used, _ = committed_records(span, SIZE)
    assert (records, used) == (_payload(1), frame_size(SIZE))


def test_a_frame_of_another_size_is_an_error_not_garbage() -> None:
    span = _frame(_payload(1)) + _frame(_payload(2), length=SIZE - 4)
    with pytest.raises(ValueError, match="16 bytes, expected 20"):
        committed_records(span, SIZE)


def test_empty_span() -> None:
    assert committed_records(b"", SIZE) == (b"", 0, 0)
