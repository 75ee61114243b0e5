/* SPDX-License-Identifier: Apache-2.0
 *
 * The one definition of what the BPF side hands to user space.
 * Mirrored once in Python by tcptrace/events.py (RawSocketRecord) and pinned
 * by tests/unit/test_layout.py, which compiles this header with the host C
 * compiler and compares every offset.
 *
 * The same struct is both the value of the in-kernel ledger map (`socks`,
 * keyed by struct sock address) and the record streamed through the ring
 * buffer, so a scan of the map and an event decode the same way.
 */
#ifndef TCPTRACE_H
#define TCPTRACE_H

#define TT_LAYOUT_VERSION 1
#define TT_COMM_LEN 16
#define TT_ADDR_LEN 16

/* Record kinds. */
enum tt_kind {
	TT_KIND_BIRTH = 1,       /* a traced process got a TCP socket (connect/accept/listen) */
	TT_KIND_DEATH = 2,       /* the kernel destroyed a tracked socket */
	TT_KIND_EXIT = 3,        /* a traced process exited (tgid in `tgid`) */
	TT_KIND_CLOSE_RANGE = 4, /* close_range(fd, aux) by a traced process */
	TT_KIND_FORK = 5,        /* a traced process forked (child tgid in `aux`) */
	TT_KIND_SNAPSHOT = 6,    /* value read by a scan of the ledger map, never streamed */
};

/* How the process got the socket. */
enum tt_direction {
	TT_DIR_CONNECT = 1,
	TT_DIR_ACCEPT = 2,
	TT_DIR_LISTEN = 3,
	TT_DIR_PREEXISTING = 4, /* user space only: seen in the start-up snapshot */
};

/* Bits of `flags`. */
enum tt_flag {
	TT_FLAG_FD_CLOSED = 1,     /* the process closed the fd we recorded (close syscall) */
	TT_FLAG_FD_UNKNOWN = 2,    /* we could not learn which fd holds the socket */
	TT_FLAG_REPLACED = 4,      /* DEATH emitted because the sock address was reused */
	TT_FLAG_TCP_CLOSED = 8,    /* TCP reached CLOSE while the process still held the socket */
	TT_FLAG_UNTRACKED = 16,    /* the ledger map was full: no death will follow */
};

/* Indexes of the per-CPU loss/activity counter array `stats`. */
enum tt_stat {
	TT_STAT_EVENTS_DROPPED = 0, /* ring buffer full: record lost */
	TT_STAT_MAP_FULL = 1,       /* ledger map full: socket not tracked */
	TT_STAT_USTACK_FAILED = 2,  /* user stack id not obtained */
	TT_STAT_KSTACK_FAILED = 3,  /* kernel stack id not obtained */
	TT_STAT_ACCEPT_UNRESOLVED = 4, /* accept returned an fd we could not walk to a sock */
	TT_STAT_FD_UNRESOLVED = 5,  /* connect/listen: fd not found for the sock */
	TT_STAT_SK_REUSED = 6,      /* a tracked sock address was reused before destroy */
	TT_STAT_BIRTHS = 7,
	TT_STAT_DEATHS = 8,
	TT_STAT_FD_CLOSES = 9,
	TT_STAT_TARGETS_FULL = 10,  /* follow-forks: the target map was full */
	TT_STAT_RUNS_RESCUED = 11,  /* nested probe runs the kernel skipped, done by a rescue program */
	TT_STAT__COUNT = 12,
};

struct tt_record {
	__u64 ts_ns;          /* CLOCK_MONOTONIC of this record (birth, death, scan) */
	__u64 birth_ns;       /* CLOCK_MONOTONIC when the process got the socket */
	__u64 sk;             /* struct sock address: identity while the socket lives */
	__u64 bytes_acked;    /* tcp_sock.bytes_acked at death (sent and acknowledged) */
	__u64 bytes_received; /* tcp_sock.bytes_received at death */
	__u64 state_ns;       /* CLOCK_MONOTONIC of the last state change */
	__u32 tgid;           /* process that owns the socket (set at birth, in process context) */
	__u32 tid;            /* thread that made the socket */
	__s32 fd;             /* fd in tgid, -1 when unknown */
	__s32 user_stack_id;  /* id in map `stacks`, negative errno when not captured */
	__s32 kernel_stack_id;
	__u32 aux;            /* kind-specific: close_range upper fd, fork child tgid */
	__u16 kind;           /* enum tt_kind */
	__u16 family;         /* AF_INET or AF_INET6 */
	__u16 lport;          /* host byte order */
	__u16 rport;          /* host byte order */
	__u8 state;           /* current TCP state (kernel numbering) */
	__u8 direction;       /* enum tt_direction */
	__u8 flags;           /* enum tt_flag bits */
	__u8 _pad0;
	__u8 laddr[TT_ADDR_LEN]; /* IPv4 in the first 4 bytes, network order */
	__u8 raddr[TT_ADDR_LEN];
	char comm[TT_COMM_LEN];
	__u32 _pad1;
	__u32 _pad2;
};

#endif /* TCPTRACE_H */
