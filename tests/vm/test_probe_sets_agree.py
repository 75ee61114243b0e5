"""The kprobe and the tracepoint probe set, tracing the very same processes at once,
write the same report.

Both tracers attach before the gated workload runs, so they see the same sockets
at the same sock addresses, with the same pids, tids, fds, ports, states, stacks
and directions; only timestamps may differ. Each report is also checked against
what the workload printed, so two sets cannot agree on a wrong answer.
"""

from __future__ import annotations

from pathlib import Path

from tests.kernel.lifecycle import COMPARED, check_truth, report_rows, trace_lifecycle


def test_kprobe_and_tracepoint_reports_agree(root: None, tmp_path: Path) -> None:
    run = trace_lifecycle(tmp_path, ["kprobe", "tracepoint"])
    kp, tp = run.results["kprobe"], run.results["tracepoint"]
    assert (kp.probe_set, tp.probe_set) == ("kprobe", "tracepoint")
    kp_rows, tp_rows = report_rows(kp), report_rows(tp)
    for rows, result in ((kp_rows, kp), (tp_rows, tp)):
        try:
            check_truth(rows, run.truth, result.probe_set)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nlosses: {result.losses}\n{run.logs[result.probe_set]}"
            ) from None
    assert len(kp_rows) == len(tp_rows) == 8
    for a, b in zip(kp_rows, tp_rows, strict=True):
        differ = {
            c: (a[c], b[c]) for c in (*COMPARED, "open_state", "leak", "leak_class") if a[c] != b[c]
        }
        assert not differ, f"kprobe vs tracepoint differ on {a['direction']} fd {a['fd']}: {differ}"
    # The in-kernel ledgers agree too: the same sock addresses were followed.
    assert {c.key for c in kp.open_sockets} == {c.key for c in tp.open_sockets}
    assert kp.connections_seen == tp.connections_seen == 8
    for result in (kp, tp):
        for counter in (
            "events_dropped",
            "map_full",
            "ustack_failed",
            "accept_unresolved",
            "fd_unresolved",
            "records_undecodable",
            "deaths_lost",
        ):
            assert result.losses.get(counter, 0) == 0, (result.probe_set, counter, result.losses)
