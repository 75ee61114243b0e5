"""`tcptrace demo`: a bundled leaky Go client and server, traced end to end.

The client leaks `leak` connections in main.leakyDial and closes `ok` in
main.properDial; the server never closes what it accepts (main.handleLeaky),
so every connection the client closes leaves a CLOSE_WAIT socket behind.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path
from typing import TextIO

from tcptrace.launch import GatedProcess
from tcptrace.tracer import StopFlag, TraceOptions, TraceResult, run_trace, tell
from tcptrace.workloads.build import build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(
    leak: int,
    ok: int,
    threshold_s: float,
    duration_s: float,
    output_dir: Path,
    force: bool,
    out: TextIO,
) -> TraceResult:
    # tell, not print: with stdout closed (`| head -1`) the demo still traces and reports.
    tell(out, "building the demo programs (Go)...")
    binary = build("leakydemo")
    port = _free_port()
    hold = f"{int(duration_s) + 30}s"  # outlive the trace; stopped explicitly below
    server = GatedProcess(
        [str(binary), "server", "--listen", f"127.0.0.1:{port}", "--hold", hold],
        stdout=subprocess.PIPE,
    )
    client = GatedProcess(
        [
            str(binary),
            "client",
            "--addr",
            f"127.0.0.1:{port}",
            "--leak",
            str(leak),
            "--ok",
            str(ok),
            "--hold",
            hold,
        ],
        stdout=subprocess.PIPE,
    )
    tell(
        out,
        f"demo server pid {server.pid}, client pid {client.pid} "
        f"(client leaks {leak} connections and closes {ok}; the server closes none)",
    )

    def start_workloads() -> None:
        server.release()
        assert server.proc.stdout is not None
        server.proc.stdout.readline()  # READY: listening
        client.release()

    try:
        stop = StopFlag()
        result = run_trace(
            TraceOptions(
                pids=(server.pid, client.pid),
                output_dir=output_dir,
                threshold_s=threshold_s,
                duration_s=duration_s,
                summary_interval_s=max(duration_s, 1.0) * 10,
                force=force,
                on_attached=lambda: threading.Thread(target=start_workloads, daemon=True).start(),
            ),
            out=out,
            stop=stop,
        )
    finally:
        client.stop()
        server.stop()
    tell(
        out,
        "\nnext: load it in pandas with tcptrace.report.load_report("
        f"{str(result.output_dir)!r}), or open {result.output_dir}/open_sockets.csv",
    )
    return result
