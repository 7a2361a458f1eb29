// SPDX-License-Identifier: GPL-2.0
/* netstatd kernel side: TCP state transitions, accept/listen and UDP flows
 * as struct netstat_event records in one ring buffer.
 *
 * Ownership rule: a socket's owner (tgid, comm, cgroup) is recorded only in
 * process context (connect -> SYN_SENT, listen, accept) into per-socket
 * storage, and every later event - often running in softirq, where "current"
 * is whichever task was interrupted - reports that stored owner.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "events.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

char LICENSE[] SEC("license") = "GPL";

const volatile struct agent_settings settings = {
	.capture_tcp = 1,
	.capture_udp = 1,
	.include_loopback = 0,
	.accept_from_io = 1,
	.udp_refresh_ns = 5000000000ULL,
};

/* Puts struct netstat_event into the object's BTF (locals are not recorded),
 * where tests/unit/test_bpf_abi.py checks it against events.py. */
struct netstat_event *netstat_event_btf_anchor __attribute__((unused));

/* Per-socket storage: the owner, and the TCP states not sent yet. */
struct owner {
	__u64 cookie;    /* socket the owner was recorded for; differs after a clone */
	__u64 cgroup_id;
	__u32 tgid;
	__u32 udp_flags; /* UDPF_BOUND: the UDP socket announced its port (its flows: udp_socks) */
	char comm[NETSTATD_COMM_LEN];
	__u64 folded;    /* states passed through since the last record (see event.folded) */
	__u32 nfolded;
	__u16 last_step; /* oldstate << 8 | newstate of the last transition taken */
	__u16 tcp_flags; /* TCPF_* */
	__u64 stats_sig; /* the counters the stats iterator last reported, hashed */
};

#define UDPF_BOUND 0x2
#define TCPF_ACCEPT_PENDING 0x1 /* cloned from a listener: the acceptor is not known yet */
#define TCPF_PASSIVE 0x2        /* cloned from a listener */

/* A ring buffer per CPU: a record's reserve and commit touch only its own CPU's ring, whose lock and
 * positions stay in that CPU's cache (one shared ring cost ~30 ns more a record at full churn on two
 * CPUs, docs/benchmarks.md). Records of one socket can then sit in different rings: user space
 * merges them by time (ringbuf.py RingSet). The loader sizes the array to the possible CPUs and
 * puts a ring in every slot. */
struct ring {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	/* the template's size: the loader makes each CPU's ring (loader.py ring_bytes_per_cpu), and the
	 * kernel does not compare sizes of rings in an array */
	__uint(max_entries, 4096);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1); /* the loader sets it to the possible CPUs */
	__type(key, __u32);
	__array(values, struct ring);
} rings SEC(".maps");

/* BPF_F_CLONE: an accepted socket starts with its listener's owner. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct owner);
} owners SEC(".maps");

/* Peer of an unconnected UDP send/receive, seen by the cgroup sock_addr hook
 * and consumed by the sock_{send,recv}_length tracepoint of the same call. */
struct udp_peer {
	__u64 cookie;
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 _pad[5];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64); /* pid_tgid */
	__type(value, struct udp_peer);
} udp_peers SEC(".maps");

/* Each UDP flow's totals, both directions, and its last announcement: datagrams within
 * settings.udp_refresh_ns of it are counted here, not sent (struct udp_flow, events.h). An LRU:
 * an evicted flow's next datagram starts a new entry, whose record says so (EVF_UDP_NEW). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_flow_key);
	__type(value, struct udp_flow);
} udp_flows SEC(".maps");

/* The first UDP_CLOSE_PEERS peers of a UDP socket, from its flows' first datagrams, so that its
 * release can send each of those flows' final totals (and drop their entries). */
#define UDP_CLOSE_PEERS 4

struct udp_sock_peers {
	__u32 n;
	__u32 _pad;
	struct {
		__u8 addr[16];
		__u16 port;
		__u16 _pad;
	} peers[UDP_CLOSE_PEERS];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct udp_sock_peers);
} udp_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);

	/* atomic: process-context and softirq programs share a CPU's slot */
	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline void *cpu_ring(void)
{
	__u32 cpu = bpf_get_smp_processor_id();

	return bpf_map_lookup_elem(&rings, &cpu);
}

/* The time of a record is taken as it is committed, while the transition it reports still holds the
 * socket: a socket's next record, on any CPU, has a later time (the order RingSet merges in). */
static __always_inline void emit(struct netstat_event *e)
{
	void *ring = cpu_ring();

	e->ts_ns = bpf_ktime_get_ns();
	/* No wakeup: user space drains on a short timer, which is far cheaper
	 * than a wakeup per event at high connection rates. */
	if (!ring || bpf_ringbuf_output(ring, e, sizeof(*e), BPF_RB_NO_WAKEUP))
		count(CNT_LOST);
}

/* emit() without the copy, for the hot path: the record is written in the ring itself, every byte
 * once (ring memory is not zeroed; zeroing it first cost ~25 ns a record here). */
static __always_inline struct netstat_event *reserve(void)
{
	void *ring = cpu_ring();
	struct netstat_event *e = ring ? bpf_ringbuf_reserve(ring, sizeof(*e), 0) : NULL;

	if (!e)
		count(CNT_LOST);
	return e;
}

static __always_inline void submit(struct netstat_event *e)
{
	e->ts_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline bool is_loopback(const __u8 *a, __u8 family)
{
	if (family == 4)
		return a[0] == 127;
	/* ::1 or v4-mapped 127.0.0.0/8 */
	__u64 hi, lo;

	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, a + 8, 8);
	if (hi != 0)
		return false;
	if (lo == bpf_cpu_to_be64(1))
		return true;
	return a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff && a[12] == 127;
}

static __always_inline bool filtered_loopback(const struct netstat_event *e)
{
	if (settings.include_loopback)
		return false;
	return is_loopback(e->saddr, e->family) || is_loopback(e->daddr, e->family);
}

static __always_inline __u32 netns_of_current(void)
{
	struct task_struct *t = (struct task_struct *)bpf_get_current_task();

	return BPF_CORE_READ(t, nsproxy, net_ns, ns.inum);
}

/* Family, addresses, remote port and netns of a socket. Its sock is a typed kernel pointer (tp_btf,
 * iter, the UDP I/O tracepoints): plain loads (the verifier makes them fault-safe) instead of one
 * probe-read helper call per field. False for another family. */
static __always_inline bool fill_sock_common(struct netstat_event *e, const struct sock_common *c)
{
	if (c->skc_family == AF_INET) {
		e->family = 4;
		/* the address, then 12 zero bytes: every byte written (see reserve()) */
		((__u64 *)e->saddr)[0] = c->skc_rcv_saddr;
		((__u64 *)e->saddr)[1] = 0;
		((__u64 *)e->daddr)[0] = c->skc_daddr;
		((__u64 *)e->daddr)[1] = 0;
	} else if (c->skc_family == AF_INET6) {
		e->family = 6;
		__builtin_memcpy(e->saddr, &c->skc_v6_rcv_saddr, 16);
		__builtin_memcpy(e->daddr, &c->skc_v6_daddr, 16);
	} else {
		return false;
	}
	e->dport = bpf_ntohs(c->skc_dport);
	e->netns = c->skc_net.net->ns.inum;
	return true;
}

/* fill_sock_common() and the local port of a TCP socket: skc_num is already 0 at CLOSE, inet_sport
 * still holds the port. */
static __always_inline bool fill_sock_btf(struct netstat_event *e, const struct sock *sk, const struct tcp_sock *tp)
{
	if (!fill_sock_common(e, &sk->__sk_common))
		return false;
	e->sport = bpf_ntohs(tp->inet_conn.icsk_inet.inet_sport);
	return true;
}

/* Not reported: a socket of another family, or loopback traffic unless asked for (read before a
 * record is reserved for it). */
static __always_inline bool skipped_sock(const struct sock *sk)
{
	const struct sock_common *c = &sk->__sk_common;

	if (c->skc_family == AF_INET)
		return !settings.include_loopback &&
		       ((c->skc_rcv_saddr & 0xff) == 127 || (c->skc_daddr & 0xff) == 127);
	if (c->skc_family != AF_INET6)
		return true;
	if (settings.include_loopback)
		return false;
	__u8 a[16];

	__builtin_memcpy(a, &c->skc_v6_rcv_saddr, 16);
	if (is_loopback(a, 6))
		return true;
	__builtin_memcpy(a, &c->skc_v6_daddr, 16);
	return is_loopback(a, 6);
}

/* A socket's counters: read at its close (the state program) and by the stats iterator, never per
 * packet. The kernel's bytes_acked and bytes_received count sequence space: on top of the payload,
 * our SYN once it is acknowledged (active side only: a passive socket starts past it), our FIN once
 * acknowledged, and the peer's FIN. The record carries payload. `state` is the one the socket is
 * leaving (closing) or is in (the iterator: err 0). */
static __always_inline void fill_counters(struct netstat_event *e, const struct sock *sk, const struct tcp_sock *tp,
					  int state, bool closing, int err, const struct owner *o)
{
	__u64 acked = tp->bytes_acked, received = tp->bytes_received;
	bool passive = o && (o->tcp_flags & TCPF_PASSIVE);

	if (acked && state != TCP_SYN_SENT && !passive)
		acked--; /* our SYN */
	if (acked && (state == TCP_FIN_WAIT2 ||
		      (closing && !err && (state == TCP_LAST_ACK || state == TCP_CLOSING))))
		acked--; /* our FIN: a live socket in LAST_ACK or CLOSING still waits for its ack */
	if (received && (sk->__sk_common.skc_flags & (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE))))
		received--; /* theirs: SOCK_DONE is set when it arrives */
	e->bytes_acked = acked;
	e->bytes_received = received;
	e->segs_out = tp->segs_out;
	e->segs_in = tp->segs_in;
	e->srtt_us = tp->srtt_us >> 3; /* the kernel keeps it << 3 */
	e->total_retrans = tp->total_retrans;
	e->error = err;
}

/* A record other than a close: its counter fields zeroed (ring memory is not, see reserve()). */
static __always_inline void no_counters(struct netstat_event *e)
{
	e->bytes_acked = 0;
	e->bytes_received = 0;
	e->segs_out = 0;
	e->segs_in = 0;
	e->srtt_us = 0;
	e->total_retrans = 0;
	e->error = 0;
}

/* A TCP state record's socket and transition; its owner, folded states and counters are the caller's. */
static __always_inline void fill_transition(struct netstat_event *e, const struct sock *sk, const struct tcp_sock *tp,
					    __u64 cookie, int oldstate, int newstate)
{
	fill_sock_btf(e, sk, tp);
	e->cookie = cookie;
	e->kind = newstate == TCP_LISTEN ? EV_TCP_LISTEN : EV_TCP_STATE;
	e->oldstate = oldstate;
	e->newstate = newstate;
	*(__u64 *)&e->flags = 0; /* with _pad */
	e->folded = 0;
	e->_pad2 = 0;
}

static __always_inline void owner_from_current(struct owner *o, __u64 cookie)
{
	o->cookie = cookie;
	o->tgid = bpf_get_current_pid_tgid() >> 32;
	o->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(o->comm, sizeof(o->comm));
}

static __always_inline void event_owner_current(struct netstat_event *e)
{
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->flags |= EVF_OWNER_CURRENT;
}

static __always_inline void event_owner_stored(struct netstat_event *e, const struct owner *o)
{
	e->tgid = o->tgid;
	e->cgroup_id = o->cgroup_id;
	__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	e->flags |= EVF_OWNER_STORED;
}

/* ---- TCP ---------------------------------------------------------------- */

/* Which transitions become a record of their own. The rest are folded into
 * the socket's next record (event.folded), in order: a short connection costs
 * two records on each side instead of five, and no state is lost. Folded
 * states a socket stays in reach user space without a next record: a connect
 * that lasts (SYN_SENT) through the stats iterator (on_tcp_stats), with its
 * owner; the others (a CLOSE_WAIT the application never closes) through the
 * sock_diag sweep, which runs while CNT_FOLDED moves (docs/kernel.md).
 *   LISTEN: a listener, in listen()'s context;
 *   ESTABLISHED: the connection is up, with both ports;
 *   CLOSE: gone, with every state it passed through.
 */
static __always_inline bool foldable(int newstate)
{
	return newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE && newstate != TCP_LISTEN;
}

/* A state the socket passed through, carried by its next record; false when the list is full (the
 * transition then makes a record of its own). second: the program folding it (see "Two programs").
 * Counted without an atomic: each program has its own per-CPU slot, and the kernel never runs a
 * program inside itself on one CPU, so no increment is lost. */
static __always_inline bool fold(struct owner *o, int state, bool second)
{
	__u32 idx = second ? CNT_FOLDED_NESTED : CNT_FOLDED;
	__u64 *folds;

	if (o->nfolded >= FOLDED_MAX)
		return false;
	o->folded |= (__u64)state << (FOLDED_BITS * o->nfolded);
	o->nfolded++;
	folds = bpf_map_lookup_elem(&counters, &idx);
	if (folds)
		*folds += 1;
	return true;
}

/* One transition taken: folded into the socket's next record, or a record of its own. inferred: a
 * transition no probe saw (see handle_state), taken at the next one: its record's owner is the stored
 * one and its time that of the next transition. */
static __always_inline void take_transition(struct sock *sk, struct owner *o, const int oldstate, const int newstate,
					    bool inferred, bool second)
{
	/* connect() or listen(): the owner is the running process */
	bool process_context = !inferred && (newstate == TCP_SYN_SENT || newstate == TCP_LISTEN);
	struct netstat_event *e;
	struct tcp_sock *tp;
	__u64 cookie;

	if (o && process_context)
		owner_from_current(o, bpf_get_socket_cookie(sk));
	if (o && foldable(newstate) && fold(o, newstate, second))
		return; /* a connect among them: its owner is in the storage, for the record that carries it */
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	cookie = bpf_get_socket_cookie(sk);
	if (o && !process_context) {
		if (!o->cookie) {
			o->cookie = cookie; /* a socket older than us: owner unknown (user space seeds it) */
		} else if (o->cookie != cookie) {
			/* cloned from the listener: its owner stands until the acceptor is known */
			o->cookie = cookie;
			o->tcp_flags |= TCPF_ACCEPT_PENDING | TCPF_PASSIVE;
		}
	}
	if (skipped_sock(sk))
		return;
	e = reserve();
	if (!e)
		return;
	fill_transition(e, sk, tp, cookie, oldstate, newstate);
	if (o) {
		e->folded = o->folded;
		o->folded = 0;
		o->nfolded = 0;
	}
	if (process_context) {
		/* listen() itself: the port is the bound one (0 for a listen without bind, which
		 * picks it just after; user space asks sock_diag). A connect's record only without
		 * storage, before the kernel picks its port. */
		event_owner_current(e);
	} else if (o) {
		event_owner_stored(e, o);
	} else {
		e->tgid = 0;
		e->cgroup_id = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	}
	if (inferred)
		e->flags |= EVF_INFERRED;
	if (newstate == TCP_CLOSE && !inferred) {
		fill_counters(e, sk, tp, oldstate, true, sk->sk_err ? sk->sk_err : sk->sk_err_soft, o);
	} else {
		/* an inferred CLOSE is one the socket has left since (it connects again): its
		 * counters are gone */
		no_counters(e);
	}
	submit(e);
}

/* second: called by the second of the two programs (see "Two programs").
 *
 * Missed transitions. Rarely (about one connection in a million at full churn here), the kernel
 * runs no probe of the tracepoint at all for a connection's handshake: neither program, nor a
 * classic tracepoint program beside them, and no recursion miss is counted. The socket's next
 * transition shows it: its old state is not the new state of the last one taken. The missed part
 * is then taken as one inferred transition (last state seen -> this old state; through SYN_RECV
 * for a socket cloned from its listener, the only way there), counted in CNT_INFERRED. */
static __always_inline int handle_state(struct sock *sk, const int oldstate, const int newstate, bool second)
{
	struct owner *o;

	if (!settings.capture_tcp || sk->sk_protocol != IPPROTO_TCP)
		return 0;
	o = bpf_sk_storage_get(&owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		if (second)
			return 0; /* cannot tell whether the first took it: it is counted as skipped if not */
	} else {
		/* Consecutive transitions of a socket always differ (the old state of one is the new
		 * state of the previous), so an equal step means the other program took this one. */
		__u16 step = oldstate << 8 | newstate;
		int seen = o->last_step & 0xff; /* 0: none taken yet (new storage) */

		if (o->last_step == step) {
			if (!second)
				count(CNT_PASSED);
			return 0;
		}
		o->last_step = step;
		if (seen && seen != oldstate) {
			count(CNT_INFERRED);
			/* a socket cloned from its listener: its owner is still the listener's */
			bool cloned = seen == TCP_LISTEN && o->cookie != bpf_get_socket_cookie(sk);

			if (cloned && oldstate != TCP_SYN_RECV)
				fold(o, TCP_SYN_RECV, second);
			take_transition(sk, o, seen, oldstate, true, second);
		}
	}
	if (second)
		count(CNT_NESTED);
	take_transition(sk, o, oldstate, newstate, false, second);
	return 0;
}

/* Two programs on one tracepoint, so that no transition is skipped.
 *
 * The kernel runs a tp_btf program at most once per CPU at a time: a softirq
 * transition that interrupts the program's run (a process closing a socket
 * while an ACK arrives), even in the trampoline's few instructions before or
 * after it, is skipped and only counted in its recursion_misses. So two
 * identical programs run for every transition, one after the other. Whichever
 * runs first takes the transition and marks it in the socket's storage
 * (owner.last_step); the other sees the mark and does nothing. A transition
 * is lost only if both are busy on that CPU at once, which needs the first to
 * be preempted mid-run and the second interrupted.
 *
 * Accounting, in user space: skipped = the first's recursion_misses +
 * CNT_PASSED (runs of the first that found the transition taken) -
 * CNT_NESTED (transitions the second took).
 */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_inet_sock_set_state, const struct sock *csk, const int oldstate, const int newstate)
{
	return handle_state((struct sock *)csk, oldstate, newstate, false);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_inet_sock_set_state_nested, const struct sock *csk, const int oldstate, const int newstate)
{
	return handle_state((struct sock *)csk, oldstate, newstate, true);
}

/* The acceptor of a passive socket, where fexit is refused: the first process that sends or receives
 * on it (the socket I/O tracepoints below, in that process's context). Until then the socket's
 * events carry the listener's owner, whose storage it was cloned from, so a record is sent only
 * when the acceptor is another process (a worker of a pre-forked server, a passed descriptor). */
static __always_inline void tcp_first_io(struct sock *sk)
{
	struct netstat_event e = {};
	struct tcp_sock *tp;
	struct owner *o;

	o = bpf_sk_storage_get(&owners, sk, 0, 0);
	if (!o || !(o->tcp_flags & TCPF_ACCEPT_PENDING))
		return;
	o->tcp_flags &= ~TCPF_ACCEPT_PENDING;
	if (o->tgid == bpf_get_current_pid_tgid() >> 32)
		return;
	owner_from_current(o, o->cookie);
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp || !fill_sock_btf(&e, sk, tp) || filtered_loopback(&e))
		return;
	e.cookie = o->cookie;
	e.kind = EV_TCP_ACCEPT;
	e.newstate = TCP_ESTABLISHED;
	e.flags = EVF_OWNER_ACCEPT;
	event_owner_current(&e);
	emit(&e);
}

/* Where fexit loads: the acceptor when accept() returns, for every accepted socket. inet_csk_accept(sk,
 * arg) is the >= 6.10 signature; on older kernels the third argument is not a socket and this program
 * fails verification, so the loader falls back to the first I/O (tcp_first_io). */
SEC("fexit/inet_csk_accept")
int BPF_PROG(on_inet_csk_accept_exit, struct sock *sk, struct proto_accept_arg *arg, struct sock *newsk)
{
	struct netstat_event e = {};
	struct tcp_sock *tp;
	struct owner *o;

	if (!settings.capture_tcp || !newsk || newsk->sk_protocol != IPPROTO_TCP)
		return 0;
	__u64 cookie = bpf_get_socket_cookie(newsk);

	o = bpf_sk_storage_get(&owners, newsk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o) {
		owner_from_current(o, cookie);
		o->tcp_flags &= ~TCPF_ACCEPT_PENDING;
	}
	tp = bpf_skc_to_tcp_sock(newsk);
	if (!tp || !fill_sock_btf(&e, newsk, tp) || filtered_loopback(&e))
		return 0;
	e.cookie = cookie;
	e.kind = EV_TCP_ACCEPT;
	e.newstate = TCP_ESTABLISHED;
	event_owner_current(&e);
	emit(&e);
	return 0;
}

/* A connect still in SYN_SENT, whose transition was folded (take_transition): its record, with the
 * stored owner, taken now. The iterator holds the socket's lock, so no transition of it runs
 * meanwhile, and its next record (ESTABLISHED or CLOSE) comes after this one, without SYN_SENT. */
static __always_inline void report_connect(struct sock *sk, struct tcp_sock *tp)
{
	struct owner *o = bpf_sk_storage_get(&owners, sk, 0, 0);
	struct netstat_event *e;

	/* the connect's fold alone: the only state folded */
	if (!o || o->nfolded != 1 || o->folded != TCP_SYN_SENT || skipped_sock(sk))
		return;
	e = reserve();
	if (!e)
		return;
	fill_transition(e, sk, tp, bpf_get_socket_cookie(sk), o->last_step >> 8, TCP_SYN_SENT);
	event_owner_stored(e, o);
	o->folded = 0;
	o->nfolded = 0;
	no_counters(e);
	submit(e);
}

/* Live connections' counters: user space reads this iterator every --stats-interval. One record
 * (EV_TCP_STATS) per connection whose counters changed since the previous read (a hash of them is
 * kept in the socket's storage), so a node of idle connections costs a walk of its sockets and no
 * records. */
SEC("iter/tcp")
int on_tcp_stats(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct netstat_event e = {};
	struct tcp_sock *tp;
	struct owner *o;
	struct sock *sk;
	int state;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; /* a request or TIME_WAIT socket */
	sk = (struct sock *)tp;
	state = skc->skc_state;
	if (state == TCP_SYN_SENT) {
		report_connect(sk, tp);
		return 0;
	}
	if (state == TCP_LISTEN || state == TCP_CLOSE || skipped_sock(sk))
		return 0;
	o = bpf_sk_storage_get(&owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	e.kind = EV_TCP_STATS;
	fill_counters(&e, sk, tp, state, false, 0, o);
	__u64 sig = e.bytes_acked * 0x9E3779B97F4A7C15ULL ^ e.bytes_received * 0xC2B2AE3D27D4EB4FULL ^
		    ((__u64)e.segs_out << 32 | e.segs_in) ^ ((__u64)e.srtt_us << 32 | e.total_retrans);

	if (o && o->stats_sig == sig)
		return 0;
	e.cookie = bpf_get_socket_cookie(sk);
	e.family = skc->skc_family == AF_INET6 ? 6 : 4;
	e.newstate = state;
	e.netns = skc->skc_net.net->ns.inum;
	/* A full read buffer fails the write, and the kernel shows this socket again at the next
	 * read(): remembered as reported only once it is written. */
	if (bpf_seq_write(ctx->meta->seq, &e, sizeof(e)) == 0 && o)
		o->stats_sig = sig;
	return 0;
}

/* ---- UDP ---------------------------------------------------------------- */

static __always_inline void stash_peer(struct bpf_sock_addr *ctx, __u8 family)
{
	struct udp_peer p = {};
	__u64 id = bpf_get_current_pid_tgid();

	if (!settings.capture_udp || ctx->protocol != IPPROTO_UDP)
		return;
	p.cookie = bpf_get_socket_cookie(ctx);
	p.family = family;
	p.port = bpf_ntohs(ctx->user_port);
	/* Each context field is read by name, here and in handle_post_bind: a
	 * shared macro let clang fold the field address, which the verifier
	 * rejects ("dereference of modified ctx ptr"). */
	if (family == 4) {
		__u32 a = ctx->user_ip4;

		__builtin_memcpy(p.addr, &a, 4);
	} else {
		__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
		__u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];

		__builtin_memcpy(p.addr, &a0, 4);
		__builtin_memcpy(p.addr + 4, &a1, 4);
		__builtin_memcpy(p.addr + 8, &a2, 4);
		__builtin_memcpy(p.addr + 12, &a3, 4);
	}
	bpf_map_update_elem(&udp_peers, &id, &p, BPF_ANY);
}

/* sendmsg4/6 fire only for sends that name a destination (unconnected). */
SEC("cgroup/sendmsg4")
int on_udp_sendmsg4(struct bpf_sock_addr *ctx)
{
	stash_peer(ctx, 4);
	return 1;
}

SEC("cgroup/sendmsg6")
int on_udp_sendmsg6(struct bpf_sock_addr *ctx)
{
	stash_peer(ctx, 6);
	return 1;
}

/* recvmsg4/6 carry the sender's address when the caller asked for it. */
SEC("cgroup/recvmsg4")
int on_udp_recvmsg4(struct bpf_sock_addr *ctx)
{
	stash_peer(ctx, 4);
	return 1;
}

SEC("cgroup/recvmsg6")
int on_udp_recvmsg6(struct bpf_sock_addr *ctx)
{
	stash_peer(ctx, 6);
	return 1;
}

static __always_inline bool zero_addr(const __u8 *a)
{
	__u64 hi, lo;

	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, a + 8, 8);
	return hi == 0 && lo == 0;
}

static __always_inline bool same_peer(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	return a0 == b0 && a1 == b1;
}

/* A new flow of sk: remembered for its release, among the socket's first UDP_CLOSE_PEERS. Two CPUs
 * adding peers to one socket at once may keep one of them only; the other's close totals then come
 * from user space's read of its entry (docs/kernel.md). */
static __always_inline void track_peer(struct sock *sk, const struct udp_flow_key *key)
{
	struct udp_sock_peers *u = bpf_sk_storage_get(&udp_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	__u32 n;

	if (!u)
		return;
	n = u->n;
	for (int i = 0; i < UDP_CLOSE_PEERS; i++) {
		if (i >= n)
			break;
		if (u->peers[i].port == key->rport && same_peer(u->peers[i].addr, key->raddr))
			return; /* its entry was evicted or taken by user space, and made again */
	}
	if (n >= UDP_CLOSE_PEERS)
		return;
	__builtin_memcpy(u->peers[n].addr, key->raddr, 16);
	u->peers[n].port = key->rport;
	u->n = n + 1;
}

static __always_inline void add_datagram(struct udp_flow *f, int ret, __u8 kind)
{
	/* atomic: a socket's sends and receives run on any CPU */
	if (kind == EV_UDP_SEND) {
		__sync_fetch_and_add(&f->bytes_sent, ret);
		__sync_fetch_and_add(&f->packets_sent, 1);
	} else {
		__sync_fetch_and_add(&f->bytes_received, ret);
		__sync_fetch_and_add(&f->packets_received, 1);
	}
}

static __always_inline void flow_counts(struct netstat_event *e, const struct udp_flow *f)
{
	e->bytes_acked = f->bytes_sent;
	e->bytes_received = f->bytes_received;
	e->segs_out = f->packets_sent;
	e->segs_in = f->packets_received;
}

/* fill_sock_common() and the local port of a UDP socket (no tcp_sock to read inet_sport from):
 * skc_num, which a UDP socket has while it is bound, as it is to send or receive. */
static __always_inline bool fill_udp_sock(struct netstat_event *e, const struct sock *sk)
{
	if (!fill_sock_common(e, &sk->__sk_common))
		return false;
	e->sport = sk->__sk_common.skc_num;
	return true;
}

#define MSG_PEEK 2

/* Called after the send/receive returned, in the caller's context: every datagram is counted in
 * its flow's entry (one hash look-up, two atomic adds), and the flow is announced with its totals
 * when the entry is new or its last announcement is settings.udp_refresh_ns old. */
static __always_inline int handle_udp_io(struct sock *sk, int ret, int msg_flags, __u8 kind)
{
	struct netstat_event e = {};
	struct udp_flow_key key = {};
	struct udp_flow *f;
	__u64 id, now;
	struct udp_peer *p;

	if (!settings.capture_udp || ret < 0 || sk->sk_protocol != IPPROTO_UDP)
		return 0;
	if (kind == EV_UDP_RECV && (msg_flags & MSG_PEEK))
		return 0; /* the datagram stays queued: the read that takes it counts it */
	if (!fill_udp_sock(&e, sk))
		return 0;
	e.cookie = bpf_get_socket_cookie(sk);
	id = bpf_get_current_pid_tgid();
	p = bpf_map_lookup_elem(&udp_peers, &id);
	if (p) {
		if (p->cookie == e.cookie) {
			/* a v4 destination on a v6 socket arrives as v4 from sendmsg4 */
			if (p->family == 4 && e.family == 6) {
				__builtin_memset(e.daddr, 0, 16);
				e.daddr[10] = 0xff;
				e.daddr[11] = 0xff;
				__builtin_memcpy(e.daddr + 12, p->addr, 4);
			} else {
				__builtin_memcpy(e.daddr, p->addr, 16);
			}
			e.dport = p->port;
		}
		bpf_map_delete_elem(&udp_peers, &id);
	}
	if (zero_addr(e.daddr) || filtered_loopback(&e))
		return 0; /* unconnected, and the caller did not name the peer */

	key.cookie = e.cookie;
	__builtin_memcpy(key.raddr, e.daddr, 16);
	key.rport = e.dport;
	now = bpf_ktime_get_ns();
	f = bpf_map_lookup_elem(&udp_flows, &key);
	if (f) {
		add_datagram(f, ret, kind);
		if (now - f->announced_ns < settings.udp_refresh_ns) {
			count(CNT_UDP_DEDUPED);
			return 0;
		}
		f->announced_ns = now;
		flow_counts(&e, f);
		e.flags = EVF_UDP_COUNTS;
	} else {
		struct udp_flow v = {.announced_ns = now};

		if (kind == EV_UDP_SEND) {
			v.bytes_sent = ret;
			v.packets_sent = 1;
		} else {
			v.bytes_received = ret;
			v.packets_received = 1;
		}
		if (bpf_map_update_elem(&udp_flows, &key, &v, BPF_NOEXIST)) {
			/* another CPU made it just now, and announces it */
			f = bpf_map_lookup_elem(&udp_flows, &key);
			if (f)
				add_datagram(f, ret, kind);
			count(CNT_UDP_DEDUPED);
			return 0;
		}
		track_peer(sk, &key);
		flow_counts(&e, &v);
		e.flags = EVF_UDP_COUNTS | EVF_UDP_NEW;
	}
	e.kind = kind;
	event_owner_current(&e);
	emit(&e);
	return 0;
}

static __always_inline int handle_sock_io(struct sock *sk, int ret, int flags, __u8 kind)
{
	if (sk->sk_protocol == IPPROTO_TCP) {
		if (settings.accept_from_io && ret >= 0)
			tcp_first_io(sk);
		return 0;
	}
	return handle_udp_io(sk, ret, flags, kind);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(on_sock_send_length, struct sock *sk, int ret, int flags)
{
	return handle_sock_io(sk, ret, flags, EV_UDP_SEND);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(on_sock_recv_length, struct sock *sk, int ret, int flags)
{
	return handle_sock_io(sk, ret, flags, EV_UDP_RECV);
}

/* bpf_sock has no netns; bind() and close() run in the owner's netns. */
static __always_inline void fill_cgroup_sock_event(struct netstat_event *e, struct bpf_sock *ctx)
{
	e->cookie = bpf_get_socket_cookie(ctx);
	e->netns = netns_of_current();
	event_owner_current(e);
}

/* family is a constant per program: post_bind4 may not read src_ip6. */
static __always_inline int handle_post_bind(struct bpf_sock *ctx, __u8 family)
{
	struct netstat_event e = {};
	struct owner *o;

	if (!settings.capture_udp || ctx->protocol != IPPROTO_UDP || ctx->src_port == 0)
		return 1;
	e.family = family;
	if (family == 4) {
		__u32 a = ctx->src_ip4;

		__builtin_memcpy(e.saddr, &a, 4);
	} else {
		__u32 a0 = ctx->src_ip6[0], a1 = ctx->src_ip6[1];
		__u32 a2 = ctx->src_ip6[2], a3 = ctx->src_ip6[3];

		__builtin_memcpy(e.saddr, &a0, 4);
		__builtin_memcpy(e.saddr + 4, &a1, 4);
		__builtin_memcpy(e.saddr + 8, &a2, 4);
		__builtin_memcpy(e.saddr + 12, &a3, 4);
	}
	e.sport = ctx->src_port;
	if (filtered_loopback(&e))
		return 1;
	fill_cgroup_sock_event(&e, ctx);
	o = bpf_sk_storage_get(&owners, ctx, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o)
		o->udp_flags |= UDPF_BOUND;
	e.kind = EV_UDP_BIND;
	emit(&e);
	return 1;
}

SEC("cgroup/post_bind4")
int on_post_bind4(struct bpf_sock *ctx)
{
	return handle_post_bind(ctx, 4);
}

SEC("cgroup/post_bind6")
int on_post_bind6(struct bpf_sock *ctx)
{
	return handle_post_bind(ctx, 6);
}

/* A UDP socket's end: one record per flow it kept (track_peer) with the flow's final totals, whose
 * entry goes; every record but the last says more follow (EVF_UDP_MORE), and the last closes the
 * socket in user space: its other flows (user space reads their entries) and its port. A socket
 * without flows sends one record, without a peer. */
SEC("cgroup/sock_release")
int on_sock_release(struct bpf_sock *ctx)
{
	struct netstat_event e = {};
	struct udp_flow_key key = {};
	struct udp_sock_peers *u;
	struct udp_flow *f;
	struct owner *o;
	__u32 n = 0;
	__u8 owner_flags;

	if (!settings.capture_udp || ctx->protocol != IPPROTO_UDP)
		return 1;
	o = bpf_sk_storage_get(&owners, ctx, 0, 0);
	u = bpf_sk_storage_get(&udp_socks, ctx, 0, 0);
	if (u)
		n = u->n;
	if (!n && !(o && o->udp_flags))
		return 1; /* announced nothing, so nothing to close */
	/* the cookie, and the peer of each flow: user space knows the rest from the flows/bind */
	e.family = ctx->family == AF_INET6 ? 6 : 4;
	fill_cgroup_sock_event(&e, ctx);
	e.kind = EV_UDP_CLOSE;
	if (!u || !n) {
		emit(&e);
		return 1;
	}
	owner_flags = e.flags;
	key.cookie = e.cookie;
	for (int i = 0; i < UDP_CLOSE_PEERS; i++) {
		if (i >= n)
			break;
		__builtin_memcpy(key.raddr, u->peers[i].addr, 16);
		key.rport = u->peers[i].port;
		__builtin_memcpy(e.daddr, key.raddr, 16);
		e.dport = key.rport;
		e.flags = owner_flags | (i + 1 < n ? EVF_UDP_MORE : 0);
		f = bpf_map_lookup_elem(&udp_flows, &key);
		if (f) {
			flow_counts(&e, f);
			e.flags |= EVF_UDP_COUNTS;
			bpf_map_delete_elem(&udp_flows, &key);
		} else {
			/* evicted, or taken by user space at the flow's idle close */
			e.bytes_acked = 0;
			e.bytes_received = 0;
			e.segs_out = 0;
			e.segs_in = 0;
		}
		emit(&e);
	}
	return 1;
}
