"""The probe sets on the running kernel: verifier, choice, and a real lifecycle.

The lifecycle test traces tests/kernel/lifecycle.py's workload with the probe set
named by TCPTRACE_PROBES (auto when unset: tracepoints on our machines), and checks
the report against what the workload itself printed. scripts/vm-test runs this file
in a Debian 12 VM under TCPTRACE_PROBES=kprobe and =tracepoint.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tcptrace import system
from tcptrace.btf import kernel_offsets
from tcptrace.probes import KPROBE_ATTACHMENTS, CaptureConfig, ProbeSet, load_without_attaching
from tests.kernel.lifecycle import check_truth, kernel_config, report_rows, trace_lifecycle

pytestmark = pytest.mark.kernel


def _kprobes_configured() -> bool:
    config = kernel_config()
    if config is None:
        pytest.skip("no kernel config (/proc/config.gz, /boot/config-*) to tell if kprobes exist")
    return config.get("CONFIG_KPROBES") == "y"


def test_both_probe_sets_compile_and_pass_the_verifier(root: None) -> None:
    # bcc compiles each set with this kernel's BTF offsets and loads every program
    # through this kernel's verifier; kprobe programs load as BPF_PROG_TYPE_KPROBE,
    # which needs no CONFIG_KPROBES, so this holds even where none can be attached.
    kp = set(load_without_attaching(CaptureConfig(pids=(), probe_set=ProbeSet.KPROBE)))
    tp = set(load_without_attaching(CaptureConfig(pids=(), probe_set=ProbeSet.TRACEPOINT)))
    shared = kp & tp
    # connect()/listen() fds come from the syscall's saved registers where BPF can
    # read them (x86-64, 5.15+: this machine and the VM), else from tracepoints.
    from_registers = kernel_offsets().TT_OFF_REGS_ARG1 >= 0
    assert from_registers == (platform.machine() == "x86_64")
    fd_tracepoints = {n for n in shared if n.endswith(("_sys_enter_connect", "_sys_enter_listen"))}
    assert len(fd_tracepoints) == (0 if from_registers else 2), shared
    # The probes both sets take from common.bpf.h.
    for needed in (
        "sys_enter_close",
        "sys_enter_close_range",
        "sys_exit_accept",
        "sys_exit_accept4",
        "sched_process_exit",
        "tcp_destroy_sock",
    ):
        assert any(name.endswith("_" + needed) for name in shared), (needed, shared)
    assert kp - shared == {a.program for a in KPROBE_ATTACHMENTS}
    assert [name for name in tp - shared if "inet_sock_set_state" in name], tp - shared


def test_follow_forks_and_kernel_stacks_variants_load(root: None) -> None:
    loaded = load_without_attaching(
        CaptureConfig(pids=(), probe_set=ProbeSet.KPROBE, follow_forks=True, kernel_stacks=True)
    )
    assert "raw_tracepoint__sched_process_fork" in loaded


def test_probe_choice_follows_the_kernel_config(root: None) -> None:
    picked, why = system.choose_probe_set("auto")
    if _kprobes_configured():
        assert (picked, system.kprobe_set_problem()) == ("kprobe", None), why
        assert system.choose_probe_set("kprobe") == ("kprobe", "requested with --probes kprobe")
    else:
        assert picked == "tracepoint"
        assert "this kernel has no kprobes" in why


def test_cli_kprobe_request_without_kprobes_is_one_line_and_exit_5(
    root: None, tmp_path: Path
) -> None:
    if _kprobes_configured():
        # The VM side of this is test_probe_choice_follows_the_kernel_config plus
        # the lifecycle test run with TCPTRACE_PROBES=kprobe.
        assert system.choose_probe_set("kprobe")[0] == "kprobe"
        return
    cli = [sys.executable, "-m", "tcptrace.cli", "--pid", str(os.getpid())]
    proc = subprocess.run(
        [*cli, "--probes", "kprobe", "--output", str(tmp_path / "r1")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tcptrace: error: kprobe probe set unavailable: this kernel has no")
    assert "--probes tracepoint" in lines[0]
    assert not (tmp_path / "r1").exists()

    # auto falls back to tracepoints and says why, then traces.
    proc = subprocess.run(
        [*cli, "--duration", "1s", "--output", str(tmp_path / "r2")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "probe set tracepoint (auto: kprobe set unavailable, this kernel has no kprobes" in first
    assert (tmp_path / "r2" / "meta.json").is_file()


def test_lifecycle_records_match_the_workload(root: None, tmp_path: Path) -> None:
    requested = os.environ.get("TCPTRACE_PROBES", "auto")
    run = trace_lifecycle(tmp_path, [requested])
    result = run.results[requested]
    if requested != "auto":
        assert result.probe_set == requested
    try:
        check_truth(report_rows(result), run.truth, result.probe_set)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlosses: {result.losses}\n{run.logs[requested]}") from None
    # Nothing was lost on the way: no drops, no unresolved accept or fd.
    for counter in (
        "events_dropped",
        "map_full",
        "ustack_failed",
        "accept_unresolved",
        "fd_unresolved",
        "kretprobe_misses",
        "records_undecodable",
        "deaths_lost",
    ):
        assert result.losses.get(counter, 0) == 0, (counter, result.losses)


@pytest.mark.parametrize("fds_from", ["registers", "tracepoints"])
def test_connect_and_listen_fds_from_both_sources(root: None, fds_from: str) -> None:
    # Where the kernel allows it the fd comes from the syscall's saved registers;
    # elsewhere from syscalls:sys_enter_connect/listen. Both paths run here: the
    # second by withholding the register offsets, as on an older kernel.
    import dataclasses
    import socket

    from tcptrace.events import RecordKind, SocketRecord
    from tcptrace.probes import Capture

    offsets = kernel_offsets()
    assert offsets.TT_OFF_REGS_ARG1 >= 0  # x86-64 on 5.15+: both paths exist here
    if fds_from == "tracepoints":
        offsets = dataclasses.replace(offsets, TT_OFF_REGS_ARG1=-1, TT_OFF_REGS_SYSCALL_NR=-1)
    config = CaptureConfig(pids=(os.getpid(),), announce_all_births=True)
    records: list[SocketRecord] = []
    with Capture(config, offsets=offsets) as cap:
        names = {p.name for p in cap.program_stats()}
        has_tracepoints = any(n.endswith("_sys_enter_connect") for n in names)
        assert has_tracepoints == (fds_from == "tracepoints"), names
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            cap.drain(records.append)
            want = {
                "listen": (listener.getsockname()[1], listener.fileno()),
                "connect": (0, client.fileno()),
                "accept": (listener.getsockname()[1], server.fileno()),
            }
            client.close()
            server.close()
        stats = cap.stats()
    births = {r.direction.value: r for r in records if r.kind is RecordKind.BIRTH and r.direction}
    assert births["listen"].fd == want["listen"][1]
    assert births["listen"].lport == want["listen"][0]
    assert births["connect"].fd == want["connect"][1]
    assert births["accept"].fd == want["accept"][1]
    assert stats["fd_unresolved"] == 0
