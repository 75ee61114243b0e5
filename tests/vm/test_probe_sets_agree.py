"""The kprobe and the tracepoint probe set, tracing the very same processes at once,
write the same report.

Two `tcptrace` processes, one per probe set, attach before the gated workload runs,
so both see the same sockets with the same pids, tids, fds, ports, states, stacks
and directions; only timestamps may differ. Each report is also checked against
what the workload printed, so two sets cannot agree on a wrong answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.kernel.lifecycle import COMPARED, check_truth, report_rows, trace_lifecycle_cli

# Losses that must be zero in both runs.
ZERO = (
    "events_dropped",
    "map_full",
    "ustack_failed",
    "accept_unresolved",
    "fd_unresolved",
    "kretprobe_misses",
    "records_undecodable",
    "deaths_lost",
)


def test_kprobe_and_tracepoint_reports_agree(root: None, tmp_path: Path) -> None:
    run = trace_lifecycle_cli(tmp_path, ["kprobe", "tracepoint"])
    rows = {}
    for ps, directory in run.reports.items():
        meta = json.loads((directory / "meta.json").read_text())
        assert meta["probe_set"] == ps
        losses = meta["losses"]
        rows[ps] = report_rows(directory)
        try:
            check_truth(rows[ps], run.truth, ps)
            for counter in ZERO:
                assert losses.get(counter, 0) == 0, (counter, losses)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlosses: {losses}\n{run.outputs[ps]}") from None
    kp_rows, tp_rows = rows["kprobe"], rows["tracepoint"]
    assert len(kp_rows) == len(tp_rows) == 8
    refused_pid = run.truth.pids["refused"]
    for a, b in zip(kp_rows, tp_rows, strict=True):
        differ = {
            c: (a[c], b[c]) for c in (*COMPARED, "open_state", "leak", "leak_class") if a[c] != b[c]
        }
        # The one documented difference: a connect() refused before it was ever
        # ESTABLISHED. Its local port is picked after the CLOSE->SYN_SENT change and
        # released before the CLOSE change is traced, so the tracepoint set never
        # sees it (0); the kprobe set reads it at tcp_connect.
        if a["pid"] == refused_pid and differ.get("lport", (0, 1))[1] == 0:
            assert a["lport"] > 0, a
            differ.pop("lport")
        assert not differ, f"kprobe vs tracepoint differ on {a['direction']} fd {a['fd']}: {differ}"
