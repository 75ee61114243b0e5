// SPDX-License-Identifier: Apache-2.0
/*
 * tcptrace, kprobe probe set: for the many production kernels with kprobes.
 *
 * Produces the same records as tracepoints.bpf.c (the reference semantics),
 * from these attach points (tcptrace/probes.py attaches them by name; nothing
 * here is auto-attached by a kprobe__ prefix, so the kretprobes get an explicit
 * maxactive and every attach failure gets a clear message):
 *
 *   kprobe    tcp_set_state(sk, state)      every state change of a tracked sock;
 *                                           CONNECT birth at CLOSE -> SYN_SENT,
 *                                           which tcp_v4/v6_connect do inside
 *                                           connect(): process context, exactly
 *                                           where the tracepoint set births
 *   kprobe    tcp_connect(sk)               the SYN goes out: the local port
 *                                           chosen by inet_hash_connect() is now
 *                                           known, so the record has it while
 *                                           the socket sits in SYN_SENT
 *   k(ret)probe inet_csk_listen_start(sk)   LISTEN birth. listen() does not go
 *                                           through tcp_set_state (it uses
 *                                           inet_sk_state_store), so the entry
 *                                           remembers sk and the return births
 *                                           it, port assigned, state as left
 *   kretprobe inet_csk_accept               the accepted sock (the return value;
 *                                           its arguments changed in Linux 6.10,
 *                                           its return value did not); the fd is
 *                                           known only at sys_exit_accept{,4},
 *                                           where the ACCEPT birth is made
 *   kprobe    tcp_close(sk, timeout)        the last file reference went away:
 *                                           no fd holds the socket any more
 *
 * and from common.bpf.h, shared with the tracepoint set: connect/listen fd,
 * close, close_range, exit, fork, and the death (tcp:tcp_destroy_sock).
 *
 * Struct offsets come from BTF (-D TT_OFF_*), never from the headers, so the
 * same code runs on kernels whose headers are not installed or do not match.
 */
#include "common.bpf.h"

/* tid -> sock returned by inet_csk_accept, waiting for accept()'s fd. */
BPF_TABLE("lru_hash", u32, u64, pending_accept, 4096);
/* tid -> sock entering inet_csk_listen_start, waiting for its return. */
BPF_TABLE("lru_hash", u32, u64, pending_listen, 4096);

/* A state change of a tracked sock: the tracepoint set's update, read from the
 * sock itself. At kprobe entry the ports are still there even on the way to
 * CLOSE; refresh_tuple keeps whatever the kernel has cleared either way. */
static __always_inline void state_changed(struct tt_record *cur, u64 sk, int newstate)
{
	cur->state = newstate;
	cur->state_ns = bpf_ktime_get_ns();
	refresh_tuple(cur, sk);
	if (newstate == TT_TCP_CLOSE)
		cur->flags |= TT_FLAG_TCP_CLOSED;
}

/* A birth on a sock address still in the ledger, handled as tracepoints.bpf.c
 * does: connect() again after a failed attempt ends the earlier attempt; any
 * other leftover is a stale record of a freed sock. */
static __always_inline void end_earlier_life(u64 sk, u32 tgid, u64 now)
{
	struct tt_record *cur = socks.lookup(&sk);
	if (!cur)
		return;
	if ((cur->flags & TT_FLAG_TCP_CLOSED) && cur->tgid == tgid)
		sock_died(sk);
	else
		retire_stale(sk, now);
}

/* A CONNECT or LISTEN birth of `sk` in the current (target) process. */
static __always_inline void connect_or_listen_birth(void *ctx, u64 sk, u8 state, u8 direction)
{
	u64 now = bpf_ktime_get_ns();
	end_earlier_life(sk, bpf_get_current_pid_tgid() >> 32, now);
	struct tt_record *r = new_record(TT_KIND_BIRTH);
	if (!r)
		return;
	r->ts_ns = now;
	r->birth_ns = now;
	r->state_ns = now;
	r->sk = sk;
	r->state = state;
	r->direction = direction;
	r->family = sk_family(sk);
	fill_tuple(r, sk);
	/* listen() that failed after its state store (no free port) left the sock
	 * CLOSE: the tracepoint set births it LISTEN, then sees it go CLOSE. */
	if (state == TT_TCP_CLOSE)
		r->flags |= TT_FLAG_TCP_CLOSED;
	fill_process(r);
	fill_stacks(ctx, r);
	resolve_pending_fd(r);
	track_birth(r);
}

int tt_kp_tcp_set_state(struct pt_regs *ctx)
{
	u64 sk = PT_REGS_PARM1(ctx);
	int newstate = (int)PT_REGS_PARM2(ctx);
	/* CLOSE -> SYN_SENT happens in tcp_v4/v6_connect, inside connect(). At
	 * entry the sock still holds its old state. */
	int is_birth = newstate == TT_TCP_SYN_SENT && sk_state(sk) == TT_TCP_CLOSE;

	struct tt_record *cur = socks.lookup(&sk);
	if (cur && !is_birth) {
		/* May be softirq: never trust `current` here. Update by address. */
		state_changed(cur, sk, newstate);
		return 0;
	}
	if (!is_birth)
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!is_target(tgid) || sk_protocol(sk) != TT_IPPROTO_TCP)
		return 0;
	connect_or_listen_birth(ctx, sk, TT_TCP_SYN_SENT, TT_DIR_CONNECT);
	return 0;
}

int tt_kp_tcp_connect(struct pt_regs *ctx)
{
	u64 sk = PT_REGS_PARM1(ctx);
	struct tt_record *cur = socks.lookup(&sk);
	/* inet_hash_connect() has picked the local port by now. */
	if (cur)
		refresh_tuple(cur, sk);
	return 0;
}

int tt_kp_listen_start(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!is_target(id >> 32))
		return 0;
	u32 tid = (u32)id;
	u64 sk = PT_REGS_PARM1(ctx);
	pending_listen.update(&tid, &sk);
	return 0;
}

int tt_kret_listen_start(struct pt_regs *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *skp = pending_listen.lookup(&tid);
	if (!skp)
		return 0;
	u64 sk = *skp;
	pending_listen.delete(&tid);
	if (sk_protocol(sk) != TT_IPPROTO_TCP)
		return 0; /* DCCP listens through here too */
	/* LISTEN on success; CLOSE when no port could be had. */
	connect_or_listen_birth(ctx, sk, sk_state(sk), TT_DIR_LISTEN);
	return 0;
}

int tt_kret_inet_csk_accept(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!is_target(id >> 32))
		return 0;
	u64 sk = PT_REGS_RC(ctx);
	if (!sk)
		return 0; /* EAGAIN, a signal, a shut-down listener */
	u32 tid = (u32)id;
	pending_accept.update(&tid, &sk);
	return 0;
}

static __always_inline int on_accept_exit(void *ctx, long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	u64 sk = 0;
	u64 *skp = pending_accept.lookup(&tid);
	if (skp) {
		sk = *skp;
		pending_accept.delete(&tid);
	}
	if (ret < 0 || !is_target(id >> 32))
		return 0;
	s32 fd = (s32)ret;
	/* The fd walk cross-checks the kretprobe: it finds the sock when the
	 * kretprobe missed (all maxactive instances were taken by other threads
	 * blocked in accept), and wins over a stale pending entry (an accept that
	 * did not end in accept(), e.g. io_uring's). */
	u64 walked = sock_of_fd(fd);
	if (walked)
		sk = walked;
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

int tt_kp_tcp_close(struct pt_regs *ctx)
{
	u64 sk = PT_REGS_PARM1(ctx);
	struct tt_record *cur = socks.lookup(&sk);
	if (!cur || (cur->flags & TT_FLAG_FD_CLOSED))
		return 0;
	/* close() already set the flag through sys_enter_close; this catches the
	 * other ways the last reference goes: dup2() over the fd, io_uring close,
	 * close_range(), exit. */
	cur->flags |= TT_FLAG_FD_CLOSED;
	stat_inc(TT_STAT_FD_CLOSES);
	return 0;
}
