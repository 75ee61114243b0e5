// SPDX-License-Identifier: Apache-2.0
/*
 * tcptrace, tracepoint probe set: for kernels without kprobes.
 *
 * Compiled by bcc at start-up with -D flags for every struct offset, taken
 * from the running kernel's BTF (tcptrace/btf.py). The kernel headers bcc
 * compiles against may belong to another kernel, so no struct of theirs is
 * ever dereferenced here: kernel memory is read at BTF offsets only.
 *
 * The ledger of open sockets lives in the `socks` map (struct sock address
 * -> tt_record). A socket costs user space two records (birth, death); its
 * state in between is read by scanning the map.
 *
 * Attribution happens at birth, in process context:
 *   connect: inet_sock_set_state CLOSE->SYN_SENT runs inside connect()
 *   listen:  inet_sock_set_state CLOSE->LISTEN runs inside listen()
 *   accept:  sys_exit_accept{,4}: fd -> file -> socket -> sock walk
 * Later state changes (often in softirq, where `current` is whoever was
 * interrupted) only update the record found by sock address.
 *
 * Maps, helpers, and the probes both sets share (connect/listen fd, close,
 * close_range, exit, fork, tcp_destroy_sock) are in common.bpf.h.
 */
#include "common.bpf.h"

/* Raw tracepoint (see tcp_destroy_sock in common.bpf.h for why): the fields
 * the perf tracepoint would hand us are read from the sock at BTF offsets. */
static __always_inline int on_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	/* TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) */
	u64 sk = (u64)ctx->args[0];
	int oldstate = (int)ctx->args[1];
	int newstate = (int)ctx->args[2];
	int is_birth = oldstate == TT_TCP_CLOSE &&
		       (newstate == TT_TCP_SYN_SENT || newstate == TT_TCP_LISTEN);
	struct tt_record *cur = socks.lookup(&sk);
	if (!cur && !is_birth)
		return 0; /* not ours: the common case on a busy host, kept cheap */
	u64 now = bpf_ktime_get_ns();
	if (cur && !is_birth) {
		/* Never trust `current` here: this may be softirq. Update by address. */
		cur->state = newstate;
		cur->state_ns = now;
		refresh_tuple(cur, sk);
		if (newstate == TT_TCP_CLOSE)
			cur->flags |= TT_FLAG_TCP_CLOSED;
		return 0;
	}
	/* Births run inside connect() or listen(): process context. */
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!is_target(tgid) || sk_protocol(sk) != TT_IPPROTO_TCP)
		return 0;
	if (cur) {
		/* connect() again on a socket whose earlier attempt failed: the old
		 * attempt ends here. Anything else is a stale record of a freed sock. */
		if ((cur->flags & TT_FLAG_TCP_CLOSED) && cur->tgid == tgid)
			sock_died(sk);
		else
			retire_stale(sk, now);
	}

	struct tt_record *r = new_record(TT_KIND_BIRTH);
	if (!r)
		return 0;
	r->ts_ns = now;
	r->birth_ns = now;
	r->state_ns = now;
	r->sk = sk;
	r->state = newstate;
	r->direction = newstate == TT_TCP_LISTEN ? TT_DIR_LISTEN : TT_DIR_CONNECT;
	r->family = sk_family(sk);
	fill_tuple(r, sk);
	fill_process(r);
	fill_stacks(ctx, r);
	resolve_pending_fd(r);
	track_birth(r);
	return 0;
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
	int which = TT_RUNNING_SET_STATE;
	struct tt_running *r = running.lookup(&which);
	u64 outer = first_program_enter(r, ctx);
	on_set_state(ctx);
	first_program_leave(r, ctx, outer);
	return 0;
}

/* The nested state changes the kernel skipped above (see common.bpf.h). Births
 * (from CLOSE) run in connect()/listen(), process context, so never nest; were
 * one to, it would build its record in the scratch slot the interrupted program
 * may be using. Leave it skipped: counted, not rescued. */
int rescue_inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	if ((int)ctx->args[1] == TT_TCP_CLOSE)
		return 0;
	if (first_program_skipped(TT_RUNNING_SET_STATE, ctx))
		on_set_state(ctx);
	return 0;
}

static __always_inline int on_accept_exit(void *ctx, long ret)
{
	if (ret < 0)
		return 0;
	u64 id = bpf_get_current_pid_tgid();
	if (!is_target(id >> 32))
		return 0;
	s32 fd = (s32)ret;
	u64 sk = sock_of_fd(fd);
	if (!sk) {
		stat_inc(TT_STAT_ACCEPT_UNRESOLVED);
		return 0;
	}
	return accept_birth(ctx, sk, fd);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
	return on_accept_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
	return on_accept_exit(args, args->ret);
}
