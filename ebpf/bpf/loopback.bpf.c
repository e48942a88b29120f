// SPDX-License-Identifier: GPL-2.0
//
// Full mode: SPRIGHT's sockmap redirect applied to the in-pod loopback hop
// between the queue-proxy sidecar and the user container.
//
// One copy is loaded per pod and `lb_sockops` is attached to the pod's cgroup
// v2 directory. When a TCP connection over loopback reaches ESTABLISHED and
// one of its ports is a user port listed in `lb_ports` (the sidecar's
// connection to 127.0.0.1:USER_PORT, and the user container's accepted end of
// it), the socket is filed in the SOCKHASH `lb_socks` under its own 4-tuple,
// and its peer's 4-tuple is kept in socket-local storage (`lb_state`).
//
// `lb_msg` runs on every sendmsg() of a socket in `lb_socks` and moves the
// bytes straight into the receive queue of the peer socket
// (bpf_msg_redirect_hash with BPF_F_INGRESS), both directions. Nothing crosses
// the TCP/IP stack. Anything it cannot redirect continues on plain TCP.
//
// Ordering rule: a sender whose bytes once went over TCP (its peer was not
// filed yet, is gone, or the loader asked to drain) keeps using TCP for the
// rest of the connection. The reader drains redirected bytes before TCP
// bytes, so switching from TCP to redirect could reorder a stream; switching
// from redirect to TCP cannot.
//
// The map and program names are the interface with the Rust loader
// (ebpf/src/loopback.rs); keep them in sync.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

#define MAX_USER_PORTS 16
#define MAX_SOCKS 65535

// Counter slots (per CPU, u64).
#define C_REDIRECT_MSGS 0
#define C_REDIRECT_BYTES 1
#define C_PASS_MSGS 2
#define C_PASS_BYTES 3
#define C_SOCKETS 4
#define C_INSERT_FAILED 5
#define C_SLOTS 6

// A connection as one end sees it. Addresses are IPv6 in network byte order
// (IPv4 as ::ffff:a.b.c.d, so both ends agree whatever family their socket
// has); ports in host byte order.
struct lb_key {
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u32 local_port;
	__u32 remote_port;
};

struct lb_sock {
	struct lb_key peer;
	__u32 tcp_only;
	__u32 pad;
};

struct lb_cfg {
	__u32 draining;
	__u32 pad;
};

// User ports (host byte order) -> 1.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_USER_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} lb_ports SEC(".maps");

// 4-tuple (own view) -> socket.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, struct lb_key);
	__type(value, __u32);
} lb_socks SEC(".maps");

// Per socket: the peer's key and whether this sender fell back to TCP.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lb_sock);
} lb_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_cfg);
} lb_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} lb_counters SEC(".maps");

static __always_inline void count(__u32 slot, __u64 value)
{
	__u64 *counter = bpf_map_lookup_elem(&lb_counters, &slot);

	if (counter)
		*counter += value;
}

static __always_inline int port_listed(__u32 port)
{
	return bpf_map_lookup_elem(&lb_ports, &port) != 0;
}

static __always_inline void map_v4(__u32 *ip6, __u32 ip4)
{
	ip6[0] = 0;
	ip6[1] = 0;
	ip6[2] = bpf_htonl(0x0000ffff);
	ip6[3] = ip4;
}

static __always_inline int is_loopback(const __u32 *ip)
{
	// ::1
	if (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1))
		return 1;
	// ::ffff:127.0.0.0/8
	if (ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff) &&
	    (bpf_ntohl(ip[3]) >> 24) == 127)
		return 1;
	return 0;
}

static __always_inline int same_ip(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

SEC("sockops")
int lb_sockops(struct bpf_sock_ops *skops)
{
	struct lb_key key = {};
	struct lb_sock *state;
	struct bpf_sock *sk;
	__u32 op = skops->op;
	__u32 family = skops->family;

	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;

	// local_port is in host byte order, remote_port in network byte order
	// in the upper 16 bits.
	key.local_port = skops->local_port;
	key.remote_port = bpf_ntohl(skops->remote_port);
	if (!port_listed(key.local_port) && !port_listed(key.remote_port))
		return 1;

	if (family == AF_INET) {
		map_v4(key.local_ip, skops->local_ip4);
		map_v4(key.remote_ip, skops->remote_ip4);
	} else if (family == AF_INET6) {
		key.local_ip[0] = skops->local_ip6[0];
		key.local_ip[1] = skops->local_ip6[1];
		key.local_ip[2] = skops->local_ip6[2];
		key.local_ip[3] = skops->local_ip6[3];
		key.remote_ip[0] = skops->remote_ip6[0];
		key.remote_ip[1] = skops->remote_ip6[1];
		key.remote_ip[2] = skops->remote_ip6[2];
		key.remote_ip[3] = skops->remote_ip6[3];
	} else {
		return 1;
	}
	// Only the in-pod hop: loopback addresses, or the pod's address to itself.
	if (!is_loopback(key.remote_ip) && !same_ip(key.local_ip, key.remote_ip))
		return 1;

	sk = skops->sk;
	if (!sk)
		return 1;
	// The peer's key first: lb_msg must find it as soon as the socket is filed.
	state = bpf_sk_storage_get(&lb_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		count(C_INSERT_FAILED, 1);
		return 1;
	}
	state->peer.local_ip[0] = key.remote_ip[0];
	state->peer.local_ip[1] = key.remote_ip[1];
	state->peer.local_ip[2] = key.remote_ip[2];
	state->peer.local_ip[3] = key.remote_ip[3];
	state->peer.remote_ip[0] = key.local_ip[0];
	state->peer.remote_ip[1] = key.local_ip[1];
	state->peer.remote_ip[2] = key.local_ip[2];
	state->peer.remote_ip[3] = key.local_ip[3];
	state->peer.local_port = key.remote_port;
	state->peer.remote_port = key.local_port;
	state->tcp_only = 0;

	// A passive socket may already hold bytes that came over TCP; its peer
	// then fell back to TCP for good (see lb_msg), so nothing reorders.
	if (bpf_sock_hash_update(skops, &lb_socks, &key, BPF_ANY) != 0) {
		count(C_INSERT_FAILED, 1);
		return 1;
	}
	count(C_SOCKETS, 1);
	return 1;
}

SEC("sk_msg")
int lb_msg(struct sk_msg_md *msg)
{
	struct lb_key peer;
	struct lb_sock *state;
	struct lb_cfg *cfg;
	struct bpf_sock *sk = msg->sk;
	__u32 zero = 0;
	__u64 size = msg->size;

	if (!sk)
		goto pass;
	state = bpf_sk_storage_get(&lb_state, sk, 0, 0);
	if (!state)
		goto pass;
	if (state->tcp_only)
		goto pass;
	cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (cfg && cfg->draining) {
		state->tcp_only = 1;
		goto pass;
	}
	__builtin_memcpy(&peer, &state->peer, sizeof(peer));
	// The whole write goes one way: no bpf_msg_apply_bytes/cork, so a write
	// with MSG_MORE or split over several calls is judged call by call.
	if (bpf_msg_redirect_hash(msg, &lb_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(C_REDIRECT_MSGS, 1);
		count(C_REDIRECT_BYTES, size);
		return SK_PASS;
	}
	// The peer is not (or no longer) filed: this and every later write of
	// this socket go over TCP, which keeps the stream in order.
	state->tcp_only = 1;
pass:
	count(C_PASS_MSGS, 1);
	count(C_PASS_BYTES, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
