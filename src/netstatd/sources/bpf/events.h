/* Kernel -> user space ABI of netstatd.
 *
 * Keep in step with events.py beside this file: tests/unit/test_bpf_abi.py
 * compares both against the BTF of the compiled object.
 * Fixed-width types and explicit padding only.
 */
#ifndef NETSTATD_EVENTS_H
#define NETSTATD_EVENTS_H

/* event.kind */
#define EV_TCP_STATE 1  /* inet_sock_set_state transition */
#define EV_TCP_ACCEPT 2 /* the accepting process, when it is not the listener's (see netstatd.bpf.c) */
#define EV_TCP_LISTEN 3 /* the LISTEN transition, in listen()'s context; sport 0 before the port is picked */
#define EV_UDP_SEND 4   /* datagram sent: a flow's announcement (at most one per udp_refresh_ns) */
#define EV_UDP_RECV 5   /* datagram received: likewise */
#define EV_UDP_BIND 6   /* bind() on a UDP socket: a UDP "listener" */
#define EV_UDP_CLOSE 7  /* UDP socket with flows or a bound port released: one record per flow it kept
			 * (daddr/dport set, EVF_UDP_MORE on all but the last), else one without a peer */
#define EV_TCP_STATS 8  /* a live connection's counters (the stats iterator, not the ring) */

/* event.flags */
#define EVF_OWNER_CURRENT 0x1 /* owner is the task that was running (process context) */
#define EVF_OWNER_STORED 0x2  /* owner came from the per-socket owner storage */
#define EVF_OWNER_ACCEPT 0x4  /* owner was set by accept() after the listener's clone */
#define EVF_UDP_COUNTS 0x8    /* a UDP record carrying its flow's totals (the counter fields, below) */
#define EVF_UDP_NEW 0x10      /* ... of a flow entry this datagram created: they start here */
#define EVF_UDP_MORE 0x20     /* EV_UDP_CLOSE: the same socket's close has another record after this one */
#define EVF_INFERRED 0x40     /* EV_TCP_STATE: a transition no probe saw, inferred at the socket's next one */

#define NETSTATD_COMM_LEN 16

struct netstat_event {
	__u64 ts_ns;     /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cookie;    /* socket cookie (== ss -e "sk:" / inet_diag cookie) */
	__u64 cgroup_id; /* owner's cgroup v2 id, 0 when unknown */
	__u32 tgid;      /* owner process, 0 when unknown */
	__u32 netns;     /* network namespace inode */
	__u8 saddr[16];  /* local address: IPv4 in the first 4 bytes */
	__u8 daddr[16];  /* remote address */
	__u16 sport;     /* local port, host byte order */
	__u16 dport;     /* remote port, host byte order */
	__u8 kind;       /* EV_* */
	__u8 family;     /* 4 or 6 */
	__u8 oldstate;   /* TCP states as in the kernel's enum */
	__u8 newstate;
	__u8 flags;      /* EVF_* */
	__u8 _pad[7];
	char comm[NETSTATD_COMM_LEN]; /* owner's comm */
	/* EV_TCP_STATE: states the socket passed through since its previous
	 * record, before newstate; FOLDED_BITS bits each, the oldest lowest,
	 * 0 ends the list (no TCP state is 0). */
	__u64 folded;
	/* EV_TCP_STATE into CLOSE, and EV_TCP_STATS: the socket's own counters
	 * (struct tcp_sock), payload only.
	 * UDP records with EVF_UDP_COUNTS: the flow's totals (struct udp_flow) in the first four,
	 * bytes_acked = bytes sent, bytes_received = bytes received, segs_out = datagrams sent,
	 * segs_in = datagrams received (the low 32 bits: user space carries the rest); 0 otherwise. */
	__u64 bytes_acked;    /* payload bytes sent and acknowledged by the peer */
	__u64 bytes_received; /* payload bytes received */
	__u32 segs_out;       /* segments sent, retransmissions included */
	__u32 segs_in;        /* segments received */
	__u32 srtt_us;        /* smoothed RTT, microseconds */
	__u32 total_retrans;  /* segments retransmitted */
	__u32 error;          /* the socket's error (sk_err, else sk_err_soft): an errno, 0 for none */
	__u32 _pad2;
};

/* The udp_flows map (netstatd.bpf.c), which user space also reads and deletes from (loader.py):
 * one entry per UDP flow, a socket and a peer. */
struct udp_flow_key {
	__u64 cookie;    /* the socket's */
	__u8 raddr[16];  /* the peer, as event.daddr */
	__u16 rport;     /* host byte order */
	__u8 _pad[6];
};

struct udp_flow {
	__u64 bytes_sent; /* totals since the entry was made; atomic adds, both directions */
	__u64 bytes_received;
	__u64 packets_sent;
	__u64 packets_received;
	__u64 announced_ns; /* the flow's last record: the next comes udp_refresh_ns later at the earliest */
};

#define FOLDED_BITS 4
#define FOLDED_MAX 16 /* states a u64 holds; one more forces a record */

/* Rewritten by the loader in .rodata before load. */
struct agent_settings {
	__u8 capture_tcp;
	__u8 capture_udp;
	__u8 include_loopback;
	__u8 accept_from_io; /* the acceptor from the first I/O (fexit refused) */
	__u8 _pad[4];
	__u64 udp_refresh_ns; /* re-announce an active UDP flow at most this often */
};

/* counters map index */
#define CNT_EMITTED 0 /* not counted here: user space reads the ring's producer position */
#define CNT_LOST 1 /* ring buffer reserve failed */
#define CNT_UDP_DEDUPED 2
#define CNT_NESTED 3 /* state transitions the second program took */
#define CNT_FOLDED 4 /* state transitions folded into a later record */
#define CNT_PASSED 5 /* runs of the first program that found the transition taken by the second */
#define CNT_INFERRED 6 /* TCP transitions no probe saw, inferred from the socket's next one */
#define CNT_FOLDED_NESTED 7 /* CNT_FOLDED's folds by the second program (each program has its slot) */
#define CNT_MAX 8

#endif
