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
 */
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
#define TT_RINGBUF_PAGES 1024
#endif
#ifndef TT_FOLLOW_FORKS
#define TT_FOLLOW_FORKS 0
#endif
#ifndef TT_KERNEL_STACKS
#define TT_KERNEL_STACKS 0
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
BPF_HASH(socks, u64, struct tt_record, TT_MAX_SOCKS);
/* tid -> fd passed to the connect()/listen() now running on that thread */
BPF_TABLE("lru_hash", u32, s32, pending_fd, 4096);
BPF_STACK_TRACE(stacks, TT_STACKS);
BPF_PERCPU_ARRAY(stats, u64, TT_STAT__COUNT);
BPF_RINGBUF_OUTPUT(events, TT_RINGBUF_PAGES);
/* A per-CPU scratch record: tt_record is too big to build twice on the stack. */
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

static __always_inline void track_birth(struct tt_record *r)
{
	u64 sk = r->sk;
	retire_stale(sk, r->ts_ns);
	if (socks.insert(&sk, r) != 0) {
		stat_inc(TT_STAT_MAP_FULL);
		r->flags |= TT_FLAG_UNTRACKED; /* still stream it: user space shows it */
	}
	stat_inc(TT_STAT_BIRTHS);
	emit(r);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != TT_IPPROTO_TCP)
		return 0;
	u64 sk = (u64)args->skaddr;
	int newstate = args->newstate;
	u64 now = bpf_ktime_get_ns();

	struct tt_record *cur = socks.lookup(&sk);
	if (cur) {
		/* Never trust `current` here: this may be softirq. Update by address. */
		cur->state = newstate;
		cur->state_ns = now;
		if (args->sport)
			cur->lport = args->sport;
		if (args->family == TT_AF_INET) {
			__builtin_memcpy(cur->laddr, args->saddr, 4);
			__builtin_memcpy(cur->raddr, args->daddr, 4);
		} else {
			__builtin_memcpy(cur->laddr, args->saddr_v6, 16);
			__builtin_memcpy(cur->raddr, args->daddr_v6, 16);
		}
		cur->rport = args->dport;
		if (newstate == TT_TCP_CLOSE)
			cur->flags |= TT_FLAG_TCP_CLOSED;
		return 0;
	}

	/* Births seen here run inside connect() or listen(): process context. */
	if (args->oldstate != TT_TCP_CLOSE ||
	    (newstate != TT_TCP_SYN_SENT && newstate != TT_TCP_LISTEN))
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!is_target(tgid))
		return 0;

	int zero = 0;
	struct tt_record *r = scratch.lookup(&zero);
	if (!r)
		return 0;
	__builtin_memset(r, 0, sizeof(*r));
	r->kind = TT_KIND_BIRTH;
	r->ts_ns = now;
	r->birth_ns = now;
	r->state_ns = now;
	r->sk = sk;
	r->state = newstate;
	r->direction = newstate == TT_TCP_LISTEN ? TT_DIR_LISTEN : TT_DIR_CONNECT;
	r->family = args->family;
	r->lport = args->sport;
	r->rport = args->dport;
	if (args->family == TT_AF_INET) {
		__builtin_memcpy(r->laddr, args->saddr, 4);
		__builtin_memcpy(r->raddr, args->daddr, 4);
	} else {
		__builtin_memcpy(r->laddr, args->saddr_v6, 16);
		__builtin_memcpy(r->raddr, args->daddr_v6, 16);
	}
	fill_process(r);
	fill_stacks(args, r);

	/* The fd comes from the connect()/listen() entry on this thread; confirm it
	 * really holds this sock (TCP fast open, for one, births in sendto()). */
	u32 tid = r->tid;
	s32 *fdp = pending_fd.lookup(&tid);
	r->fd = -1;
	if (fdp && sock_of_fd(*fdp) == sk)
		r->fd = *fdp;
	if (r->fd < 0) {
		r->flags |= TT_FLAG_FD_UNKNOWN;
		stat_inc(TT_STAT_FD_UNRESOLVED);
	}
	track_birth(r);
	return 0;
}

TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
	u64 sk = (u64)args->skaddr;
	struct tt_record *cur = socks.lookup(&sk);
	if (!cur)
		return 0;
	cur->kind = TT_KIND_DEATH;
	cur->ts_ns = bpf_ktime_get_ns();
	read_tcp_bytes(sk, cur);
	stat_inc(TT_STAT_DEATHS);
	emit(cur);
	socks.delete(&sk);
	return 0;
}

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
	u16 family = 0, protocol = 0;
	bpf_probe_read_kernel(&family, sizeof(family), (void *)sk + TT_OFF_SK_FAMILY);
	bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)sk + TT_OFF_SK_PROTOCOL);
	if ((family != TT_AF_INET && family != TT_AF_INET6) || protocol != TT_IPPROTO_TCP)
		return 0; /* unix, vsock, MPTCP...: not ours */

	int zero = 0;
	struct tt_record *r = scratch.lookup(&zero);
	if (!r)
		return 0;
	__builtin_memset(r, 0, sizeof(*r));
	u64 now = bpf_ktime_get_ns();
	r->kind = TT_KIND_BIRTH;
	r->ts_ns = now;
	r->birth_ns = now;
	r->state_ns = now;
	r->sk = sk;
	r->fd = fd;
	r->direction = TT_DIR_ACCEPT;
	r->family = family;
	u8 state = 0;
	bpf_probe_read_kernel(&state, sizeof(state), (void *)sk + TT_OFF_SK_STATE);
	r->state = state;
	u16 lport = 0, rport_be = 0;
	bpf_probe_read_kernel(&lport, sizeof(lport), (void *)sk + TT_OFF_SK_NUM);
	bpf_probe_read_kernel(&rport_be, sizeof(rport_be), (void *)sk + TT_OFF_SK_DPORT);
	r->lport = lport;
	r->rport = (rport_be >> 8) | ((rport_be & 0xff) << 8);
	if (family == TT_AF_INET) {
		bpf_probe_read_kernel(r->laddr, 4, (void *)sk + TT_OFF_SK_RCV_SADDR);
		bpf_probe_read_kernel(r->raddr, 4, (void *)sk + TT_OFF_SK_DADDR);
	} else {
		bpf_probe_read_kernel(r->laddr, 16, (void *)sk + TT_OFF_SK_V6_RCV_SADDR);
		bpf_probe_read_kernel(r->raddr, 16, (void *)sk + TT_OFF_SK_V6_DADDR);
	}
	fill_process(r);
	fill_stacks(ctx, r);
	track_birth(r);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
	return on_accept_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
	return on_accept_exit(args, args->ret);
}

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
	int zero = 0;
	struct tt_record *r = scratch.lookup(&zero);
	if (!r)
		return 0;
	__builtin_memset(r, 0, sizeof(*r));
	r->kind = TT_KIND_CLOSE_RANGE;
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
	int zero = 0;
	struct tt_record *r = scratch.lookup(&zero);
	if (!r)
		return 0;
	__builtin_memset(r, 0, sizeof(*r));
	r->kind = TT_KIND_EXIT;
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
	int zero = 0;
	struct tt_record *r = scratch.lookup(&zero);
	if (!r)
		return 0;
	__builtin_memset(r, 0, sizeof(*r));
	r->kind = TT_KIND_FORK;
	r->ts_ns = bpf_ktime_get_ns();
	r->tgid = ptgid;
	r->aux = ctgid;
	r->fd = -1;
	emit(r);
	return 0;
}
#endif
