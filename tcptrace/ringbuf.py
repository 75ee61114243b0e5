"""Read a BPF ring buffer in bulk through its memory mapping (issue 6).

bcc's `ring_buffer_consume` calls a Python function once per record. At full
churn that is ~60k calls/s and most of the tracer's CPU, on the same two cores
as the traced service. The kernel lets user space map the ring buffer instead
(the same layout libbpf's ring_buffer reads): a writable consumer page holding
`consumer_pos`, then a read-only producer page holding `producer_pos`, then the
data area, mapped twice in a row so a span that wraps is still contiguous. Each
record is an 8-byte header (length with BUSY and DISCARD bits, page offset)
followed by the data, padded to 8 bytes.

Every record of ours has the same size, so a span of committed records is a
plain array: one numpy view per poll, whatever the number of records.

Only on x86-64, whose loads are not reordered with other loads: the header is
read before the data without an explicit acquire fence, which Python cannot
issue. Other architectures keep bcc's callback (see tcptrace.probes).
"""

from __future__ import annotations

import mmap
import platform
import struct

import numpy as np

BUSY_BIT = 1 << 31  # reserved by a producer, not committed yet
DISCARD_BIT = 1 << 30  # committed as discarded: skip it
HEADER_SIZE = 8
_LENGTH_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
_POS = struct.Struct("<Q")


def supported() -> bool:
    """Whether the bulk reader is safe on this machine (see the module docstring)."""
    return platform.machine() in ("x86_64", "amd64")


def frame_size(record_size: int) -> int:
    return (record_size + HEADER_SIZE + 7) & ~7


def committed_records(span: memoryview | bytes, record_size: int) -> tuple[bytes, int, int]:
    """Records committed at the front of `span` (a run of ring buffer frames).

    Returns (the records' bytes, concatenated, without headers; how many bytes of
    the span they used, discarded records included; how many records were
    discarded). Stops before the first busy record: what follows it is not
    ours to read yet. Raises ValueError on a frame of another size.
    """
    stride = frame_size(record_size)
    count = len(span) // stride
    if count == 0:
        return b"", 0, 0
    frames = np.frombuffer(span, dtype=np.uint8, count=count * stride).reshape(count, stride)
    # Copy the headers once: the producer may commit more while we look.
    headers = frames[:, :4].copy().view("<u4").ravel()
    busy = np.flatnonzero(headers & BUSY_BIT)
    if busy.size:
        count = int(busy[0])
        frames, headers = frames[:count], headers[:count]
    if np.any((headers & _LENGTH_MASK) != record_size):
        bad = int(headers[np.flatnonzero((headers & _LENGTH_MASK) != record_size)[0]])
        raise ValueError(
            f"ring buffer record of {bad & _LENGTH_MASK} bytes, expected {record_size}"
        )
    keep = (headers & DISCARD_BIT) == 0
    data = frames[:, HEADER_SIZE : HEADER_SIZE + record_size]
    discarded = int(count - np.count_nonzero(keep))
    if discarded:
        data = data[keep]
    return data.tobytes(), count * stride, discarded


class MappedRingBuffer:
    """The consumer side of one BPF_MAP_TYPE_RINGBUF map, read in bulk."""

    def __init__(self, map_fd: int, data_size: int, record_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self._record_size = record_size
        self._mask = data_size - 1
        self._consumer = mmap.mmap(
            map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        try:
            self._producer = mmap.mmap(
                map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            self._consumer.close()
            raise
        self._data = memoryview(self._producer)[page:]
        self.discarded = 0

    def consume(self) -> bytes:
        """Every committed record, concatenated; frees their space for the producer."""
        (consumer_pos,) = _POS.unpack_from(self._consumer, 0)
        (producer_pos,) = _POS.unpack_from(self._producer, 0)
        pending = producer_pos - consumer_pos
        if pending <= 0:
            return b""
        start = consumer_pos & self._mask
        # The data area is mapped twice in a row, so this slice never wraps.
        span = self._data[start : start + pending]
        try:
            records, used, discarded = committed_records(span, self._record_size)
        finally:
            span.release()
        if used:
            self.discarded += discarded
            _POS.pack_into(self._consumer, 0, consumer_pos + used)
        return records

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()
