// SPDX-License-Identifier: GPL-2.0
//
// Event-driven mode (EPROXY) steering: an sk_lookup program attached to a
// pod's network namespace hands every new TCP connection to the serving port
// (`steer_config.port`, e.g. 8012) straight to the socket in `steer_target`
// (the user container's listening socket), so no userspace proxy sits in the
// data path. Connections to other ports, and all connections while
// `steer_target` is empty, take the normal lookup. `steer_count` counts the
// connections steered. Names are the interface with ebpf/src/steering.rs.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define IPPROTO_TCP 6

struct steer_cfg {
	__u32 port;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct steer_cfg);
} steer_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} steer_target SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} steer_count SEC(".maps");

SEC("sk_lookup")
int steer_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 key = 0;
	struct steer_cfg *cfg;
	struct bpf_sock *sk;
	__u64 *count;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	cfg = bpf_map_lookup_elem(&steer_config, &key);
	if (!cfg || cfg->port == 0 || ctx->local_port != cfg->port)
		return SK_PASS;
	sk = bpf_map_lookup_elem(&steer_target, &key);
	if (!sk)
		return SK_PASS;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err == 0) {
		count = bpf_map_lookup_elem(&steer_count, &key);
		if (count)
			*count += 1;
	}
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
