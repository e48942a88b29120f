// SPDX-License-Identifier: GPL-2.0
//
// Kernel half of the spright dataplane.
//
// Every function process owns one loopback TCP socket (the client end of a
// connection to the local hub). Userspace records the socket's local port in
// `fn_ports` before it connects; `spright_sockops` then files the established
// socket in `fn_socks` under its function id. `spright_msg` runs on every
// sendmsg() of a socket in `fn_socks`: it reads the destination function id
// from the first 4 bytes of the 16-byte descriptor and moves the descriptor
// straight into the receive queue of the destination's socket. Descriptors for
// unknown destinations continue on the normal TCP path to the hub.
//
// The map and program names are the interface with the Rust loader
// (ebpf/src/lib.rs); keep them in sync.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define MAX_PORTS 1024
#define MAX_SOCKS 1024
// Counter slots: one per function id 0..=255, plus the "unknown" slot.
#define MAX_FUNCTIONS 256
#define UNKNOWN_INDEX MAX_FUNCTIONS
#define COUNTER_SLOTS (MAX_FUNCTIONS + 1)
// Size of one descriptor: dst id, slot offset, length, generation (u32 LE each).
#define DESCRIPTOR_LEN 16
#define ID_LEN 4

#define AF_INET 2
#define AF_INET6 10

// Local TCP port (host byte order) -> function id.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} fn_ports SEC(".maps");

// Function id -> that function's socket.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u32);
	__type(value, __u32);
} fn_socks SEC(".maps");

// Messages per destination function id (slot 256: unknown destination).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} fn_msgs SEC(".maps");

// Bytes per destination function id (slot 256: unknown destination).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} fn_bytes SEC(".maps");

SEC("sockops")
int spright_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	__u32 family = skops->family;
	__u32 port;
	__u32 id;
	__u32 *found;

	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (family != AF_INET && family != AF_INET6)
		return 1;

	// local_port is already in host byte order (remote_port is not).
	port = skops->local_port;
	found = bpf_map_lookup_elem(&fn_ports, &port);
	if (!found)
		return 1;
	id = *found;
	bpf_sock_hash_update(skops, &fn_socks, &id, BPF_ANY);
	return 1;
}

static __always_inline void count(__u32 index, __u64 messages, __u64 bytes)
{
	__u64 *value;

	value = bpf_map_lookup_elem(&fn_msgs, &index);
	if (value)
		*value += messages;
	value = bpf_map_lookup_elem(&fn_bytes, &index);
	if (value)
		*value += bytes;
}

// Reads the destination id at offset 0. Packet pointers are re-read from the
// context on every call: bpf_msg_pull_data() invalidates earlier ones.
static __always_inline int read_id(struct sk_msg_md *msg, __u32 *id)
{
	void *data = (void *)(long)msg->data;
	void *data_end = (void *)(long)msg->data_end;

	if (data + ID_LEN > data_end)
		return -1;
	*id = *(__u32 *)data;
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	*id = __builtin_bswap32(*id);
#endif
	return 0;
}

// Sends the rest of the write on to the hub peer. A plain SK_PASS is not
// enough when the program runs again on the rest of a batched write: the
// kernel keeps the previous descriptor's redirect target in the message and
// would apply it. Redirecting to the sender's own socket (egress) overrides
// it; the sender's id comes from its local port, so a port must stay
// registered while its socket is in use. If the lookup fails, SK_PASS applies.
static __always_inline void to_hub(struct sk_msg_md *msg)
{
	__u32 port = msg->local_port;
	__u32 *found;
	__u32 self;

	found = bpf_map_lookup_elem(&fn_ports, &port);
	if (!found)
		return;
	self = *found;
	bpf_msg_redirect_hash(msg, &fn_socks, &self, 0);
}

SEC("sk_msg")
int spright_msg(struct sk_msg_md *msg)
{
	__u32 size = msg->size;
	__u32 id = 0;
	int have_id;

	have_id = read_id(msg, &id) == 0;
	if (!have_id && size >= ID_LEN &&
	    bpf_msg_pull_data(msg, 0, ID_LEN, 0) == 0)
		// The id straddled scatterlist entries; now it is linear.
		have_id = read_id(msg, &id) == 0;

	if (have_id && id < MAX_FUNCTIONS) {
		// One verdict per descriptor: when a sender batches descriptors in
		// one write, the program runs again for the following 16 bytes.
		bpf_msg_apply_bytes(msg, DESCRIPTOR_LEN);
		if (bpf_msg_redirect_hash(msg, &fn_socks, &id, BPF_F_INGRESS) == SK_PASS) {
			count(id, 1, size < DESCRIPTOR_LEN ? size : DESCRIPTOR_LEN);
			return SK_PASS;
		}
	}
	// Unknown destination (or too short to carry one): this descriptor and
	// the rest of the write go to the hub in one piece, which flushes them
	// promptly (the hub routes what follows).
	bpf_msg_apply_bytes(msg, size);
	to_hub(msg);
	count(UNKNOWN_INDEX, (size + DESCRIPTOR_LEN - 1) / DESCRIPTOR_LEN, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
