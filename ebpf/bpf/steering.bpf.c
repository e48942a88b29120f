// SPDX-License-Identifier: GPL-2.0
//
// Event-driven mode (EPROXY) steering, two programs sharing one target map:
//
// - `steer_lookup` (sk_lookup, attached to the pod's network namespace) hands
//   every new TCP connection to the serving port (`steer_config.port`, e.g.
//   8012) straight to the user container's listening socket in `steer_target`,
//   so no userspace proxy sits in the data path. Slot 0 holds an AF_INET
//   listener, slot 1 an AF_INET6 one; an IPv4 connection takes slot 0, else a
//   dual-stack slot 1. Connections to other ports, and all connections while
//   the target is empty (or refuses them), take the normal lookup, which finds
//   the sidecar's own listener on the serving port.
// - `steer_listen` (sock_ops, attached to the pod's cgroup) re-targets in the
//   kernel: when a process of the pod calls listen(2) on the user port
//   (`steer_config.user_port`), its socket becomes the target of its family's
//   slot. A restarted user container is steered to from its first listen(2);
//   a closed listener leaves the sockmap by itself, and connections fall back
//   to the sidecar in between.
//
// Connections whose source address lies in `steer_bypass` (an LPM trie of
// IPv6 prefixes, IPv4 as ::ffff:a.b.c.d) are not steered: they reach the
// sidecar's own listener. Used for the node's address, so that kubelet probes
// of the serving port get the queue-proxy's answers.
//
// `steer_count[0]` counts connections steered, `steer_count[1]` listeners
// taken by `steer_listen`, `steer_count[2]` connections bypassed. Names are the interface with ebpf/src/steering.rs.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define IPPROTO_TCP 6
#define AF_INET 2
#define AF_INET6 10

struct steer_cfg {
	__u32 port;
	__u32 user_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct steer_cfg);
} steer_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} steer_target SEC(".maps");

struct bypass_key {
	__u32 prefixlen;
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bypass_key);
	__type(value, __u8);
} steer_bypass SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} steer_count SEC(".maps");

static __always_inline void count(__u32 key)
{
	__u64 *n = bpf_map_lookup_elem(&steer_count, &key);

	if (n)
		*n += 1;
}

static __always_inline int bypassed(struct bpf_sk_lookup *ctx)
{
	struct bypass_key src = { .prefixlen = 128 };
	__u32 ip4 = ctx->remote_ip4;
	__u32 a0 = ctx->remote_ip6[0];
	__u32 a1 = ctx->remote_ip6[1];
	__u32 a2 = ctx->remote_ip6[2];
	__u32 a3 = ctx->remote_ip6[3];

	// Keep the loads where they are: merged into one load through a
	// computed context pointer, they would not pass the verifier.
	asm volatile("" : "+r"(ip4), "+r"(a0), "+r"(a1), "+r"(a2), "+r"(a3));
	if (ctx->family == AF_INET) {
		src.addr[2] = bpf_htonl(0xffff);
		src.addr[3] = ip4;
	} else {
		src.addr[0] = a0;
		src.addr[1] = a1;
		src.addr[2] = a2;
		src.addr[3] = a3;
	}
	return bpf_map_lookup_elem(&steer_bypass, &src) != NULL;
}

SEC("sk_lookup")
int steer_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 key = 0;
	struct steer_cfg *cfg;
	struct bpf_sock *sk;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	cfg = bpf_map_lookup_elem(&steer_config, &key);
	if (!cfg || cfg->port == 0 || ctx->local_port != cfg->port)
		return SK_PASS;
	if (bypassed(ctx)) {
		count(2);
		return SK_PASS;
	}
	key = ctx->family == AF_INET6 ? 1 : 0;
	sk = bpf_map_lookup_elem(&steer_target, &key);
	if (!sk && key == 0) {
		key = 1;
		sk = bpf_map_lookup_elem(&steer_target, &key);
	}
	if (!sk)
		return SK_PASS;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err == 0)
		count(0);
	return SK_PASS;
}

SEC("sockops")
int steer_listen(struct bpf_sock_ops *skops)
{
	__u32 key = 0;
	struct steer_cfg *cfg;

	if (skops->op != BPF_SOCK_OPS_TCP_LISTEN_CB)
		return 1;
	cfg = bpf_map_lookup_elem(&steer_config, &key);
	if (!cfg || cfg->user_port == 0 || skops->local_port != cfg->user_port)
		return 1;
	key = skops->family == AF_INET6 ? 1 : 0;
	if (bpf_sock_map_update(skops, &steer_target, &key, BPF_ANY) == 0)
		count(1);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
