"""The soak script's pure parts: ss parsing, ledger keys, the RSS verdict."""

from __future__ import annotations

import pandas as pd

from benchmarks.soak import ledger_keys, parse_ss, peak_ok, rss_verdict, wait_with_peak

SS = "\n".join(
    [
        'LISTEN 0 128 127.0.0.1:41453 0.0.0.0:* users:(("accept_server",pid=1515,fd=3))',
        'ESTAB 0 0 127.0.0.1:41453 127.0.0.1:35872 users:(("accept_server",pid=1515,fd=5))',
        'CLOSE-WAIT 1 0 127.0.0.1:41453 127.0.0.1:35880 users:(("accept_server",pid=1515,fd=6))',
        "ESTAB 0 0 127.0.0.1:35872 127.0.0.1:41453"
        ' users:(("dialer",pid=1600,fd=3),("dialer",pid=1601,fd=4))',
        "TIME-WAIT 0 0 127.0.0.1:50000 127.0.0.1:41453",
        'ESTAB 0 0 [::1]:8080 [::1]:40000 users:(("odd ) name",pid=1515,fd=9))',
        'ESTAB 0 0 127.0.0.1:22 127.0.0.1:4000 users:(("sshd",pid=99,fd=3))',
    ]
)


def test_parse_ss_keeps_the_targets_sockets_per_holder() -> None:
    found = parse_ss(SS, {1515, 1600, 1601})
    assert found == {
        (1515, 3, "LISTEN", 41453, 0),
        (1515, 5, "ESTABLISHED", 41453, 35872),
        (1515, 6, "CLOSE_WAIT", 41453, 35880),
        (1600, 3, "ESTABLISHED", 35872, 41453),  # a socket shared over fork: both holders
        (1601, 4, "ESTABLISHED", 35872, 41453),
        (1515, 9, "ESTABLISHED", 8080, 40000),
    }


def test_ledger_keys_from_report_rows() -> None:
    rows = pd.DataFrame(
        {"pid": [1515, 1515], "fd": pd.array([5, None], dtype="Int64"),
         "state": ["ESTABLISHED", "CLOSE"], "lport": [41453, 0], "rport": [35872, 0]}
    ).to_dict("records")
    assert ledger_keys(rows) == {(1515, 5, "ESTABLISHED", 41453, 35872), (1515, -1, "CLOSE", 0, 0)}


def test_rss_verdict_flat_and_growing() -> None:
    flat = [(float(t), 300.0 + (5.0 if t % 20 == 0 else 0.0)) for t in range(0, 600, 10)]
    verdict = rss_verdict(flat, warmup_s=60, slack_mb=16)
    assert verdict.flat and abs(verdict.growth_mb) <= 5
    growing = [(float(t), 300.0 + t * 0.2) for t in range(0, 600, 10)]  # 720 MB/h
    verdict = rss_verdict(growing, warmup_s=60, slack_mb=16)
    assert not verdict.flat
    assert verdict.slope_mb_per_hour is not None and abs(verdict.slope_mb_per_hour - 720) < 1


def test_peak_verdict() -> None:
    assert peak_ok(400.0, 300.0, 1.5)
    assert not peak_ok(1683.9, 317.7, 1.5)  # the hour soak of session 2


def test_wait_with_peak_reports_the_childs_peak() -> None:
    import subprocess
    import sys

    code = "b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
    proc = subprocess.Popen([sys.executable, "-c", code], text=True)
    rc, peak_mb = wait_with_peak(proc, 60)
    assert rc == 0 and proc.returncode == 0
    assert peak_mb >= 200
