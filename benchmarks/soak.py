"""Soak: tcptrace on a service with churn and leaks for a long time (issue 7). Run as root.

    sudo scripts/soak                  # one hour (the default)
    sudo scripts/soak --minutes 10     # what the README reports
    sudo scripts/soak --minutes 1      # CI smoke run

The traced target is a small supervisor process (the "service"), traced with
--follow-forks, that for --minutes keeps running, as its children:
- `churn` at --churn-rate connections/s (short, correctly closed connections;
  restarted when it ends, as workloads run at most 10 minutes);
- one `accept_server` that never closes what it accepts (restarted every
  --server-minutes: its leaked sockets then close by exit);
- a `dialer` every --dial-every seconds, holding 2 connections to that server
  for a random time, every other one closing at once (the server is left in
  CLOSE_WAIT), the others keeping them ESTABLISHED (a client-side leak).
While it runs, tcptrace's RSS and CPU time are sampled every --sample-every
seconds. At the end the churn is stopped (quiesced), `ss -tanp` is read, then
tcptrace is stopped with SIGINT and its report's open sockets are compared with
ss, socket by socket: (pid, fd, state, local port, remote port).

Verdicts (exit 0 only if all hold): tcptrace exited 0; the ledger equals ss; RSS
is flat after warm-up (growth <= max(--rss-slack-mb, 10%)); the peak RSS of the
whole run, writing the final report included (ru_maxrss), is at most
--max-peak-factor (1.5) x the RSS at the end of the trace. Nonzero loss
counters are printed (and in soak.json), not judged: at high churn a few kernel
recursion misses are expected and counted. Everything it starts dies with it
(PR_SET_PDEATHSIG) and is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TCPTRACE = str(Path(sys.executable).with_name("tcptrace"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1

# ss state names -> the kernel's (and the report's).
SS_STATES = {
    "ESTAB": "ESTABLISHED",
    "SYN-SENT": "SYN_SENT",
    "SYN-RECV": "SYN_RECV",
    "FIN-WAIT-1": "FIN_WAIT1",
    "FIN-WAIT-2": "FIN_WAIT2",
    "TIME-WAIT": "TIME_WAIT",
    "UNCONN": "CLOSE",
    "CLOSE-WAIT": "CLOSE_WAIT",
    "LAST-ACK": "LAST_ACK",
    "LISTEN": "LISTEN",
    "CLOSING": "CLOSING",
}
_USER = re.compile(r'\("(?:[^"\\]|\\.)*",pid=(\d+),fd=(\d+)\)')

SocketKey = tuple[int, int, str, int, int]  # pid, fd, state, local port, remote port


# -- pure helpers (unit-tested) ------------------------------------------------------------


def _port(endpoint: str) -> int:
    """Port of "127.0.0.1:80", "[::1]:80", "*:80" or "[::ffff:127.0.0.1]:80"."""
    tail = endpoint.rsplit(":", 1)[1]
    return 0 if tail == "*" else int(tail)


def parse_ss(text: str, pids: Iterable[int]) -> set[SocketKey]:
    """Sockets of `pids` in `ss -tanpH` output, one key per (process, fd) holding it."""
    wanted = set(pids)
    found: set[SocketKey] = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        state = SS_STATES.get(parts[0], parts[0])
        local, peer = _port(parts[3]), _port(parts[4])
        users = " ".join(parts[5:])
        for pid_text, fd_text in _USER.findall(users):
            pid = int(pid_text)
            if pid in wanted:
                found.add((pid, int(fd_text), state, local, peer))
    return found


def ledger_keys(rows: Iterable[Mapping[Any, Any]]) -> set[SocketKey]:
    """The same keys from report open_sockets rows (fd -1 when the report has none)."""
    import pandas as pd

    keys: set[SocketKey] = set()
    for row in rows:
        fd = row["fd"]
        keys.add(
            (
                int(row["pid"]),
                -1 if fd is None or pd.isna(fd) else int(fd),  # NA: unknown
                str(row["state"]),
                int(row["lport"]),
                int(row["rport"]),
            )
        )
    return keys


@dataclass(frozen=True)
class RssVerdict:
    baseline_mb: float  # median RSS just after warm-up
    end_mb: float  # median RSS of the last fifth
    peak_mb: float
    growth_mb: float
    slope_mb_per_hour: float | None
    flat: bool


def rss_verdict(
    samples: Sequence[tuple[float, float]], warmup_s: float, slack_mb: float
) -> RssVerdict:
    """Is RSS flat after warm-up? samples: (seconds since start, MB)."""
    after = [(t, mb) for t, mb in samples if t >= warmup_s] or list(samples)
    if not after:
        return RssVerdict(0.0, 0.0, 0.0, 0.0, None, False)
    fifth = max(1, len(after) // 5)
    baseline = statistics.median(mb for _, mb in after[:fifth])
    end = statistics.median(mb for _, mb in after[-fifth:])
    growth = end - baseline
    slope = None
    if len(after) >= 3 and after[-1][0] > after[0][0]:
        xs = [t for t, _ in after]
        ys = [mb for _, mb in after]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        if den > 0:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 3600
    allowed = max(slack_mb, 0.10 * baseline)
    return RssVerdict(
        baseline_mb=round(baseline, 1),
        end_mb=round(end, 1),
        peak_mb=round(max(mb for _, mb in after), 1),
        growth_mb=round(growth, 1),
        slope_mb_per_hour=None if slope is None else round(slope, 1),
        flat=growth <= allowed,
    )


# -- the service: runs as the traced process --------------------------------------------

SERVICE = r"""
import json, os, random, signal, subprocess, sys, time, ctypes
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None)
def child_setup():
    libc.prctl(1, signal.SIGKILL)  # die with the service
    signal.signal(signal.SIGINT, signal.SIG_DFL)
def spawn(argv, **kw):
    return subprocess.Popen(argv, preexec_fn=child_setup, stdin=subprocess.DEVNULL, **kw)
stop = {"now": False}
signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
if sys.stdin.readline().strip() != "GO":
    sys.exit(1)
end = time.monotonic() + cfg["seconds"]
churn = server = None
port = None
server_end = 0.0
dialers = []
next_dial = time.monotonic()
counts = {"churn_runs": 0, "servers": 0, "dialers": 0}
while time.monotonic() < end and not stop["now"]:
    now = time.monotonic()
    if churn is None or churn.poll() is not None:
        left = max(5, min(600, int(end - now) + 1))
        churn = spawn([cfg["churn"], "--rate", str(cfg["rate"]), "--ports", "8",
                       "--seconds", str(left)], stdout=subprocess.DEVNULL)
        counts["churn_runs"] += 1
    if server is None or server.poll() is not None or now >= server_end:
        if server is not None and server.poll() is None:
            server.terminate(); server.wait()
        hold = int(min(600, cfg["server_s"] + 30))
        server = spawn([cfg["server"], "--port", "0", "--count", "10000", "--hold", str(hold)],
                       stdout=subprocess.PIPE, text=True)
        port = json.loads(server.stdout.readline().split(" ", 1)[1])["port"]
        server_end = now + cfg["server_s"]
        counts["servers"] += 1
    if now >= next_dial and len(dialers) < 60:
        close = counts["dialers"] % 2 == 0
        hold = random.randint(30, 300)
        argv = [cfg["dialer"], "--port", str(port), "--count", "2", "--hold", str(hold)]
        dialers.append(spawn(argv + (["--close"] if close else []), stdout=subprocess.DEVNULL))
        counts["dialers"] += 1
        next_dial = now + cfg["dial_every"]
    dialers = [d for d in dialers if d.poll() is None]
    time.sleep(0.2)
# Quiesce: no more churn, and the processes holding sockets frozen (SIGSTOP), so
# a dialer whose hold ends cannot change anything between ss and the report.
if churn is not None and churn.poll() is None:
    churn.terminate(); churn.wait()
holders = [p for p in [server, *dialers] if p is not None and p.poll() is None]
for p in holders:
    os.kill(p.pid, signal.SIGSTOP)
live = [p.pid for p in holders if p.poll() is None]
print("QUIESCED " + json.dumps({"pids": live, **counts}), flush=True)
sys.stdin.readline()  # until the soak says it has compared
for p in [server, *dialers]:
    if p is not None and p.poll() is None:
        p.kill(); p.wait()
"""


# -- the run -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Sample:
    t: float
    rss_mb: float
    cpu_s: float


@dataclass
class Sampler:
    pid: int
    every_s: float
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _t0: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        threading.Thread(target=self._run, name="soak-sampler", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            sample = self.read()
            if sample is None:
                return
            self.samples.append(sample)

    def read(self) -> Sample | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmRSS:"))
        cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK
        return Sample(round(time.monotonic() - self._t0, 1), rss_kb / 1024, cpu)

    def stop(self) -> None:
        self._stop.set()


def wait_with_peak(proc: subprocess.Popen[str], timeout: float) -> tuple[int, float]:
    """Wait for `proc`; returns its exit code and its peak RSS in MB over its whole
    life (the kernel's ru_maxrss): the end-of-run report included, which RSS samples
    every few seconds can miss."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)


def peak_ok(peak_mb: float, end_mb: float, factor: float) -> bool:
    """The whole run's peak within `factor` x the RSS of the trace's last fifth.

    ru_maxrss covers the whole life: the BPF compile at start-up and the final
    report included, so a failure says "somewhere", not which; the RSS samples
    (every --sample-every s) and their times say more."""
    return peak_mb <= factor * end_mb


def _lines(stream: Any, sink: list[str], cond: threading.Condition) -> None:
    for line in stream:
        with cond:
            sink.append(line.rstrip("\n"))
            cond.notify_all()


def _wait_line(sink: list[str], cond: threading.Condition, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            for line in sink:
                if needle in line:
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {needle!r} within {timeout:g}s; got {sink[-5:]}")
            cond.wait(left)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tcptrace.report import load_report
    from tcptrace.workloads.build import build

    out_dir = Path(args.output or tempfile.mkdtemp(prefix="tcptrace-soak-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report_dir = out_dir / "report"
    seconds = args.minutes * 60
    cfg = {
        "churn": str(build("churn")),
        "server": str(build("accept_server")),
        "dialer": str(build("dialer")),
        "seconds": seconds,
        "rate": args.churn_rate,
        "server_s": args.server_minutes * 60,
        "dial_every": args.dial_every,
    }
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE, json.dumps(cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent,
    )
    tracer: subprocess.Popen[str] | None = None
    try:
        tracer = subprocess.Popen(
            [TCPTRACE, "--pid", str(service.pid), "--follow-forks", "--output", str(report_dir),
             "--threshold", "30s", "--interval", "60s"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=_die_with_parent,
        )
        lines: list[str] = []
        cond = threading.Condition()
        assert tracer.stdout is not None
        threading.Thread(target=_lines, args=(tracer.stdout, lines, cond), daemon=True).start()
        _wait_line(lines, cond, "probes attached", 120)
        sampler = Sampler(tracer.pid, args.sample_every)
        sampler.start()
        assert service.stdin is not None and service.stdout is not None
        service.stdin.write("GO\n")
        service.stdin.flush()
        print(f"soak: {args.minutes:g} min, churn {args.churn_rate}/s, tcptrace pid"
              f" {tracer.pid}, service pid {service.pid}, output {out_dir}", flush=True)
        quiesced_line = service.stdout.readline()
        if not quiesced_line.startswith("QUIESCED "):
            raise RuntimeError(f"service ended early: {quiesced_line!r}")
        quiesced = json.loads(quiesced_line.split(" ", 1)[1])
        time.sleep(3)  # the last churn deaths drain, scans settle
        targets = {service.pid, *quiesced["pids"]}
        ss_text = subprocess.run(
            ["ss", "-tanpH"], capture_output=True, text=True, check=True
        ).stdout
        from_ss = parse_ss(ss_text, targets)
        tracer.send_signal(signal.SIGINT)
        rc, peak_mb = wait_with_peak(tracer, 300)
        sampler.stop()
        service.stdin.write("DONE\n")
        service.stdin.flush()
        service.wait(30)
    finally:
        for proc in (tracer, service):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    report = load_report(report_dir)
    opened = report.open_sockets.to_dict("records")
    from_ledger = ledger_keys(opened)
    samples = [(s.t, s.rss_mb) for s in sampler.samples]
    verdict = rss_verdict(samples, warmup_s=min(120.0, seconds * 0.25), slack_mb=args.rss_slack_mb)
    cpu = sampler.samples[-1].cpu_s if sampler.samples else None
    peak_fine = peak_ok(peak_mb, verdict.end_mb, args.max_peak_factor)
    losses = {k: v for k, v in report.meta["losses"].items() if v}
    summary: dict[str, Any] = {
        "minutes": args.minutes,
        "churn_rate": args.churn_rate,
        "tcptrace_exit": rc,
        "service": quiesced,
        "connections_in_report": int(report.meta["tables"]["connections"]["rows"]),
        "open_in_ledger": len(from_ledger),
        "open_in_ss": len(from_ss),
        "ledger_equals_ss": from_ledger == from_ss,
        "only_in_ledger": sorted(from_ledger - from_ss)[:20],
        "only_in_ss": sorted(from_ss - from_ledger)[:20],
        "rss": asdict(verdict),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_ok": peak_fine,
        "max_peak_factor": args.max_peak_factor,
        "tcptrace_cpu_s": cpu,
        "tcptrace_cpu_pct": None if cpu is None else round(100 * cpu / max(seconds, 1), 1),
        "losses_nonzero": losses,
        "samples": [asdict(s) for s in sampler.samples],
        "report": str(report_dir),
    }
    summary["ok"] = bool(rc == 0 and summary["ledger_equals_ss"] and verdict.flat and peak_fine)
    (out_dir / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def render(summary: dict[str, Any], every: int = 1) -> str:
    rss = summary["rss"]
    lines = ["", "  t(s)   RSS(MB)  CPU(s)"]
    samples = summary["samples"]
    step = max(1, len(samples) // 30) if every == 1 else every
    for s in samples[::step]:
        lines.append(f"{s['t']:6.0f}  {s['rss_mb']:8.1f}  {s['cpu_s']:6.1f}")
    lines += [
        "",
        f"connections in the report: {summary['connections_in_report']}"
        f" (service: {summary['service']})",
        f"open sockets: ledger {summary['open_in_ledger']}, ss {summary['open_in_ss']}:"
        f" {'EQUAL' if summary['ledger_equals_ss'] else 'DIFFERENT'}",
    ]
    if not summary["ledger_equals_ss"]:
        lines.append(f"  only in ledger: {summary['only_in_ledger']}")
        lines.append(f"  only in ss:     {summary['only_in_ss']}")
    slope = rss["slope_mb_per_hour"]
    lines += [
        f"RSS after warm-up: {rss['baseline_mb']} MB -> {rss['end_mb']} MB"
        f" (peak {rss['peak_mb']}, slope {slope} MB/h): {'FLAT' if rss['flat'] else 'GROWING'}",
        f"peak RSS of the whole run, final report included: {summary['peak_rss_mb']} MB"
        f" (limit {summary['max_peak_factor']:g} x {rss['end_mb']} MB):"
        f" {'OK' if summary['peak_ok'] else 'TOO HIGH'}",
        f"tcptrace CPU: {summary['tcptrace_cpu_s']} s ({summary['tcptrace_cpu_pct']}% of one core)",
        f"nonzero loss counters: {summary['losses_nonzero'] or 'none'}",
        f"tcptrace exit code: {summary['tcptrace_exit']}",
        f"verdict: {'PASS' if summary['ok'] else 'FAIL'}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--churn-rate", type=int, default=2000, help="connections/s")
    parser.add_argument("--server-minutes", type=float, default=8.0,
                        help="restart the leaking server this often (its leaks close by exit)")
    parser.add_argument("--dial-every", type=float, default=5.0, help="seconds between dialers")
    parser.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling, seconds")
    parser.add_argument("--rss-slack-mb", type=float, default=16.0)
    parser.add_argument("--max-peak-factor", type=float, default=1.5,
                        help="peak RSS (final report included) at most this x the end RSS")
    parser.add_argument("--output", default=None, help="directory for soak.json and the report")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: run as root (sudo scripts/soak)", file=sys.stderr)
        return 2
    if args.minutes <= 0:
        print("soak: --minutes must be positive", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        summary = run(args)
        print(render(summary))
        return 0 if summary["ok"] else 1
    return 130


if __name__ == "__main__":
    sys.exit(main())
