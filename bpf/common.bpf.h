/* SPDX-License-Identifier: Apache-2.0
 *
 * tcptrace: what both probe sets share, written once.
 *
 * Included by tracepoints.bpf.c and kprobes.bpf.c (never by user space). Holds
 * the build-time knobs, the maps user space reads (targets, socks, stacks,
 * stats, events), the helpers that build and track records, and the probes
 * that exist on every kernel tcptrace supports and mean the same in both sets:
 *   syscalls:sys_enter_connect/listen   fd of the connect()/listen() now running
 *                                       (only where the syscall's saved registers
 *                                       cannot be read: see resolve_pending_fd)
 *   syscalls:sys_enter_close            TT_FLAG_FD_CLOSED
 *   syscalls:sys_enter_close_range      TT_KIND_CLOSE_RANGE
 *   sched:sched_process_exit            TT_KIND_EXIT
 *   sched_process_fork (raw)            TT_KIND_FORK (TT_FOLLOW_FORKS only)
 *   tcp:tcp_destroy_sock                TT_KIND_DEATH
 * The death probe is shared on purpose: tcptrace needs BPF ring buffers (Linux
 * 5.8), and tcp:tcp_destroy_sock exists since 4.16, so every kernel that can
 * run either set has it, and one death path means identical death records.
 *
 * Kernel memory is read only at offsets taken from the running kernel's BTF
 * (-D TT_OFF_* from tcptrace/btf.py), never through header struct layouts: the
 * headers bcc compiles against may belong to another kernel.
 */
#ifndef TT_COMMON_BPF_H
#define TT_COMMON_BPF_H

#include <uapi/linux/ptrace.h>
#include <linux/socket.h>
#include "tcptrace.h"

#ifndef TT_MAX_SOCKS
#define TT_MAX_SOCKS 131072
#endif
#ifndef TT_MAX_TARGETS
#define TT_MAX_TARGETS 1024
#endif
#ifndef TT_STACKS
#define TT_STACKS 16384
#endif
#ifndef TT_RINGBUF_PAGES
#define TT_RINGBUF_PAGES 4096
#endif
#ifndef TT_FOLLOW_FORKS
#define TT_FOLLOW_FORKS 0
#endif
#ifndef TT_KERNEL_STACKS
#define TT_KERNEL_STACKS 0
#endif
/* 1: stream every birth (tests of the record stream); 0: first of each call site. */
#ifndef TT_ANNOUNCE_ALL
#define TT_ANNOUNCE_ALL 0
#endif
/* Wake the consumer per record only when asked; a timed poll is far cheaper. */
#ifndef TT_RB_FLAGS
#define TT_RB_FLAGS BPF_RB_NO_WAKEUP
#endif

/* The reads below have fixed widths; refuse to build where BTF says otherwise. */
_Static_assert(TT_SIZE_SK_FAMILY == 2, "sock_common.skc_family is not 2 bytes");
_Static_assert(TT_SIZE_SK_STATE == 1, "sock_common.skc_state is not 1 byte");
_Static_assert(TT_SIZE_SK_PROTOCOL == 2, "sock.sk_protocol is not 2 bytes");

#define TT_AF_INET 2
#define TT_AF_INET6 10
#define TT_IPPROTO_TCP 6
#define TT_TCP_ESTABLISHED 1
#define TT_TCP_SYN_SENT 2
#define TT_TCP_CLOSE 7
#define TT_TCP_LISTEN 10

BPF_HASH(targets, u32, u8, TT_MAX_TARGETS);
/* No preallocation: a preallocated hash map hands a deleted element straight to
 * the next insert, so a program still holding a pointer from lookup() on
 * another CPU (a state change racing a destroy) would write into the new
 * socket's record. Without preallocation a deleted element is freed only after
 * an RCU grace period. Memory also grows with use instead of up front. */
BPF_F_TABLE("hash", u64, struct tt_record, socks, TT_MAX_SOCKS, BPF_F_NO_PREALLOC);
#if TT_OFF_REGS_ARG1 < 0
/* tid -> fd passed to the connect()/listen() now running on that thread */
BPF_TABLE("lru_hash", u32, s32, pending_fd, 4096);
#endif
BPF_STACK_TRACE(stacks, TT_STACKS);
BPF_PERCPU_ARRAY(stats, u64, TT_STAT__COUNT);
BPF_RINGBUF_OUTPUT(events, TT_RINGBUF_PAGES);
/* A per-CPU scratch record: tt_record is too big to build twice on the stack.
 * Only process-context programs build records here (births, close_range, exit,
 * fork); softirq-context programs (state changes, destroys) work on map values
 * in place, so a softirq nesting inside a process-context probe cannot clobber it. */
BPF_PERCPU_ARRAY(scratch, struct tt_record, 1);

static __always_inline void stat_inc(int idx)
{
	u64 *v = stats.lookup(&idx);
	if (v)
		(*v)++;
}

static __always_inline int is_target(u32 tgid)
{
	return targets.lookup(&tgid) != NULL;
}

static __always_inline void emit(struct tt_record *r)
{
	if (events.ringbuf_output(r, sizeof(*r), TT_RB_FLAGS) != 0)
		stat_inc(TT_STAT_EVENTS_DROPPED);
}

/* The per-CPU scratch record, zeroed, with its kind set. */
static __always_inline struct tt_record *new_record(u16 kind)
{
	int zero = 0;
	struct tt_record *r = scratch.lookup(&zero);
	if (!r)
		return NULL;
	__builtin_memset(r, 0, sizeof(*r));
	r->kind = kind;
	return r;
}

/* fd -> struct sock * of the current task, or 0. Offsets from BTF. */
static __always_inline u64 sock_of_fd(s32 fd)
{
	void *task = (void *)bpf_get_current_task();
	void *files = NULL, *fdt = NULL, **fdarr = NULL, *file = NULL, *sock = NULL;
	void *sk = NULL;
	unsigned int max_fds = 0;

	if (fd < 0)
		return 0;
	bpf_probe_read_kernel(&files, sizeof(files), task + TT_OFF_TASK_FILES);
	if (!files)
		return 0;
	bpf_probe_read_kernel(&fdt, sizeof(fdt), files + TT_OFF_FILES_FDT);
	if (!fdt)
		return 0;
	bpf_probe_read_kernel(&max_fds, sizeof(max_fds), fdt + TT_OFF_FDT_MAX_FDS);
	if ((unsigned int)fd >= max_fds)
		return 0;
	bpf_probe_read_kernel(&fdarr, sizeof(fdarr), fdt + TT_OFF_FDT_FD);
	if (!fdarr)
		return 0;
	bpf_probe_read_kernel(&file, sizeof(file), (void *)(fdarr + fd));
	if (!file)
		return 0;
	bpf_probe_read_kernel(&sock, sizeof(sock), file + TT_OFF_FILE_PRIVATE_DATA);
	if (!sock)
		return 0;
	bpf_probe_read_kernel(&sk, sizeof(sk), sock + TT_OFF_SOCKET_SK);
	return (u64)sk;
}

static __always_inline void fill_process(struct tt_record *r)
{
	u64 id = bpf_get_current_pid_tgid();
	r->tgid = id >> 32;
	r->tid = (u32)id;
	bpf_get_current_comm(&r->comm, sizeof(r->comm));
}

static __always_inline void fill_stacks(void *ctx, struct tt_record *r)
{
	r->user_stack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
	if (r->user_stack_id < 0)
		stat_inc(TT_STAT_USTACK_FAILED);
#if TT_KERNEL_STACKS
	r->kernel_stack_id = stacks.get_stackid(ctx, 0);
	if (r->kernel_stack_id < 0)
		stat_inc(TT_STAT_KSTACK_FAILED);
#else
	r->kernel_stack_id = -1;
#endif
}

static __always_inline u16 sk_family(u64 sk)
{
	u16 family = 0;
	bpf_probe_read_kernel(&family, sizeof(family), (void *)sk + TT_OFF_SK_FAMILY);
	return family;
}

static __always_inline u16 sk_protocol(u64 sk)
{
	u16 protocol = 0;
	bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)sk + TT_OFF_SK_PROTOCOL);
	return protocol;
}

static __always_inline u8 sk_state(u64 sk)
{
	u8 state = 0;
	bpf_probe_read_kernel(&state, sizeof(state), (void *)sk + TT_OFF_SK_STATE);
	return state;
}

/* Ports and addresses of `sk` into r, for r->family. */
static __always_inline void fill_tuple(struct tt_record *r, u64 sk)
{
	u16 lport = 0, rport_be = 0;
	bpf_probe_read_kernel(&lport, sizeof(lport), (void *)sk + TT_OFF_SK_NUM);
	bpf_probe_read_kernel(&rport_be, sizeof(rport_be), (void *)sk + TT_OFF_SK_DPORT);
	r->lport = lport;
	r->rport = (rport_be >> 8) | ((rport_be & 0xff) << 8);
	if (r->family == TT_AF_INET) {
		bpf_probe_read_kernel(r->laddr, 4, (void *)sk + TT_OFF_SK_RCV_SADDR);
		bpf_probe_read_kernel(r->raddr, 4, (void *)sk + TT_OFF_SK_DADDR);
	} else {
		bpf_probe_read_kernel(r->laddr, 16, (void *)sk + TT_OFF_SK_V6_RCV_SADDR);
		bpf_probe_read_kernel(r->raddr, 16, (void *)sk + TT_OFF_SK_V6_DADDR);
	}
}

/* Refresh the tuple of a tracked socket on a state change, keeping what the
 * kernel already cleared: on the way to CLOSE, inet_put_port() zeroes the local
 * port before the state change is traced, and a failed connect clears the peer. */
static __always_inline void refresh_tuple(struct tt_record *cur, u64 sk)
{
	if (cur->lport && cur->rport)
		return; /* complete: the tuple of a socket does not change */
	u16 lport = 0, rport_be = 0;
	bpf_probe_read_kernel(&lport, sizeof(lport), (void *)sk + TT_OFF_SK_NUM);
	bpf_probe_read_kernel(&rport_be, sizeof(rport_be), (void *)sk + TT_OFF_SK_DPORT);
	if (lport) {
		cur->lport = lport;
		if (cur->family == TT_AF_INET)
			bpf_probe_read_kernel(cur->laddr, 4, (void *)sk + TT_OFF_SK_RCV_SADDR);
		else
			bpf_probe_read_kernel(cur->laddr, 16, (void *)sk + TT_OFF_SK_V6_RCV_SADDR);
	}
	if (rport_be) {
		cur->rport = (rport_be >> 8) | ((rport_be & 0xff) << 8);
		if (cur->family == TT_AF_INET)
			bpf_probe_read_kernel(cur->raddr, 4, (void *)sk + TT_OFF_SK_DADDR);
		else
			bpf_probe_read_kernel(cur->raddr, 16, (void *)sk + TT_OFF_SK_V6_DADDR);
	}
}

static __always_inline void read_tcp_bytes(u64 sk, struct tt_record *r)
{
	bpf_probe_read_kernel(&r->bytes_acked, sizeof(r->bytes_acked),
			      (void *)sk + TT_OFF_TCP_BYTES_ACKED);
	bpf_probe_read_kernel(&r->bytes_received, sizeof(r->bytes_received),
			      (void *)sk + TT_OFF_TCP_BYTES_RECEIVED);
}

/* A sock address already in the ledger at a birth means we missed its destroy:
 * report the stale record as dead rather than let it survive. */
static __always_inline void retire_stale(u64 sk, u64 now)
{
	struct tt_record *old = socks.lookup(&sk);
	if (!old)
		return;
	old->kind = TT_KIND_DEATH;
	old->ts_ns = now;
	old->flags |= TT_FLAG_REPLACED;
	emit(old);
	socks.delete(&sk);
	stat_inc(TT_STAT_SK_REUSED);
}

/* Births are streamed only for the first socket of each call site (tgid, user
 * stack): that is when user space must symbolize, while the process lives.
 * Every other open socket is read from `socks` by a batched scan, and every
 * socket reaches user space once, at its death: one record per connection. */
struct tt_site {
	u32 tgid;
	s32 user_stack_id;
};
BPF_TABLE("lru_hash", struct tt_site, u8, announced_sites, TT_STACKS);

static __always_inline void track_birth(struct tt_record *r)
{
	u64 sk = r->sk;
	int announce = TT_ANNOUNCE_ALL;
	retire_stale(sk, r->ts_ns);
	if (socks.insert(&sk, r) != 0) {
		stat_inc(TT_STAT_MAP_FULL);
		r->flags |= TT_FLAG_UNTRACKED; /* no death will follow: user space must see it */
		announce = 1;
	}
	struct tt_site site = {.tgid = r->tgid, .user_stack_id = r->user_stack_id};
	u8 one = 1;
	/* Look before inserting: an LRU insert of a key already there still takes
	 * a node from the free list and the LRU locks, on every birth. */
	if (!announced_sites.lookup(&site) && announced_sites.insert(&site, &one) == 0)
		announce = 1;
	stat_inc(TT_STAT_BIRTHS);
	if (announce)
		emit(r);
}

#if TT_OFF_REGS_ARG1 >= 0
#define TT_NR_CONNECT 42
#define TT_NR_SENDTO 44
#define TT_NR_SENDMSG 46
#define TT_NR_LISTEN 50
/* Connect/listen births: the fd is the first argument of the syscall this thread
 * is in (connect, listen, or sendto/sendmsg for TCP fast open), read from its
 * saved user registers (x86-64, Linux 5.15+; offsets from BTF). This replaced
 * the syscalls:sys_enter_connect/listen tracepoints, which cost every connect()
 * ~0.4 us (issue 6). Still confirm that the fd holds this sock: an MPTCP
 * subflow, for one, is born inside connect() on another socket's fd. */
static __always_inline void resolve_pending_fd(struct tt_record *r)
{
	void *regs = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	u64 nr = ~0ULL, arg1 = 0;
	bpf_probe_read_kernel(&nr, sizeof(nr), regs + TT_OFF_REGS_SYSCALL_NR);
	bpf_probe_read_kernel(&arg1, sizeof(arg1), regs + TT_OFF_REGS_ARG1);
	r->fd = -1;
	if ((nr == TT_NR_CONNECT || nr == TT_NR_LISTEN || nr == TT_NR_SENDTO ||
	     nr == TT_NR_SENDMSG) && sock_of_fd((s32)arg1) == r->sk)
		r->fd = (s32)arg1;
	if (r->fd < 0) {
		r->flags |= TT_FLAG_FD_UNKNOWN;
		stat_inc(TT_STAT_FD_UNRESOLVED);
	}
}
#else
/* Connect/listen births: the fd comes from the connect()/listen() entry on this
 * thread; confirm it really holds this sock (TCP fast open, for one, births in
 * sendto(), whose fd was never remembered). */
static __always_inline void resolve_pending_fd(struct tt_record *r)
{
	u32 tid = r->tid;
	s32 *fdp = pending_fd.lookup(&tid);
	r->fd = -1;
	if (fdp && sock_of_fd(*fdp) == r->sk)
		r->fd = *fdp;
	if (r->fd < 0) {
		r->flags |= TT_FLAG_FD_UNKNOWN;
		stat_inc(TT_STAT_FD_UNRESOLVED);
	}
}
#endif

/* An accepted socket, at accept()'s return in the accepting thread: the caller
 * (each set its own way) found the sock `sk` behind the new `fd`. */
static __always_inline int accept_birth(void *ctx, u64 sk, s32 fd)
{
	u16 family = sk_family(sk);
	if ((family != TT_AF_INET && family != TT_AF_INET6) || sk_protocol(sk) != TT_IPPROTO_TCP)
		return 0; /* unix, vsock, MPTCP...: not ours */

	struct tt_record *r = new_record(TT_KIND_BIRTH);
	if (!r)
		return 0;
	u64 now = bpf_ktime_get_ns();
	r->ts_ns = now;
	r->birth_ns = now;
	r->state_ns = now;
	r->sk = sk;
	r->fd = fd;
	r->direction = TT_DIR_ACCEPT;
	r->family = family;
	r->state = sk_state(sk);
	fill_tuple(r, sk);
	fill_process(r);
	fill_stacks(ctx, r);
	track_birth(r);
	return 0;
}

/* The kernel destroyed `sk`: stream its final record and forget it. */
static __always_inline void sock_died(u64 sk)
{
	struct tt_record *cur = socks.lookup(&sk);
	if (!cur)
		return;
	cur->kind = TT_KIND_DEATH;
	cur->ts_ns = bpf_ktime_get_ns();
	read_tcp_bytes(sk, cur);
	stat_inc(TT_STAT_DEATHS);
	emit(cur);
	socks.delete(&sk);
}

/* Nested runs. A raw tracepoint program is skipped, and the skip counted in its
 * recursion_misses, when its tracepoint fires on a CPU where the program is
 * already running (Linux 6.1+): a softirq destroy or state change interrupting
 * ours in process context. At 30k connections/s that skipped ~1% of state
 * changes (wrong final states) and ~1 in 20,000 destroys (stale records). So the
 * two hot tracepoints each get a second, rescue program, attached after the
 * first. Per CPU, the first program keeps `active`, the call (its ctx) it is
 * running for, and on leaving sets `done` to that call. The rescue acts only
 * when the first did not finish this very call (`done`) while a first program
 * is running under it (`active`): the kernel skipped the first for it. On older
 * kernels, which let the first program nest, the nested one finishes its own
 * call and the rescue stands down. A skip just before `active` is set or after it
 * is restored (a few instructions) is not redone; user space reports skips minus
 * rescues, so a skip nobody redid is still a loss. */
struct tt_running {
	u64 active; /* ctx of the call the first program is running for, 0 if none */
	u64 done;   /* ctx of the call the first program finished last */
};
enum tt_running_probe {
	TT_RUNNING_SET_STATE = 0,
	TT_RUNNING_DESTROY = 1,
	TT_RUNNING__COUNT = 2,
};
BPF_PERCPU_ARRAY(running, struct tt_running, TT_RUNNING__COUNT);

/* The first program, entering: `r` is this CPU's slot (looked up once per run);
 * returns the call it interrupted, restored on leave. */
static __always_inline u64 first_program_enter(struct tt_running *r, void *ctx)
{
	if (!r)
		return 0;
	u64 outer = r->active;
	*(volatile u64 *)&r->active = (u64)ctx;
	return outer;
}

static __always_inline void first_program_leave(struct tt_running *r, void *ctx, u64 outer)
{
	if (!r)
		return;
	*(volatile u64 *)&r->active = outer;
	*(volatile u64 *)&r->done = (u64)ctx;
}

/* In the rescue program: did the kernel skip the first one for this call? */
static __always_inline int first_program_skipped(int which, void *ctx)
{
	struct tt_running *r = running.lookup(&which);
	if (!r)
		return 0;
	if (r->done == (u64)ctx) {
		*(volatile u64 *)&r->done = 0; /* the first program ran for this call */
		return 0;
	}
	if (!r->active || r->active == (u64)ctx)
		return 0;
	stat_inc(TT_STAT_RUNS_RESCUED);
	return 1;
}

/* Raw, not perf-event, tracepoint: a perf tracepoint program is skipped when
 * any other BPF program already runs on the CPU (e.g. a softirq destroy while
 * our accept() probe runs), which lost ~1% of deaths at 30k connections/s.
 * Raw tracepoint programs only skip nesting of themselves (see above). */
RAW_TRACEPOINT_PROBE(tcp_destroy_sock)
{
	/* TP_PROTO(struct sock *sk) */
	int which = TT_RUNNING_DESTROY;
	struct tt_running *r = running.lookup(&which);
	u64 outer = first_program_enter(r, ctx);
	sock_died((u64)ctx->args[0]);
	first_program_leave(r, ctx, outer);
	return 0;
}

/* Attached by user space (tcptrace/probes.py), after the first program: bcc
 * attaches one program per raw tracepoint by name. */
int rescue_tcp_destroy_sock(struct bpf_raw_tracepoint_args *ctx)
{
	if (first_program_skipped(TT_RUNNING_DESTROY, ctx))
		sock_died((u64)ctx->args[0]);
	return 0;
}

#if TT_OFF_REGS_ARG1 < 0
static __always_inline void remember_fd(s32 fd)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!is_target(id >> 32))
		return;
	u32 tid = (u32)id;
	pending_fd.update(&tid, &fd);
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	remember_fd((s32)args->fd);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_listen)
{
	remember_fd((s32)args->fd);
	return 0;
}
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!is_target(id >> 32))
		return 0;
	s32 fd = (s32)args->fd;
	u64 sk = sock_of_fd(fd);
	if (!sk)
		return 0;
	struct tt_record *cur = socks.lookup(&sk);
	if (!cur || cur->tgid != (u32)(id >> 32))
		return 0;
	/* A dup of the socket's fd closing leaves the recorded fd open. */
	if (cur->fd == fd || cur->fd < 0) {
		cur->flags |= TT_FLAG_FD_CLOSED;
		stat_inc(TT_STAT_FD_CLOSES);
	}
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close_range)
{
	u64 id = bpf_get_current_pid_tgid();
	if (!is_target(id >> 32))
		return 0;
	struct tt_record *r = new_record(TT_KIND_CLOSE_RANGE);
	if (!r)
		return 0;
	r->ts_ns = bpf_ktime_get_ns();
	fill_process(r);
	r->fd = (s32)args->fd;
	r->aux = (u32)args->max_fd;
	emit(r);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	/* Only the group leader's exit ends the process (threads exit too). */
	if ((u32)id != tgid || !is_target(tgid))
		return 0;
	struct tt_record *r = new_record(TT_KIND_EXIT);
	if (!r)
		return 0;
	r->ts_ns = bpf_ktime_get_ns();
	fill_process(r);
	r->fd = -1;
	emit(r);
	/* A reused pid must not inherit the trace. */
	targets.delete(&tgid);
	return 0;
}

#if TT_FOLLOW_FORKS
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	/* TP_PROTO(struct task_struct *parent, struct task_struct *child) */
	void *parent = (void *)ctx->args[0];
	void *child = (void *)ctx->args[1];
	u32 ptgid = 0, ctgid = 0;
	bpf_probe_read_kernel(&ptgid, sizeof(ptgid), parent + TT_OFF_TASK_TGID);
	bpf_probe_read_kernel(&ctgid, sizeof(ctgid), child + TT_OFF_TASK_TGID);
	if (ptgid == ctgid || !is_target(ptgid))
		return 0; /* a new thread, or not ours */
	u8 one = 1;
	if (targets.update(&ctgid, &one) != 0)
		stat_inc(TT_STAT_TARGETS_FULL);
	struct tt_record *r = new_record(TT_KIND_FORK);
	if (!r)
		return 0;
	r->ts_ns = bpf_ktime_get_ns();
	r->tgid = ptgid;
	r->aux = ctgid;
	r->fd = -1;
	emit(r);
	return 0;
}
#endif

#endif /* TT_COMMON_BPF_H */
