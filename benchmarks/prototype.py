"""The floor of issue 6: the issue's own prototype of an in-kernel socket ledger.

benchmarks/churn runs it as variants (e) and (f), next to tcptrace, on the same
churning target, so the overhead of tcptrace can be read against the cost of the
bare probes that any tool doing the same job must pay:

  (e) ledger   sock:inet_sock_set_state: hash insert at SYN_SENT with a user stack
               id (pid filtered in the kernel), delete at CLOSE.
  (f) +accept  (e) plus syscalls accept/accept4 exit (user stack id at each
               accepted fd, pid filtered) and close enter (delete), as the issue
               measured: "0.84-0.91 with a user stack on accept".

It keeps no records and reads nothing until it stops: user space costs nothing,
so what it measures is the kernel side alone. Run as root:

    .venv/bin/python benchmarks/prototype.py --pid PID [--accept]

Prints "ATTACHED" once the programs are attached, and at SIGINT/SIGTERM one line
"DETACHED {json}" with the entries left in its maps. This file imports bcc: it is
a benchmark's reference probe, not part of tcptrace (tcptrace.probes stays the only
tcptrace module that does).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
#define TT_SYN_SENT 2
#define TT_CLOSE 7
#define TT_IPPROTO_TCP 6

BPF_STACK_TRACE(stacks, 16384);
BPF_HASH(births, u64, int, 262144);    /* sk -> user stack id */
BPF_HASH(accepted, u64, int, 262144);  /* tgid << 32 | fd -> user stack id */

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != TT_IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    if (args->newstate == TT_SYN_SENT) {
        if ((bpf_get_current_pid_tgid() >> 32) != TARGET)
            return 0;
        int id = stacks.get_stackid(args, BPF_F_USER_STACK);
        births.update(&sk, &id);
    } else if (args->newstate == TT_CLOSE) {
        births.delete(&sk);
    }
    return 0;
}

#ifdef WITH_ACCEPT
static __always_inline int on_accept(void *ctx, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET || ret < 0)
        return 0;
    u64 key = (id & 0xffffffff00000000ULL) | (u32)ret;
    int stack = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    accepted.update(&key, &stack);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return on_accept(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return on_accept(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TARGET)
        return 0;
    u64 key = (id & 0xffffffff00000000ULL) | (u32)args->fd;
    accepted.delete(&key);
    return 0;
}
#endif
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--accept", action="store_true", help="variant (f)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    from bcc import BPF  # distro bcc (python3-bpfcc)

    cflags = [f"-DTARGET={args.pid}"] + (["-DWITH_ACCEPT"] if args.accept else [])
    bpf = BPF(text=BPF_TEXT, cflags=cflags)  # TRACEPOINT_PROBEs attach on load
    try:
        print("ATTACHED", flush=True)
        while not stop.wait(0.5):
            pass
        left = {"births": len(bpf["births"].items()), "accepted": len(bpf["accepted"].items())}
        print("DETACHED " + json.dumps(left), flush=True)
    finally:
        bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
