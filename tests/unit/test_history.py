"""Bulk death decoding and the streamed connections table, without root."""

from __future__ import annotations

import ctypes
import json
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tcptrace.events import RECORD_DTYPE, RawSocketRecord, RecordFlag, RecordKind, TcpState
from tcptrace.history import ConnectionHistory, death_rows, split_records
from tcptrace.report import RunMeta, load_report, write_report
from tcptrace.report.schema import SCHEMA_VERSION, connections_frame, dtypes
from tcptrace.sockets import StackStatus

S = 1_000_000_000


def raw_death(sk: int, birth_s: float, death_s: float, **kw: object) -> bytes:
    r = RawSocketRecord()
    r.kind = RecordKind.DEATH
    r.sk = sk
    r.birth_ns = int(birth_s * S)
    r.ts_ns = int(death_s * S)
    r.tgid, r.tid, r.fd = 100, 101, 7
    r.family = 2
    r.laddr[:4] = [127, 0, 0, 1]
    r.raddr[:4] = [127, 0, 0, 2]
    r.lport, r.rport = 40000, 8080
    r.state = TcpState.CLOSE
    r.direction = 1
    r.flags = RecordFlag.FD_CLOSED
    r.user_stack_id = 3
    r.comm = b"client"
    r.bytes_acked, r.bytes_received = 10, 20
    for key, value in kw.items():
        setattr(r, key, value)
    return bytes(r)


def stacks(tgid: int, stack_id: int, kernel_stack_id: int) -> tuple[tuple[str, ...], StackStatus]:
    return ("main", f"site{stack_id}"), StackStatus.OK


def to_epoch(ns: np.ndarray) -> np.ndarray:
    return 1_000_000.0 + ns.astype(np.float64) / 1e9


def test_dtype_mirrors_the_ctypes_record() -> None:
    assert RECORD_DTYPE.itemsize == ctypes.sizeof(RawSocketRecord)
    for field in RawSocketRecord._fields_:
        name = field[0]
        assert RECORD_DTYPE.fields is not None
        assert RECORD_DTYPE.fields[name][1] == getattr(RawSocketRecord, name).offset, name


def test_split_and_rows_match_the_schema() -> None:
    exit_rec = RawSocketRecord()
    exit_rec.kind = RecordKind.EXIT
    exit_rec.tgid = 200
    raw = b"".join(
        [
            raw_death(0xA, 1.0, 1.5),
            bytes(exit_rec),
            raw_death(
                0xB,
                1.0,
                3.0,
                tgid=200,
                flags=0,
                fd=-1,
                family=10,
                comm=b"srv",
                direction=2,
                user_stack_id=-14,
            ),
        ]
    )
    deaths, others = split_records(raw)
    assert len(deaths) == 2 and len(others) == 1 and others["tgid"][0] == 200
    frame = death_rows(deaths, to_epoch, stacks, exited={200: 2 * S})
    assert dict(frame.dtypes.astype(str)) == {
        k: str(pd.api.types.pandas_dtype(v)) for k, v in dtypes("connections").items()
    }
    first, second = frame.iloc[0], frame.iloc[1]
    assert (first.pid, first.comm, first.fd, first.laddr, first.raddr) == (
        100,
        "client",
        7,
        "127.0.0.1",
        "127.0.0.2",
    )
    assert first.direction == "connect" and first.final_state == "CLOSE"
    assert first.close_cause == "app" and bool(first.fd_closed_by_app)
    assert first.duration_s == pytest.approx(0.5)
    assert first["stack"] == "main;site3" and first.stack_status == "ok"
    assert (first.bytes_sent, first.bytes_received) == (10, 20)
    # Died after its process exited, fd never closed by the app: closed by exit.
    assert second.close_cause == "exit" and bool(second.fd_closed_by_app)
    assert second.family == "ipv6" and second.direction == "accept" and second.comm == "srv"
    assert pd.isna(second.fd)
    assert second.laddr == "7f00:1::"  # raw bytes 127.0.0.1 read as IPv6: formatting is per family


def test_partial_record_is_refused() -> None:
    with pytest.raises(ValueError):
        split_records(raw_death(1, 1, 2)[:-1])


def test_streamed_report_equals_what_the_loader_reads(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    history = ConnectionHistory(out, flush_rows=3)  # several row groups and CSV appends
    deaths, _ = split_records(b"".join(raw_death(0x10 + i, 1.0, 2.0 + i) for i in range(7)))
    history.append(death_rows(deaths[:4], to_epoch, stacks, {}))
    history.append(death_rows(deaths[4:], to_epoch, stacks, {}))
    history.sync()  # appends never wait for a busy writer thread
    assert sorted(p.name for p in out.iterdir()) == [
        "connections.csv.part",
        "connections.parquet.part",
    ]
    meta = RunMeta(
        tool_version="t",
        schema_version=SCHEMA_VERSION,
        host="h",
        kernel="k",
        probe_set="tracepoint",
        pids=(100,),
        threshold_s=1.0,
        started_at=1.0,
        ended_at=2.0,
        losses={},
    )
    write_report(out, [], 1_000_010.0, 1.0, meta, history=history)
    names = sorted(p.name for p in out.iterdir())
    assert not any(n.endswith(".part") for n in names)
    assert {"connections.csv", "connections.parquet", "meta.json"} <= set(names)
    for name in ("connections.csv", "connections.parquet"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert json.loads((out / "meta.json").read_text())["tables"]["connections"]["rows"] == 7
    report = load_report(out)
    conns = report.connections
    assert len(conns) == 7 and list(conns.lport) == [40000] * 7
    assert list(conns.duration_s.round(3)) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    # The CSV copy (read back alone) holds the same rows.
    (out / "connections.parquet").unlink()
    meta_json = json.loads((out / "meta.json").read_text())
    meta_json["files"] = [f for f in meta_json["files"] if not f.endswith(".parquet")]
    (out / "meta.json").write_text(json.dumps(meta_json))
    from_csv = load_report(out).connections
    pd.testing.assert_frame_equal(from_csv, conns)


def test_row_builder_agrees_with_the_ledger_row_builder() -> None:
    """Rows from bulk deaths and rows from Connection objects have one schema."""
    deaths, _ = split_records(raw_death(0xA, 1.0, 2.0))
    bulk = death_rows(deaths, to_epoch, stacks, {})
    single = connections_frame([], 0.0)
    assert list(bulk.columns) == list(single.columns)
    assert list(bulk.dtypes) == list(single.dtypes)


def test_iso_timestamps_match_numpy_and_keep_nulls() -> None:
    import pyarrow as pa

    from tcptrace.history import _iso_utc

    rng = np.random.default_rng(7)
    micros = np.concatenate(
        [rng.integers(-10**15, 4 * 10**15, 500), 1_764_303_656_000_000 + rng.integers(0, 3, 50)]
    )
    column = pa.array(
        [None if i % 17 == 0 else int(us) * 1000 for i, us in enumerate(micros)],
        type=pa.timestamp("ns", tz="UTC"),
    )
    expected = [
        None if i % 17 == 0 else f"{np.datetime_as_string(np.datetime64(int(us), 'us'), 'us')}Z"
        for i, us in enumerate(micros)
    ]
    assert _iso_utc(column).to_pylist() == expected
    assert _iso_utc(pa.chunked_array([column[:10], column[10:]])).to_pylist() == expected
