// SPDX-License-Identifier: GPL-2.0
//
// In-kernel request accounting for one pod's serving port (HTTP/1.x).
//
// One copy of this object is loaded per pod and its three programs are
// attached to the pod's cgroup v2 directory, so they only ever see sockets
// created by the pod's processes:
//
// - `acct_ingress` (cgroup_skb/ingress) sees the request bytes that reach a
//   socket whose local port is the serving port (`acct_config.port`);
// - `acct_egress` (cgroup_skb/egress) sees the response bytes that socket
//   sends;
// - `acct_sockops` (sockops) asks for TCP state-change callbacks on accepted
//   serving connections and ends a request still in flight when its
//   connection closes.
//
// Each connection carries a small state machine in socket-local storage
// (`acct_conns`, freed by the kernel with the socket):
//
//   IDLE --request bytes--> REQUEST --response bytes--> RESP_HEAD
//   RESP_HEAD --end of headers--> done | BODY (Content-Length) |
//              CHUNKED | UNTIL_CLOSE (no length, or 101 upgrade)
//   BODY --last body byte sent--> done;  CHUNKED --"\r\n0\r\n\r\n" sent--> done
//   any busy state --FIN sent / connection closed--> done
//
// "done" goes back to IDLE, so keep-alive connections carry many requests.
// Arrivals and completions change the pod-wide counters in `acct_stats`
// under a spin lock: concurrency, and concurrency integrated over time in
// nanoseconds (weighted_ns += concurrency * (now - last_change) at every
// transition), the same integral Knative's request stats compute, plus the
// same pair for requests that carried `K-Proxy-Request: activator`.
// Requests with `User-Agent: kube-probe/...` (the sidecar's readiness probes
// of the user container) are taken back once their headers are seen: Knative
// does not count probes.
//
// Cost per packet (bpftool prog show run_time_ns / run_cnt): packets of
// other ports stop at the socket's own port (skb->local_port), pure ACKs
// before the connection's storage is looked up; only a segment that starts a
// request or continues its unfinished headers, and a response head, are
// scanned; body segments are only counted down. The scanner goes a line at a
// time where it can (see scan_word): a line already decided is skipped a
// word at a time up to its LF, a header line's first 8 bytes are matched
// against the wanted names at once, and only what can change its state (a
// status code, the rest of a name that still matches, a Content-Length value,
// the empty line) is fed byte by byte.
//
// TCP sequence numbers filter retransmissions out. What is approximated is
// documented in ebpf/src/accounting.rs. The map and program names are the
// interface with that loader; keep them in sync.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6

#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_LAST_ACK 9

#define ST_IDLE 0
#define ST_REQUEST 1
#define ST_RESP_HEAD 2
#define ST_BODY 3
#define ST_CHUNKED 4
#define ST_UNTIL_CLOSE 5
#define ST_IGNORED 6

#define HDR_MATCH 0
#define HDR_CL_VALUE 1
#define HDR_SKIP 2

#define CHUNK 64
#define WORD 8
// Words of a line already decided skipped per scanner step at most.
#define SKIP_WORDS 4
// Header bytes scanned per segment at most.
#define MAX_SCAN 4096

struct pod_stats {
	struct bpf_spin_lock lock;
	__u32 concurrency;
	__u32 proxied_concurrency;
	__u32 pad;
	__u64 last_change_ns;
	__u64 weighted_ns;
	__u64 weighted_proxied_ns;
	__u64 arrivals;
	__u64 proxied_arrivals;
	__u64 completions;
	__u64 proxied_completions;
};

struct acct_cfg {
	__u32 port;
	__u32 pad;
};

struct conn {
	__u8 state;
	__u8 proxied;
	__u8 head;
	__u8 rx_init;
	__u8 tx_init;
	__u8 req_done;      // request headers fully scanned
	__u8 hdr;           // HDR_*
	__u8 mask;          // header names still matching on this line
	__u8 chunked;
	__u8 cl_seen;
	__u8 line_len;
	__u8 line_no;
	__u16 status;
	__u8 probe;         // 1: kube-probe seen, 2: its arrival taken back
	__u8 pad;
	__u32 rx_next;
	__u32 tx_next;
	__u64 cl;
	__u64 remaining;
	__u64 tail;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pod_stats);
} acct_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct acct_cfg);
} acct_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct conn);
} acct_conns SEC(".maps");

static const char CONTENT_LENGTH[] = "content-length:";
static const char TRANSFER_ENCODING[] = "transfer-encoding:";
static const char PROXY_HEADER[] = "k-proxy-request: activator";
static const char PROBE_HEADER[] = "user-agent: kube-probe/";
#define CONTENT_LENGTH_LEN 15
#define TRANSFER_ENCODING_LEN 18
#define PROXY_HEADER_LEN 26
#define PROBE_HEADER_LEN 23

#define MASK_CL 1
#define MASK_TE 2
#define MASK_PROXY 4
#define MASK_PROBE 8

// Integrates concurrency up to `now`; call with the lock held.
static __always_inline void integrate(struct pod_stats *s, __u64 now)
{
	__u64 dt;

	if (now > s->last_change_ns) {
		dt = now - s->last_change_ns;
		s->weighted_ns += (__u64)s->concurrency * dt;
		s->weighted_proxied_ns += (__u64)s->proxied_concurrency * dt;
		s->last_change_ns = now;
	}
}

#define ARRIVAL 0
#define COMPLETION 1
#define PROXIED_ARRIVAL 2
#define PROBE 3

// Records an arrival, a completion, or that the request that arrived last
// on a connection turned out to be proxied.
static __always_inline void transition(int what, int proxied)
{
	__u32 key = 0;
	struct pod_stats *s = bpf_map_lookup_elem(&acct_stats, &key);
	__u64 now = bpf_ktime_get_ns();

	if (!s)
		return;
	bpf_spin_lock(&s->lock);
	integrate(s, now);
	if (what == ARRIVAL) {
		s->concurrency += 1;
		s->arrivals += 1;
	} else if (what == PROBE) {
		// A probe is not a request (Knative skips kubelet probes):
		// take back its arrival, and its proxied arrival if
		// K-Proxy-Request was counted before the User-Agent was seen
		// (the two headers in different segments).
		if (s->concurrency > 0)
			s->concurrency -= 1;
		if (s->arrivals > 0)
			s->arrivals -= 1;
		if (proxied) {
			if (s->proxied_concurrency > 0)
				s->proxied_concurrency -= 1;
			if (s->proxied_arrivals > 0)
				s->proxied_arrivals -= 1;
		}
	} else if (what == PROXIED_ARRIVAL) {
		s->proxied_concurrency += 1;
		s->proxied_arrivals += 1;
	} else {
		if (s->concurrency > 0)
			s->concurrency -= 1;
		s->completions += 1;
		if (proxied) {
			if (s->proxied_concurrency > 0)
				s->proxied_concurrency -= 1;
			s->proxied_completions += 1;
		}
	}
	bpf_spin_unlock(&s->lock);
}

static __always_inline int busy(struct conn *c)
{
	return c->state >= ST_REQUEST && c->state <= ST_UNTIL_CLOSE;
}

// Ends the connection's request, releasing exactly what its arrival took:
// nothing for a probe (taken back when seen), the proxied share only if it
// was counted (proxied == 2).
static __always_inline void complete(struct conn *c)
{
	if (busy(c) && !c->probe)
		transition(COMPLETION, c->proxied == 2);
	c->state = ST_IDLE;
	c->probe = 0;
	c->proxied = 0;
	c->head = 0;
}

static __always_inline void reset_scanner(struct conn *c, __u8 mask)
{
	c->hdr = HDR_MATCH;
	c->mask = mask;
	c->chunked = 0;
	c->cl_seen = 0;
	c->cl = 0;
	c->line_len = 0;
	c->line_no = 0;
	c->status = 0;
}

// Feeds one header byte; returns 1 at the empty line ending the headers.
static __always_inline int feed(struct conn *c, __u8 b, __u8 line_mask, int response)
{
	__u32 pos;
	__u8 lower;

	if (b == '\n') {
		if (c->line_len == 0)
			return 1;
		c->line_len = 0;
		if (c->line_no < 255)
			c->line_no++;
		c->hdr = HDR_MATCH;
		c->mask = line_mask;
		return 0;
	}
	if (b == '\r')
		return 0;
	pos = c->line_len;
	if (c->line_len < 255)
		c->line_len++;
	if (c->line_no == 0) {
		// Status line "HTTP/1.1 200 ...": the code is at 9..11.
		if (response && pos >= 9 && pos <= 11 && b >= '0' && b <= '9')
			c->status = c->status * 10 + (b - '0');
		return 0;
	}
	if (c->hdr == HDR_SKIP)
		return 0;
	if (c->hdr == HDR_CL_VALUE) {
		if (b >= '0' && b <= '9') {
			if (c->cl < (1ULL << 56))
				c->cl = c->cl * 10 + (b - '0');
			c->cl_seen = 1;
		} else if (!((b == ' ' || b == '\t') && !c->cl_seen)) {
			c->hdr = HDR_SKIP;
		}
		return 0;
	}
	lower = (b >= 'A' && b <= 'Z') ? b + ('a' - 'A') : b;
	if ((c->mask & MASK_CL) &&
	    (pos >= CONTENT_LENGTH_LEN || CONTENT_LENGTH[pos & 15] != lower))
		c->mask &= ~MASK_CL;
	if ((c->mask & MASK_TE) &&
	    (pos >= TRANSFER_ENCODING_LEN || TRANSFER_ENCODING[pos & 31] != lower))
		c->mask &= ~MASK_TE;
	if ((c->mask & MASK_PROXY) &&
	    (pos >= PROXY_HEADER_LEN || PROXY_HEADER[pos & 31] != lower))
		c->mask &= ~MASK_PROXY;
	if ((c->mask & MASK_PROBE) &&
	    (pos >= PROBE_HEADER_LEN || PROBE_HEADER[pos & 31] != lower))
		c->mask &= ~MASK_PROBE;
	if ((c->mask & MASK_CL) && pos == CONTENT_LENGTH_LEN - 1) {
		c->hdr = HDR_CL_VALUE;
		c->cl = 0;
		c->cl_seen = 0;
	} else if ((c->mask & MASK_TE) && pos == TRANSFER_ENCODING_LEN - 1) {
		c->chunked = 1;
		c->hdr = HDR_SKIP;
	} else if ((c->mask & MASK_PROXY) && pos == PROXY_HEADER_LEN - 1) {
		if (!c->proxied)
			c->proxied = 1;
		c->hdr = HDR_SKIP;
	} else if ((c->mask & MASK_PROBE) && pos == PROBE_HEADER_LEN - 1) {
		if (!c->probe)
			c->probe = 1;
		c->hdr = HDR_SKIP;
	} else if (!c->mask) {
		c->hdr = HDR_SKIP;
	}
	return 0;
}

// Scanner position and buffer. They live in a per-CPU map rather than on the
// stack: the verifier does not track map contents, so the bpf_loop callback
// converges after one pass instead of being walked once per byte.
struct scan {
	__u32 off;    // offset of the first byte to scan in the skb
	__u32 len;    // bytes available
	__u32 pos;    // bytes scanned so far
	__u32 end;    // offset after the header block (relative to off), or 0
	__u32 bstart; // position of buf[0]
	__u32 blen;   // bytes loaded into buf
	__u8 line_mask;
	__u8 response;
	__u8 pad[6];
	// CHUNK loaded bytes, plus a word so that one can be read at any of
	// them (as two aligned words: see word_at).
	union {
		__u8 buf[CHUNK + WORD];
		__u64 words[CHUNK / WORD + 1];
	};
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scan);
} acct_scratch SEC(".maps");

// What the callback needs: pointers only, so the stack stays constant.
struct scan_ctx {
	struct __sk_buff *skb;
	struct conn *c;
	struct scan *sc;
};

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

// The high bit of every byte of `w` equal to the byte repeated in
// `pattern`. Exact for the lowest such byte (a borrow can only mark bytes
// above a true match), which is all its users look at.
static __always_inline __u64 bytes_eq(__u64 w, __u64 pattern)
{
	__u64 v = w ^ pattern;

	return (v - ONES) & ~v & HIGHS;
}

// Index (0..7) of the lowest byte marked in `m` (non-zero, high bits only).
static __always_inline __u32 first_marked(__u64 m)
{
	__u64 low = m & (~m + 1);

	return ((low >> 7) * 0x0001020304050607ULL) >> 56;
}

// `w` with the bytes 'A'..'Z' lowered, as `feed` lowers each byte.
static __always_inline __u64 lower_word(__u64 w)
{
	__u64 seven = w & ~HIGHS;
	__u64 ge_a = seven + (0x80 - 'A') * ONES;
	__u64 gt_z = seven + (0x80 - 'Z' - 1) * ONES;
	__u64 upper = ge_a & ~gt_z & ~w & HIGHS;

	return w | (upper >> 2);
}

// A pattern's first WORD bytes as a little-endian word.
#define PREFIX(a, b, c, d, e, f, g, h)                                              \
	((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 |       \
	 (__u64)(e) << 32 | (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)
#define CONTENT_LENGTH_8 PREFIX('c', 'o', 'n', 't', 'e', 'n', 't', '-')
#define TRANSFER_ENCODING_8 PREFIX('t', 'r', 'a', 'n', 's', 'f', 'e', 'r')
#define PROXY_HEADER_8 PREFIX('k', '-', 'p', 'r', 'o', 'x', 'y', '-')
#define PROBE_HEADER_8 PREFIX('u', 's', 'e', 'r', '-', 'a', 'g', 'e')
// The rest of "content-length:" after its first 8 bytes.
#define LENGTH_7 PREFIX('l', 'e', 'n', 'g', 't', 'h', ':', 0)

// The 8 bytes at buf[i], i < CHUNK, from the two aligned words they span.
static __always_inline __u64 word_at(struct scan *sc, __u32 i)
{
	__u32 j = (i / WORD) & (CHUNK / WORD - 1);
	__u32 r = (i % WORD) * 8;

	if (!r)
		return sc->words[j];
	return (sc->words[j] >> r) | (sc->words[j + 1] << (64 - r));
}

// Whether `feed` would only count the next bytes into the line length,
// provided none of them is CR or LF: a header line already decided (or
// skipped), or the request line, or a status line past its code.
static __always_inline int skipping(struct conn *c, __u8 response)
{
	if (c->line_no == 0)
		return !response || c->line_len >= 12;
	return c->hdr == HDR_SKIP;
}

// One bpf_loop step, a word (the next 8 bytes) at a time, exactly what
// feeding every byte does:
// - while `skipping`, only LF matters (`feed` ignores CR, and the length of
//   a line already under way only matters for being non-zero): words
//   without LF are counted at once (up to SKIP_WORDS per step), and a line
//   that has begun ends at a word's first LF;
// - at the start of a header line, a word without CR or LF is matched
//   against the first 8 bytes of every header name still wanted (all of
//   them are longer than that, so none completes in it);
// - anything else is fed byte by byte, until the scanner is `skipping`
//   again (the next step starts there).
static long scan_word(__u32 index, void *ctx)
{
	struct scan_ctx *sctx = ctx;
	struct scan *sc = sctx->sc;
	struct conn *c = sctx->c;
	__u32 pos = sc->pos;
	__u32 left;
	__u32 avail;
	__u32 i;
	__u32 n;
	__u32 k;
	__u64 w;
	__u64 lf;
	__u8 mask;

	if (pos >= sc->len)
		return 1;
	left = sc->len - pos;
	avail = left > WORD ? WORD : left;
	if (pos < sc->bstart || pos + avail > sc->bstart + sc->blen) {
		// Load the next chunk from here (bytes are read CHUNK at a time).
		n = left > CHUNK ? CHUNK : left;
		// 1..=CHUNK in a form the verifier can follow.
		n = ((n - 1) & (CHUNK - 1)) + 1;
		if (bpf_skb_load_bytes(sctx->skb, sc->off + pos, sc->buf, n) < 0)
			return 1;
		sc->bstart = pos;
		sc->blen = n;
	}
	i = (pos - sc->bstart) & (CHUNK - 1);
	if (avail == WORD) {
		w = word_at(sc, i);
		lf = bytes_eq(w, 0x0a * ONES);
		if (c->line_no == 0 && sc->response && c->line_len <= 1 && !lf &&
		    !bytes_eq(w, 0x0d * ONES)) {
			// The status line's first bytes ("HTTP/1.1"): the code
			// starts at 9.
			c->line_len += WORD;
			sc->pos = pos + WORD;
			return 0;
		}
		if (skipping(c, sc->response)) {
			// Up to SKIP_WORDS words of the line, while loaded.
			for (k = 0; k < SKIP_WORDS; k++) {
				if (lf) {
					if (c->line_len == 0)
						break;
					// The line ends: what `feed` does at its LF.
					c->line_len = 0;
					if (c->line_no < 255)
						c->line_no++;
					c->hdr = HDR_MATCH;
					c->mask = sc->line_mask;
					sc->pos = pos + first_marked(lf) + 1;
					return 0;
				}
				if (c->line_len == 0 && bytes_eq(w, 0x0d * ONES))
					break;
				n = (__u32)c->line_len + WORD;
				c->line_len = n > 255 ? 255 : n;
				pos += WORD;
				if (pos + WORD > sc->bstart + sc->blen)
					break;
				w = word_at(sc, (pos - sc->bstart) & (CHUNK - 1));
				lf = bytes_eq(w, 0x0a * ONES);
			}
			if (pos != sc->pos) {
				sc->pos = pos;
				return 0;
			}
		} else if (c->line_no > 0 && c->line_len == 0 && c->hdr == HDR_MATCH && !lf &&
			   !bytes_eq(w, 0x0d * ONES)) {
			w = lower_word(w);
			mask = c->mask;
			if (w != CONTENT_LENGTH_8)
				mask &= ~MASK_CL;
			if (w != TRANSFER_ENCODING_8)
				mask &= ~MASK_TE;
			if (w != PROXY_HEADER_8)
				mask &= ~MASK_PROXY;
			if (w != PROBE_HEADER_8)
				mask &= ~MASK_PROBE;
			c->mask = mask;
			c->line_len = WORD;
			if (!mask)
				c->hdr = HDR_SKIP;
			sc->pos = pos + WORD;
			return 0;
		} else if (c->line_len == WORD && c->hdr == HDR_MATCH && c->mask == MASK_CL && !lf &&
			   !bytes_eq(w, 0x0d * ONES) &&
			   (lower_word(w) & 0x00ffffffffffffffULL) == LENGTH_7) {
			// "content-" then "length:": the value follows.
			c->hdr = HDR_CL_VALUE;
			c->cl = 0;
			c->cl_seen = 0;
			c->line_len = CONTENT_LENGTH_LEN;
			sc->pos = pos + CONTENT_LENGTH_LEN - WORD;
			return 0;
		}
	}
	for (k = 0; k < WORD; k++) {
		if (k >= avail)
			break;
		n = i + k;
		if (n >= CHUNK + WORD)
			break;
		pos++;
		if (feed(c, sc->buf[n], sc->line_mask, sc->response)) {
			// A 1xx other than 101 is an interim answer: the final
			// response follows on the same connection.
			if (sc->response && c->status >= 100 && c->status < 200 &&
			    c->status != 101) {
				reset_scanner(c, sc->line_mask);
				continue;
			}
			sc->pos = pos;
			sc->end = pos;
			return 1;
		}
		// Decided: the next step takes whole words again.
		if (avail == WORD && c->line_len > 0 && skipping(c, sc->response))
			break;
	}
	sc->pos = pos;
	return 0;
}

// Scans up to MAX_SCAN bytes of headers; returns the offset after the header
// block relative to `off`, or 0 if it did not end here.
static __always_inline __u32 scan_headers(struct __sk_buff *skb, struct conn *c, __u32 off,
					  __u32 len, __u8 line_mask, __u8 response)
{
	__u32 key = 0;
	struct scan *sc = bpf_map_lookup_elem(&acct_scratch, &key);
	struct scan_ctx sctx = { .skb = skb, .c = c, .sc = sc };

	if (!sc)
		return 0;
	sc->off = off;
	sc->len = len > MAX_SCAN ? MAX_SCAN : len;
	sc->pos = 0;
	sc->end = 0;
	sc->bstart = 0;
	sc->blen = 0;
	sc->line_mask = line_mask;
	sc->response = response;
	// Every step consumes at least one byte.
	bpf_loop(MAX_SCAN, scan_word, &sctx, 0);
	return sc->end;
}

struct segment {
	__u32 payload_off;
	__u32 payload_len;
	__u32 seq;
	__u16 local_port;
	__u8 fin;
};

// Parses the IP and TCP headers; skb data starts at the network header.
static __always_inline int parse(struct __sk_buff *skb, int ingress, struct segment *seg)
{
	__u8 tcp[20];
	__u32 ip_len;
	__u32 tot_len;
	__u32 doff;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 ip[20];

		if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)) < 0)
			return -1;
		if (ip[9] != IPPROTO_TCP)
			return -1;
		ip_len = (ip[0] & 0x0f) * 4;
		tot_len = ((__u32)ip[2] << 8) | ip[3];
		// GSO packets carry 0 or the first segment's length.
		if (tot_len < skb->len)
			tot_len = skb->len;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		__u8 ip6[8];

		if (bpf_skb_load_bytes(skb, 0, ip6, sizeof(ip6)) < 0)
			return -1;
		if (ip6[6] != IPPROTO_TCP)
			return -1;
		ip_len = 40;
		tot_len = skb->len;
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, ip_len, tcp, sizeof(tcp)) < 0)
		return -1;
	doff = (tcp[12] >> 4) * 4;
	if (doff < 20)
		return -1;
	seg->local_port = ingress ? (((__u16)tcp[2] << 8) | tcp[3]) : (((__u16)tcp[0] << 8) | tcp[1]);
	seg->seq = ((__u32)tcp[4] << 24) | ((__u32)tcp[5] << 16) | ((__u32)tcp[6] << 8) | tcp[7];
	seg->fin = tcp[13] & 0x01;
	seg->payload_off = ip_len + doff;
	seg->payload_len = skb->len > seg->payload_off ? skb->len - seg->payload_off : 0;
	(void)tot_len;
	return 0;
}

static __always_inline struct conn *conn_of(struct __sk_buff *skb, struct segment *seg,
					    int ingress)
{
	__u32 key = 0;
	struct acct_cfg *cfg = bpf_map_lookup_elem(&acct_config, &key);
	struct bpf_sock *sk;

	if (!cfg || cfg->port == 0)
		return 0;
	// The socket's own port first: other traffic of the pod costs no parsing.
	if (skb->local_port != cfg->port)
		return 0;
	if (parse(skb, ingress, seg) < 0)
		return 0;
	if (seg->local_port != cfg->port)
		return 0;
	// A segment without payload matters only when it carries the FIN of a
	// response (egress): pure ACKs need no connection state.
	if (seg->payload_len == 0 && (ingress || !seg->fin))
		return 0;
	sk = skb->sk;
	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 0;
	return bpf_sk_storage_get(&acct_conns, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
}

// New in-order bytes of a segment: skips what was seen already (retransmits).
static __always_inline __u32 fresh(__u32 seq, __u32 len, __u8 *init, __u32 *next, __u32 *skip)
{
	__s32 behind;

	*skip = 0;
	if (!*init) {
		*init = 1;
		*next = seq + len;
		return len;
	}
	behind = (__s32)(*next - seq);
	if (behind < 0) {
		// A gap (lost segment): resynchronise on this one.
		*next = seq + len;
		return len;
	}
	if ((__u32)behind >= len)
		return 0;
	*skip = behind;
	*next = seq + len;
	return len - behind;
}

// Whether new bytes start a request: an upper-case method token and a space
// ("GET ", "OPTIONS "), or, when the segment is shorter than that, nothing
// but upper-case letters (a method split across segments).
static __always_inline int looks_like_request(struct __sk_buff *skb, __u32 off, __u32 len,
					      __u8 *head, int *h2)
{
	__u8 b[8] = {};
	__u32 n = len < 8 ? len : 8;
	int i;

	*h2 = 0;
	if (n == 0)
		return 0;
	// 1..=8 in a form the verifier can follow.
	n = ((n - 1) & 7) + 1;
	if (bpf_skb_load_bytes(skb, off, b, n) < 0)
		return 0;
	if (b[0] == 'P' && b[1] == 'R' && b[2] == 'I' && b[3] == ' ') {
		*h2 = 1;
		return 0;
	}
	*head = b[0] == 'H' && b[1] == 'E' && b[2] == 'A' && b[3] == 'D';
	for (i = 0; i < 8; i++) {
		if (i >= n)
			return 1;
		if (b[i] == ' ')
			return i >= 3;
		if (b[i] < 'A' || b[i] > 'Z')
			return 0;
	}
	return 0;
}

SEC("cgroup_skb/ingress")
int acct_ingress(struct __sk_buff *skb)
{
	struct segment seg = {};
	struct conn *c = conn_of(skb, &seg, 1);
	__u32 skip;
	__u32 n;
	__u32 off;
	__u8 head = 0;
	int h2 = 0;

	if (!c || c->state == ST_IGNORED || seg.payload_len == 0)
		return 1;
	n = fresh(seg.seq, seg.payload_len, &c->rx_init, &c->rx_next, &skip);
	if (n == 0)
		return 1;
	off = seg.payload_off + skip;
	if (c->state == ST_IDLE || c->state >= ST_RESP_HEAD) {
		if (!looks_like_request(skb, off, n, &head, &h2)) {
			if (h2 && c->state == ST_IDLE)
				c->state = ST_IGNORED;
			return 1;
		}
		// A new request while the previous response is still being
		// tracked: its end was missed, so it ends now.
		if (c->state != ST_IDLE)
			complete(c);
		c->state = ST_REQUEST;
		c->head = head;
		c->proxied = 0;
		c->probe = 0;
		c->req_done = 0;
		reset_scanner(c, MASK_PROXY | MASK_PROBE);
		transition(ARRIVAL, 0);
	} else if (c->state != ST_REQUEST || c->req_done) {
		return 1;
	}
	// Looks for K-Proxy-Request and a kubelet probe's User-Agent.
	if (scan_headers(skb, c, off, n, MASK_PROXY | MASK_PROBE, 0))
		c->req_done = 1;
	if (c->probe == 1) {
		// Taken back at once, with its proxied arrival if one was
		// counted from an earlier segment; its end is tracked but not
		// counted.
		c->probe = 2;
		transition(PROBE, c->proxied == 2);
		c->proxied = 0;
		return 1;
	}
	if (c->proxied == 1 && !c->probe) {
		// Count the proxied arrival once (2 = counted).
		c->proxied = 2;
		transition(PROXIED_ARRIVAL, 1);
	}
	return 1;
}

static __always_inline void check_chunked_tail(struct __sk_buff *skb, struct conn *c, __u32 n)
{
	__u8 b[8] = {};
	__u32 take = n < 8 ? n : 8;
	__u32 i;

	if (skb->len < 8 || bpf_skb_load_bytes(skb, skb->len - 8, b, 8) < 0)
		return;
	for (i = 8 - take; i < 8; i++)
		c->tail = (c->tail << 8) | b[i & 7];
	// "\r\n0\r\n\r\n": the last chunk and the end of the (empty) trailer.
	if ((c->tail & 0x00ffffffffffffffULL) == 0x000d0a300d0a0d0aULL)
		complete(c);
}

SEC("cgroup_skb/egress")
int acct_egress(struct __sk_buff *skb)
{
	struct segment seg = {};
	struct conn *c = conn_of(skb, &seg, 0);
	__u32 skip;
	__u32 n;
	__u32 end;
	__u32 body;

	if (!c || c->state == ST_IGNORED)
		return 1;
	if (seg.payload_len == 0) {
		if (seg.fin && busy(c))
			complete(c);
		return 1;
	}
	n = fresh(seg.seq, seg.payload_len, &c->tx_init, &c->tx_next, &skip);
	if (n == 0 || c->state == ST_IDLE)
		goto fin;
	if (c->state == ST_REQUEST) {
		c->state = ST_RESP_HEAD;
		reset_scanner(c, MASK_CL | MASK_TE);
	}
	if (c->state == ST_RESP_HEAD) {
		end = scan_headers(skb, c, seg.payload_off + skip, n, MASK_CL | MASK_TE, 1);
		if (!end)
			goto fin;
		body = n - end;
		if (c->status == 101) {
			c->state = ST_UNTIL_CLOSE;
		} else if (c->head || c->status == 204 || c->status == 304) {
			complete(c);
		} else if (c->chunked) {
			c->state = ST_CHUNKED;
			c->tail = 0x0a;   // the header block ended with "\n"
			if (body > 0)
				check_chunked_tail(skb, c, body);
		} else if (c->cl_seen) {
			if (body >= c->cl) {
				complete(c);
			} else {
				c->remaining = c->cl - body;
				c->state = ST_BODY;
			}
		} else {
			c->state = ST_UNTIL_CLOSE;
		}
		goto fin;
	}
	if (c->state == ST_BODY) {
		if (n >= c->remaining)
			complete(c);
		else
			c->remaining -= n;
	} else if (c->state == ST_CHUNKED) {
		check_chunked_tail(skb, c, n);
	}
fin:
	if (seg.fin && busy(c))
		complete(c);
	return 1;
}

SEC("sockops")
int acct_sockops(struct bpf_sock_ops *skops)
{
	__u32 key = 0;
	struct acct_cfg *cfg;
	struct bpf_sock *sk;
	struct conn *c;
	__u32 state;

	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		cfg = bpf_map_lookup_elem(&acct_config, &key);
		if (cfg && cfg->port != 0 && skops->local_port == cfg->port)
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		state = skops->args[1];
		if (state != TCP_FIN_WAIT1 && state != TCP_CLOSE && state != TCP_LAST_ACK)
			break;
		sk = skops->sk;
		if (!sk)
			break;
		c = bpf_sk_storage_get(&acct_conns, sk, 0, 0);
		if (c && busy(c))
			complete(c);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
