"""Does the kernel reuse a TCP socket's address with no tcp_destroy_sock before?

tcptrace keys its in-kernel ledger by struct sock address and ends a record at
tcp:tcp_destroy_sock. At full loopback churn it reports a few `sk_reused` per
million connections: a birth found the address still in the ledger. This script
asks the same question without tcptrace: two raw tracepoint programs of its own
count connect births (inet_sock_set_state CLOSE -> SYN_SENT), the destroys of
those sockets, and births at an address whose previous connect socket showed no
destroy since. It runs the bundled churn workload, optionally next to a CPU hog
(tcptrace's user space is one, ~25% of a core at full churn). Run as root:

    .venv/bin/python benchmarks/address_reuse.py [--connections N] [--hog]

This file imports bcc: it is a measurement of the kernel, not part of tcptrace
(tcptrace.probes stays the only tcptrace module that does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

BPF_TEXT = r"""
BPF_F_TABLE("hash", u64, u64, born, 4194304, BPF_F_NO_PREALLOC);
BPF_ARRAY(counts, u64, 4);

static __always_inline void count(int i)
{
    u64 *v = counts.lookup(&i);
    if (v)
        __sync_fetch_and_add(v, 1);
}

RAW_TRACEPOINT_PROBE(tcp_destroy_sock)
{
    u64 sk = ctx->args[0];
    if (born.lookup(&sk)) {
        born.delete(&sk);
        count(1);
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    u64 sk = ctx->args[0];
    if ((int)ctx->args[1] != 7 || (int)ctx->args[2] != 2)
        return 0; /* only CLOSE -> SYN_SENT: a connect() */
    if (born.lookup(&sk))
        count(2); /* the last connect socket at this address showed no destroy */
    u64 t = bpf_ktime_get_ns();
    born.update(&sk, &t);
    count(0);
    return 0;
}
"""

HOG = "import time\nend = time.monotonic() + 300\nwhile time.monotonic() < end: sum(range(10000))\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--hog", action="store_true", help="run a busy Python loop alongside")
    args = parser.parse_args()

    from bcc import BPF  # type: ignore[import-not-found]

    from tcptrace.workloads.build import build

    churn = [str(build("churn")), "--connections", str(args.connections), "--ports", "4"]
    churn += ["--seconds", "120"]
    prog = BPF(text=BPF_TEXT)
    try:
        return _measure(prog, churn, args.hog)
    finally:
        prog.cleanup()


def _measure(prog: object, churn: list[str], with_hog: bool) -> int:
    from tcptrace.probes import program_stats

    hog = subprocess.Popen([sys.executable, "-c", HOG]) if with_hog else None
    try:
        done = subprocess.run(churn, capture_output=True, text=True, timeout=180, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    counts = prog["counts"]  # type: ignore[index]
    # A destroy skipped as nested would also look like a missing destroy: show them.
    skipped = {
        name.decode(): program_stats(name.decode(), fn.fd).recursion_misses
        for name, fn in prog.funcs.items()  # type: ignore[attr-defined]
    }
    result = {
        "hog": with_hog,
        "churn": json.loads(done.stdout.strip().splitlines()[-1].split(" ", 1)[1]),
        "connect_births": counts[0].value,
        "destroys_of_them": counts[1].value,
        "births_at_an_address_without_a_destroy_since": counts[2].value,
        "recursion_misses": skipped,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
