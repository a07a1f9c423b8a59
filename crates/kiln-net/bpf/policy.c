// SPDX-License-Identifier: GPL-2.0
// Kiln sandbox network policy: a tc (clsact/TCX) program on a sandbox's tap.
//
// `kiln_egress` runs on the tap's ingress hook: every frame the guest sends.
// It enforces, in this order:
//   1. the frame's source MAC is the sandbox's;
//   2. only IPv4 and ARP pass; IPv6 and every other ethertype are dropped;
//   3. ARP: hardware/protocol types are Ethernet/IPv4, the sender MAC is the
//      sandbox's and the sender IP is the sandbox's (or 0.0.0.0, a probe);
//   4. IPv4: the source address is the sandbox's;
//   4b. DNS (TCP/UDP port 53, and DNS over TLS on 853) goes only to the node's
//      resolver (`identity.resolver`, when set), whatever the policy says;
//   5. the policy: longest-prefix lookup of the destination gives a bitmask of
//      candidate rules (see src/compile.rs), whose set bits are tried in rule
//      order against protocol and port; the first match decides, else the
//      prefix's protected flag denies, else the default decides. Addresses
//      the node's resolver admitted for domain rules (`dns`, keyed by address,
//      with an expiry) add those rules' bits to the candidates, unless the
//      address is protected.
// `kiln_ingress` runs on the tap's egress hook (frames to the guest). It drops
// IPv6 and records flows a peer starts (TCP SYN, first UDP packet, ICMP echo
// request keyed by its identifier; ICMP errors start nothing) in `flows`, so that the guest's answers pass `kiln_egress` as replies even
// where its policy would not let it start that flow. A flow the guest started
// is marked as the guest's, so a policy that stops allowing it stops it
// (no reply bypass). Ingress *rules* are not enforced yet.
//
// The maps are double-buffered by generation: user space writes the inactive
// generation's rules and trie, then flips `state.gen` (one aligned 32-bit
// store), so a packet sees one whole policy, never a half-written one.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_RULES 1024
#define MASK_WORDS (MAX_RULES / 64)
#define MAX_PREFIXES 4096

// Counter slots after the rules (per generation).
#define SLOT_DEFAULT (MAX_RULES + 0)
#define SLOT_PROTECTED (MAX_RULES + 1)
#define SLOT_REPLY (MAX_RULES + 2)
#define SLOTS (MAX_RULES + 3)

#define FLOW_GUEST 1 // the guest sent the first packet (the policy judges it)
#define FLOW_PEER 2 // the peer did: the guest's packets back are replies
#define FLOW_IDLE_NS (300ull * 1000000000ull)

// Drop reasons outside the policy (the `drops` map).
#define DROP_MAC 0
#define DROP_IP 1
#define DROP_ARP 2
#define DROP_IPV6 3
#define DROP_ETHERTYPE 4
#define DROP_MALFORMED 5
#define DROP_DNS 6
#define DROP_REASONS 7

#define MAX_ADMITTED 8192

#define ACTION_ALLOW 0
#define ACTION_DENY 1

#define RULE_HAS_PORTS 1

struct identity {
	__u8 mac[6];
	__u8 pad[2];
	__u32 ip; // network order
	__u32 resolver; // network order; 0: no node resolver, DNS follows the policy
};

struct gen_config {
	__u32 default_action;
};

struct rule {
	__u8 proto; // 0 = any
	__u8 action;
	__u8 flags;
	__u8 pad;
	__u16 port_lo;
	__u16 port_hi;
};

struct lpm_key {
	__u32 prefixlen;
	__u32 addr; // network order
};

struct lpm_val {
	__u64 mask[MASK_WORDS];
	__u32 protected;
	__u32 pad;
};

// An address the node's resolver admitted: the domain rules (per generation,
// as bits in rule order) whose names resolved to it, until `expires_ns`
// (CLOCK_MONOTONIC, what bpf_ktime_get_ns reads).
struct admit {
	__u64 expires_ns;
	__u64 mask0[MASK_WORDS];
	__u64 mask1[MASK_WORDS];
};

struct flow_key {
	__u32 peer; // network order
	__u16 peer_port; // host order; 0 for ICMP
	__u16 local_port;
	__u32 proto;
};

struct flow_val {
	__u64 last_seen_ns;
	__u32 origin;
	__u32 pad;
};

struct counter {
	__u64 allowed_packets;
	__u64 allowed_bytes;
	__u64 dropped_packets;
	__u64 dropped_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct identity);
} identity SEC(".maps");

// Index 0: the active generation (0 or 1).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} active SEC(".maps");

// Per generation: defaults.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct gen_config);
} gens SEC(".maps");

// Rules: [gen][rule].
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule);
} rules SEC(".maps");

#define TRIE(name)                                      \
	struct {                                        \
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);    \
		__uint(max_entries, MAX_PREFIXES);      \
		__uint(map_flags, BPF_F_NO_PREALLOC);   \
		__type(key, struct lpm_key);            \
		__type(value, struct lpm_val);          \
	} name SEC(".maps")

TRIE(prefixes0);
TRIE(prefixes1);

// Counters: [gen][slot].
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * SLOTS);
	__type(key, __u32);
	__type(value, struct counter);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, __u32);
	__type(value, struct counter);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ADMITTED);
	__type(key, __u32);
	__type(value, struct admit);
} dns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} flows SEC(".maps");

struct arp_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 sip[4];
	__u8 tha[6];
	__u8 tip[4];
} __attribute__((packed));

// Drop events: one record per connection attempt the policy drops (and DNS
// to another server), into a ring buffer user space drains (`kiln events`).
// Rate-limited per sandbox (this object is one sandbox's): at most
// EVENTS_PER_SEC a second; the rest are counted in `evstate.suppressed` and
// reported with the next event that passes, so a guest cannot flood the
// host, only lose its own events.
#define EVENTS_PER_SEC 20
#define EV_RULE_DEFAULT 0xffffffffu
#define EV_RULE_PROTECTED 0xfffffffeu
#define EV_RULE_DNS 0xfffffffdu

struct drop_event {
	__u64 time_ns; // CLOCK_MONOTONIC
	__u32 daddr; // network order
	__u32 rule; // rule index in the policy in force, or EV_RULE_*
	__u16 dport; // host order; 0 without a port
	__u8 proto;
	__u8 pad;
	__u32 suppressed; // events dropped by the rate limit before this one
};

struct evstate {
	__u64 window_ns;
	__u32 sent;
	__u32 suppressed;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct evstate);
} evstate SEC(".maps");

static __always_inline void emit_drop(__u32 rule, __u32 daddr, __u8 proto, int port)
{
	__u32 zero = 0;
	struct evstate *st = bpf_map_lookup_elem(&evstate, &zero);
	if (!st)
		return;
	__u64 now = bpf_ktime_get_ns();
	if (now - st->window_ns >= 1000000000ull) {
		st->window_ns = now;
		st->sent = 0;
	}
	if (st->sent >= EVENTS_PER_SEC) {
		__sync_fetch_and_add(&st->suppressed, 1);
		return;
	}
	struct drop_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&st->suppressed, 1);
		return;
	}
	st->sent += 1;
	e->time_ns = now;
	e->daddr = daddr;
	e->rule = rule;
	e->dport = port < 0 ? 0 : (__u16)port;
	e->proto = proto;
	e->pad = 0;
	// Not atomic with the adds of other CPUs: a count may be off by the
	// few that race, never by more.
	e->suppressed = st->suppressed;
	st->suppressed = 0;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int drop(__u32 reason, struct __sk_buff *skb)
{
	struct counter *c = bpf_map_lookup_elem(&drops, &reason);
	if (c) {
		c->dropped_packets += 1;
		c->dropped_bytes += skb->len;
	}
	return TC_ACT_SHOT;
}

static __always_inline int count(__u32 slot, int allow, struct __sk_buff *skb)
{
	struct counter *c = bpf_map_lookup_elem(&counters, &slot);
	if (c) {
		if (allow) {
			c->allowed_packets += 1;
			c->allowed_bytes += skb->len;
		} else {
			c->dropped_packets += 1;
			c->dropped_bytes += skb->len;
		}
	}
	return allow ? TC_ACT_OK : TC_ACT_SHOT;
}

static __always_inline int count_reply(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u32 *genp = bpf_map_lookup_elem(&active, &zero);
	if (!genp)
		return TC_ACT_SHOT;
	return count((*genp & 1) * SLOTS + SLOT_REPLY, 1, skb);
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] &&
	       a[4] == b[4] && a[5] == b[5];
}

// Reads IPv4 header fields and the L4 port at `l3` (offset of the IP header).
// Returns 0 and fills `addr_out` (dst when egress, src when ingress), proto and
// port (-1 when none), or -1 when malformed.
static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 l3, struct iphdr *ip,
				      int *port, int *sport)
{
	if (bpf_skb_load_bytes(skb, l3, ip, sizeof(*ip)) < 0)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	*port = -1;
	*sport = -1;
	__u16 frag = bpf_ntohs(ip->frag_off);
	if ((frag & 0x1fff) != 0)
		return 0; // a later fragment: no L4 header
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
		__u16 ports[2];
		__u32 l4 = l3 + ((__u32)ip->ihl & 0xf) * 4;
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
			return -1;
		// ports[0] = source, ports[1] = destination
		*port = (int)bpf_ntohs(ports[1]);
		*sport = (int)bpf_ntohs(ports[0]);
	}
	return 0;
}

// ICMP flows: only echo (ping) has a flow. The key's peer_port is the echo
// identifier and local_port says who asked: ICMP_BY_PEER for a peer's
// request (the guest's echo replies are replies), ICMP_BY_GUEST for the
// guest's (judged by the policy). Every other ICMP message (errors such as
// port unreachable, timestamps, ...) has no flow: from a peer it records
// nothing, so it cannot open ICMP back to that peer; from the guest the
// policy judges it.
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ICMP_BY_PEER 1
#define ICMP_BY_GUEST 2

// The ICMP type and echo identifier at `l3` (-1 type: none, e.g. a later
// fragment or a short packet).
static __always_inline int icmp_echo(struct __sk_buff *skb, __u32 l3, const struct iphdr *ip,
				     __u16 *ident)
{
	__u8 hdr[6];
	*ident = 0;
	if ((bpf_ntohs(ip->frag_off) & 0x1fff) != 0)
		return -1;
	__u32 l4 = l3 + ((__u32)ip->ihl & 0xf) * 4;
	if (bpf_skb_load_bytes(skb, l4, hdr, sizeof(hdr)) < 0)
		return -1;
	*ident = (__u16)((__u16)hdr[4] << 8 | hdr[5]);
	return hdr[0];
}

// Index of the only set bit of `v` (clang's BPF backend has no ctz).
static __always_inline __u32 bit_index(__u64 v)
{
	__u64 n = 0, x;
	x = v & 0xFFFFFFFF00000000ull; n += ((x | -x) >> 63) << 5;
	x = v & 0xFFFF0000FFFF0000ull; n += ((x | -x) >> 63) << 4;
	x = v & 0xFF00FF00FF00FF00ull; n += ((x | -x) >> 63) << 3;
	x = v & 0xF0F0F0F0F0F0F0F0ull; n += ((x | -x) >> 63) << 2;
	x = v & 0xCCCCCCCCCCCCCCCCull; n += ((x | -x) >> 63) << 1;
	x = v & 0xAAAAAAAAAAAAAAAAull; n += ((x | -x) >> 63);
	return (__u32)n;
}

static __always_inline __u32 popcount(__u64 x)
{
	x = x - ((x >> 1) & 0x5555555555555555ull);
	x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
	x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
	return (__u32)((x * 0x0101010101010101ull) >> 56);
}

struct scan {
	__u64 mask[MASK_WORDS];
	__u64 word; // the bits of the current word not tried yet
	__u32 wbase; // rule index of the current word's bit 0
	__u32 rbase;
	__s32 port;
	__u32 proto;
	__s32 hit; // rule index, -1 while none matched
	__u32 action;
};

// One inner bpf_loop step: the lowest untried set bit of the word, i.e. the
// earliest candidate rule left. The loop runs popcount(word) times.
static long scan_bit(__u64 i, void *ctx)
{
	struct scan *c = ctx;
	__u64 low = c->word & -c->word;
	if (low == 0)
		return 1;
	c->word ^= low;
	__u32 idx = c->wbase + bit_index(low);
	__u32 ridx = c->rbase + idx;
	struct rule *r = bpf_map_lookup_elem(&rules, &ridx);
	if (!r)
		return 0;
	if (r->proto != 0 && r->proto != c->proto)
		return 0;
	if (r->flags & RULE_HAS_PORTS) {
		if (c->port < 0 || c->port < r->port_lo || c->port > r->port_hi)
			return 0;
	}
	c->hit = (__s32)idx;
	c->action = r->action;
	return 1;
}

// One outer bpf_loop step: mask word `w` (16 words of 64 rules).
static long scan_word(__u64 w, void *ctx)
{
	struct scan *c = ctx;
	__u64 word = c->mask[w & (MASK_WORDS - 1)];
	if (word == 0)
		return 0;
	c->word = word;
	c->wbase = (__u32)(w & (MASK_WORDS - 1)) * 64;
	bpf_loop(popcount(word), scan_bit, c, 0);
	return c->hit >= 0 ? 1 : 0;
}

static __always_inline int decide(struct __sk_buff *skb, __u32 addr, __u8 proto, int port,
				  __u64 now)
{
	__u32 zero = 0;
	__u32 *genp = bpf_map_lookup_elem(&active, &zero);
	if (!genp)
		return TC_ACT_SHOT;
	__u32 gen = *genp & 1;
	struct gen_config *gc = bpf_map_lookup_elem(&gens, &gen);
	if (!gc)
		return TC_ACT_SHOT;
	__u32 def = gc->default_action;
	__u32 base = gen * SLOTS;

	struct lpm_key key = { .prefixlen = 32, .addr = addr };
	struct lpm_val *val;
	if (gen)
		val = bpf_map_lookup_elem(&prefixes1, &key);
	else
		val = bpf_map_lookup_elem(&prefixes0, &key);
	__u32 is_protected = val ? val->protected : 0;
	// Domain admissions never open a protected address (a name resolving
	// to the node, another sandbox or 169.254.169.254 admits nothing).
	struct admit *ad = 0;
	if (!is_protected) {
		ad = bpf_map_lookup_elem(&dns, &addr);
		if (ad && now >= ad->expires_ns)
			ad = 0;
	}
	if (!val && !ad) {
		if (def != ACTION_ALLOW)
			emit_drop(EV_RULE_DEFAULT, addr, proto, port);
		return count(base + SLOT_DEFAULT, def == ACTION_ALLOW, skb);
	}

	struct scan c = {
		.rbase = gen * MAX_RULES,
		.port = port,
		.proto = proto,
		.hit = -1,
	};
	if (val)
		__builtin_memcpy(c.mask, val->mask, sizeof(c.mask));
	if (ad) {
		const __u64 *m = gen ? ad->mask1 : ad->mask0;
#pragma unroll
		for (int w = 0; w < MASK_WORDS; w++)
			c.mask[w] |= m[w];
	}
	bpf_loop(MASK_WORDS, scan_word, &c, 0);
	if (c.hit >= 0 && c.hit < MAX_RULES) {
		if (c.action != ACTION_ALLOW)
			emit_drop((__u32)c.hit, addr, proto, port);
		return count(base + (__u32)c.hit, c.action == ACTION_ALLOW, skb);
	}
	if (is_protected) {
		emit_drop(EV_RULE_PROTECTED, addr, proto, port);
		return count(base + SLOT_PROTECTED, 0, skb);
	}
	if (def != ACTION_ALLOW)
		emit_drop(EV_RULE_DEFAULT, addr, proto, port);
	return count(base + SLOT_DEFAULT, def == ACTION_ALLOW, skb);
}

SEC("classifier")
int kiln_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct identity *id = bpf_map_lookup_elem(&identity, &zero);
	if (!id)
		return TC_ACT_SHOT;

	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return drop(DROP_MALFORMED, skb);
	if (!mac_eq(eth.h_source, id->mac))
		return drop(DROP_MAC, skb);

	__u16 ethertype = bpf_ntohs(eth.h_proto);
	if (ethertype == ETH_P_ARP) {
		struct arp_ipv4 arp;
		if (bpf_skb_load_bytes(skb, sizeof(eth), &arp, sizeof(arp)) < 0)
			return drop(DROP_MALFORMED, skb);
		if (arp.htype != bpf_htons(1) || arp.ptype != bpf_htons(ETH_P_IP) ||
		    arp.hlen != 6 || arp.plen != 4)
			return drop(DROP_ARP, skb);
		if (!mac_eq(arp.sha, id->mac))
			return drop(DROP_ARP, skb);
		__u32 sip;
		__builtin_memcpy(&sip, arp.sip, 4);
		if (sip != id->ip && sip != 0)
			return drop(DROP_ARP, skb);
		return TC_ACT_OK;
	}
	if (ethertype == ETH_P_IPV6)
		return drop(DROP_IPV6, skb);
	if (ethertype != ETH_P_IP)
		return drop(DROP_ETHERTYPE, skb);

	struct iphdr ip;
	int port, sport;
	if (parse_ipv4(skb, sizeof(eth), &ip, &port, &sport) < 0)
		return drop(DROP_MALFORMED, skb);
	if (ip.saddr != id->ip)
		return drop(DROP_IP, skb);

	// DNS only to the node's resolver: a domain rule must not be bypassed by
	// resolving elsewhere (over UDP, TCP or TLS). Queries to the resolver
	// pass whatever the policy (it is a protected address otherwise).
	if (id->resolver && (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) &&
	    (port == 53 || port == 853)) {
		if (ip.daddr == id->resolver && port == 53)
			return TC_ACT_OK;
		emit_drop(EV_RULE_DNS, ip.daddr, ip.protocol, port);
		return drop(DROP_DNS, skb);
	}

	struct flow_key fk = {
		.peer = ip.daddr,
		.peer_port = port < 0 ? 0 : (__u16)port,
		.local_port = sport < 0 ? 0 : (__u16)sport,
		.proto = ip.protocol,
	};
	int flowful = 1;
	if (ip.protocol == IPPROTO_ICMP) {
		__u16 ident;
		int type = icmp_echo(skb, sizeof(eth), &ip, &ident);
		fk.peer_port = ident;
		if (type == ICMP_ECHO_REPLY)
			fk.local_port = ICMP_BY_PEER; // answering a peer's ping
		else if (type == ICMP_ECHO_REQUEST)
			fk.local_port = ICMP_BY_GUEST;
		else
			flowful = 0;
	}
	__u64 now = bpf_ktime_get_ns();
	struct flow_val *fv = flowful ? bpf_map_lookup_elem(&flows, &fk) : 0;
	if (fv && now - fv->last_seen_ns < FLOW_IDLE_NS) {
		if (fv->origin == FLOW_PEER)
			return count_reply(skb);
		fv->last_seen_ns = now;
	}
	int verdict = decide(skb, ip.daddr, ip.protocol, port, now);
	// A guest's echo reply never starts a flow of its own.
	if (verdict == TC_ACT_OK && !fv && flowful && !(ip.protocol == IPPROTO_ICMP &&
							  fk.local_port == ICMP_BY_PEER)) {
		struct flow_val v = { .last_seen_ns = now, .origin = FLOW_GUEST };
		bpf_map_update_elem(&flows, &fk, &v, BPF_ANY);
	}
	return verdict;
}

SEC("classifier")
int kiln_ingress(struct __sk_buff *skb)
{
	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return TC_ACT_SHOT;
	__u16 ethertype = bpf_ntohs(eth.h_proto);
	if (ethertype == ETH_P_ARP)
		return TC_ACT_OK;
	if (ethertype != ETH_P_IP)
		return TC_ACT_SHOT; // IPv6 and the rest never reach the guest either
	struct iphdr ip;
	int port, sport;
	if (parse_ipv4(skb, sizeof(eth), &ip, &port, &sport) < 0)
		return TC_ACT_SHOT;
	struct flow_key fk = {
		.peer = ip.saddr,
		.peer_port = sport < 0 ? 0 : (__u16)sport,
		.local_port = port < 0 ? 0 : (__u16)port,
		.proto = ip.protocol,
	};
	if (ip.protocol == IPPROTO_ICMP) {
		__u16 ident;
		int type = icmp_echo(skb, sizeof(eth), &ip, &ident);
		fk.peer_port = ident;
		if (type == ICMP_ECHO_REQUEST)
			fk.local_port = ICMP_BY_PEER; // a peer's ping: may start a flow
		else if (type == ICMP_ECHO_REPLY)
			fk.local_port = ICMP_BY_GUEST; // refreshes the guest's flow only
		else
			return TC_ACT_OK; // errors and the rest start nothing
		if (type == ICMP_ECHO_REPLY) {
			struct flow_val *g = bpf_map_lookup_elem(&flows, &fk);
			if (g && g->origin == FLOW_GUEST)
				g->last_seen_ns = bpf_ktime_get_ns();
			return TC_ACT_OK;
		}
	}
	__u64 now = bpf_ktime_get_ns();
	struct flow_val *fv = bpf_map_lookup_elem(&flows, &fk);
	if (fv && now - fv->last_seen_ns < FLOW_IDLE_NS) {
		if (fv->origin == FLOW_PEER)
			fv->last_seen_ns = now;
		return TC_ACT_OK;
	}
	if (ip.protocol == IPPROTO_TCP) {
		// Only a SYN without ACK starts a TCP flow.
		__u8 flags;
		__u32 l4 = sizeof(eth) + ((__u32)ip.ihl & 0xf) * 4;
		if (bpf_skb_load_bytes(skb, l4 + 13, &flags, 1) < 0)
			return TC_ACT_SHOT;
		if ((flags & 0x12) != 0x02)
			return TC_ACT_OK;
	}
	struct flow_val v = { .last_seen_ns = now, .origin = FLOW_PEER };
	bpf_map_update_elem(&flows, &fk, &v, BPF_ANY);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
