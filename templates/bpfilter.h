/* SPDX-License-Identifier: GPL-2.0 */
/* bpfilter runtime shared by every generated stage program.
 *
 * The generated program defines BF_NSLOTS, BF_NLIMITS, BF_NIFPATTERNS, BF_NPREFIXES and
 * BF_NEXACT before including this file: capacities, rounded up so that a ruleset that
 * differs only in the contents of its maps compiles to the same program; and BF_IPV6 when
 * it filters IPv6 (without it IPv6 frames are the kernel's).
 *
 * Every map that depends on the ruleset's contents (counters, token buckets, folded runs)
 * holds two generations, and bf_gen says which one is live: `apply` of a ruleset that
 * compiles to the running program writes the other generation, then flips bf_gen, one
 * atomic map update, so no packet sees half of an update. Packets are parsed once into
 * struct bf_pkt; the chain functions only read it.
 */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define BF_ETH_P_IP 0x0800
#define BF_ETH_P_IPV6 0x86DD
#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58 /* a macro of the UAPI headers, not in vmlinux.h */
#endif
#define BF_IP_DF 0x4000
#define BF_LOOPBACK_IFINDEX 1 /* lo: its own network namespace's first device */
#define BF_IP_MF 0x2000
#define BF_TTL 64 /* net.ipv4.ip_default_ttl, what the kernel's replies carry */
#define BF_ICMP_QUOTE_MAX 548 /* 576 - IP header - ICMP header, as icmp_send() quotes */
#define BF_ICMP6_QUOTE_MAX 1232 /* 1280 - IPv6 header - ICMPv6 header (icmp6_send()) */
#ifndef BF_IPV6
#define BF_IPV6 0
#endif
/* An IPv6 packet, in a program that filters IPv6 (else never: the branches go). */
#define BF_FAMILY6(p) (BF_IPV6 && (p)->family == 6)
#define BF_CSUM_MAX_WORDS 1500 /* L4 checksums are verified up to 3000 bytes (the verifier
                                * allows 8192 jumps in one path) */

/* The same program runs at XDP or at TC (BF_TC), at ingress or at TC egress (BF_EGRESS):
 * the context, what it returns, and how a reply is sent differ. At TC ingress a reply
 * leaves through the device the packet came in on, as XDP_TX sends it. */
#ifdef BF_TC
#define bf_ctx __sk_buff
enum bf_out { BF_OUT_PASS = 0 /* TC_ACT_OK */, BF_OUT_DROP = 2 /* TC_ACT_SHOT */,
	       BF_OUT_REDIRECT = 7 /* TC_ACT_REDIRECT */ };
#define BF_TC_LINEAR (14 + 60 + 2 * BF_CSUM_MAX_WORDS) /* every byte a program reads */
#define bf_load_bytes(ctx, at, to, len) bpf_skb_load_bytes(ctx, at, to, len)
/* (a checksum the device finished, CHECKSUM_COMPLETE, follows the bytes) */
#define bf_store_bytes(ctx, at, from, len) \
	bpf_skb_store_bytes(ctx, at, from, len, BPF_F_RECOMPUTE_CSUM)
#else
#define bf_ctx xdp_md
enum bf_out { BF_OUT_PASS = XDP_PASS, BF_OUT_DROP = XDP_DROP };
#define bf_load_bytes(ctx, at, to, len) bpf_xdp_load_bytes(ctx, at, to, len)
#define bf_store_bytes(ctx, at, from, len) bpf_xdp_store_bytes(ctx, at, from, len)
#endif

enum bf_verdict { BF_CONTINUE = 0, BF_ACCEPT = 1, BF_DROP = 2, BF_REJECT = 3 };
/* The netfilter hook a packet is in (struct bf_pkt.hook). */
enum bf_hook { BF_HOOK_NONE = 0, BF_HOOK_INPUT = 1, BF_HOOK_FORWARD = 2, BF_HOOK_OUTPUT = 3,
	       BF_HOOK_PREROUTING = 4, BF_HOOK_POSTROUTING = 5 };
/* Where a packet has no interface of a direction (struct bf_pkt.noif): no output one
 * before the routing decision, no input one when this host made it. */
enum bf_noif { BF_NO_IN = 1, BF_NO_OUT = 2 };
/* bf_ifmatch's bits that name `-i` patterns, and `-o` patterns (set at FORWARD). */
#ifndef BF_IFBITS_IN
#define BF_IFBITS_IN (~0ULL)
#define BF_IFBITS_OUT 0ULL
#endif
/* Between the parts of a long chain: fall through to the next part, or apply the
 * built-in chain's policy (its RETURN). Never leave the chain function. */
enum bf_part_result { BF_NEXT = 4, BF_POLICY = 5 };
#define BF_REJECT_TCP_RESET 0xff

/* What IPv6's header chain held (struct bf_pkt.ip6_flags). */
enum bf_ip6_flags {
	BF_IP6_DEFRAGGED = 1, /* conntrack's defragmenter took out an 8-byte fragment header */
	BF_IP6_RT = 2,        /* a routing header: rt_type, rt_segs, rt_len are its */
	BF_IP6_RT_WHOLE = 4,  /* and the packet holds all of it */
	BF_IP6_RT_RES0 = 8,   /* and its second word (type 0's reserved) is zero */
};

struct bf_pkt {
	__u32 len;          /* IP total length: what iptables counts as bytes */
	__u32 nat_addr;     /* what NAT makes of the packet's address (nat.h) */
	__u64 ifbits;       /* bit k set: the interface pattern k matches (BF_IFBITS_IN/OUT) */
	/* Host byte order. An IPv6 address is four words, the most significant first; an
	 * IPv4 address is the first word, the others 0 (connection keys hold both). */
	union { __u32 saddr; __u32 src[4]; };
	union { __u32 daddr; __u32 dst[4]; };
	__u32 ifindex;
	__u32 oifindex;     /* where it goes out: FORWARD's route, egress's device (LOG's OUT=) */
	__u16 l4_len;       /* bytes after the IP header, within tot_len */
	__u8 rt_type, rt_segs; /* IPv6: the first routing header's type and Segments Left */
	__u32 tcp_seq, tcp_ack;
	__u16 sport, dport;
	__u16 icmp_id;      /* ICMP queries and their answers */
	__u16 tcp_win;
	__u8 tcp_wscale, tcp_optflags; /* a SYN's options (conntrack.h: bf_tcp_options) */
	__u16 frag_off;     /* in 8-byte units; 0 for whole packets and first fragments */
	__u16 l4_off;       /* from the start of the frame */
	__u8 proto, ttl, tos, tcp_flags, tcp_doff, icmp_type, icmp_code;
	__u8 reject_with;
	__u8 th_flags;      /* TCP flags of a segment of at least 14 bytes (nft reads them) */
	__u8 ct_state;      /* enum bf_ct_state (conntrack.h) */
	__u8 ct_create;     /* the TCP state of an entry to create if INPUT accepts */
	__u8 ct_dir;        /* 1: the packet goes the connection's reply way */
	__u8 hook;          /* enum bf_hook */
	__u8 ip_df;         /* the IP header's don't-fragment flag */
	__u8 more_frags;    /* a fragment other than the last (IPv4's MF, IPv6's M) */
	__u8 otherhost;     /* addressed to another host's MAC (PACKET_OTHERHOST) */
	__u8 noif;          /* enum bf_noif */
	__u8 family;        /* 4 or 6 */
	__u8 l4_unknown;    /* IPv6: the header chain could not be followed to its end */
	__u8 ip6_flags;     /* enum bf_ip6_flags */
	__u8 nat;           /* enum bf_nat_todo (nat.h) */
	__u8 ct_attached;   /* a REJECT's reply: the connection of the packet it answers */
	__u32 ct_orig[2][4]; /* the connection's original source and destination */
	__u16 ct_port[2];   /* and ports (ICMP: the identifier, the query type << 8) */
	__u8 ct_proto;
	__u8 ct_mark_set;   /* CONNMARK changed ct_mark: the entry takes it */
	__u16 ethertype;    /* the frame's, host order (netdev chains see every protocol) */
	__u8 gen;           /* the live generation of the maps (0 or 1) */
	__u8 rt_len;        /* IPv6: the first routing header's Hdr Ext Len */
	__u16 nat_port;     /* and of its port (nat.h) */
	__u32 mark;         /* the packet's (skb->mark at TC; XDP has none: from 0) */
	__u32 ct_mark;      /* its connection's */
	__u8 smac[6], dmac[6];
	/* 168 bytes, no hole: every program's stack holds one, and TC with IPv6 reaches the
	 * verifier's 512 bytes for its deepest calls. A field more must take one out. */
};

/* An address as struct bf_pkt holds it, for what a global function fills in. */
struct bf_addr {
	__u32 w[4];
};

struct bf_counter {
	__u64 packets;
	__u64 bytes;
};

/* A rule's state: a token bucket (limit), or a packet count (statistic's nth mode). */
struct bf_limit {
	struct bpf_spin_lock lock;
	__u64 credit; /* nanoseconds of rate earned, capped at burst * interval; the count */
	__u64 last;   /* 0 until the first packet fills the bucket (starts the count) */
};

/* What LOG tells `bpfilter log` (bpfilter/runtime/logs.py reads this layout): the fields of the
 * kernel's LOG line that the packet record holds. */
struct bf_log_event {
	__u64 timestamp_ns;
	__u32 slot;
	__u32 ifindex, oifindex;
	__u32 src[4], dst[4];
	__u32 mark;
	__u32 l4_len;
	__u16 sport, dport;
	__u16 len;
	__u16 tcp_win;
	__u16 icmp_id;
	__u16 frag_off;
	__u16 ethertype;
	__u8 proto, ttl, tos, tcp_flags, icmp_type, icmp_code;
	__u8 family, hook, egress, ip_df;
	__u8 smac[6], dmac[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bf_gen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * BF_NSLOTS);
	__type(key, __u32);
	__type(value, struct bf_counter);
} bf_counters SEC(".maps");

/* ifindex -> bitmask of interface patterns it matches, kept by hostview.py from the
 * interface names the kernel has (links made or renamed after the load included), so
 * `-i eth+` follows the names, not compile-time indexes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} bf_ifmatch SEC(".maps");

/* ifindex -> the interface's MAC address (6 bytes, 2 of padding), kept by hostview.py: at
 * XDP the program tells a frame for another host (a promiscuous NIC, a bridge port) from
 * one for this one, which the kernel's eth_type_trans() does before the IP layer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} bf_ifmac SEC(".maps");

static __always_inline __u64 bf_ifbits(__u32 ifindex)
{
	__u64 *bits = bpf_map_lookup_elem(&bf_ifmatch, &ifindex);

	return bits ? *bits : 0;
}

/* Addresses in the order of their words (IPv4's have one); negative, 0, positive. */
static __always_inline int bf_addr_cmp(const __u32 *a, const __u32 *b, int words)
{
	int i;

	for (i = 0; i < words; i++)
		if (a[i] != b[i])
			return a[i] < b[i] ? -1 : 1;
	return 0;
}

/* `a` within [low, high] (-m iprange on IPv6 addresses). */
static __always_inline int bf_addr_in(const __u32 *a, const __u32 *low, const __u32 *high)
{
	return bf_addr_cmp(a, low, 4) >= 0 && bf_addr_cmp(a, high, 4) <= 0;
}

static __always_inline void bf_addr_copy(__u32 *to, const __u32 *from, int words)
{
	/* Word by word: clang makes a loop of variable length a memcpy(), which BPF has not. */
	to[0] = from[0];
	if (words == 4) {
		to[1] = from[1];
		to[2] = from[2];
		to[3] = from[3];
	}
}

/* The words of the packet's family's addresses. */
#define BF_ADDR_WORDS(p) (BF_FAMILY6(p) ? 4 : 1)

/* The ICMP protocol of the packet's family. */
#define BF_ICMP_PROTO(p) (BF_FAMILY6(p) ? IPPROTO_ICMPV6 : IPPROTO_ICMP)

/* An IPv6 address between network order (as headers and map keys hold it) and the host
 * order words of struct bf_pkt. */
static __always_inline void bf_ip6_host(__u32 *to, const __be32 *from)
{
	int i;

	for (i = 0; i < 4; i++)
		to[i] = bpf_ntohl(from[i]);
}

static __always_inline void bf_ip6_net(__be32 *to, const __u32 *from)
{
	int i;

	for (i = 0; i < 4; i++)
		to[i] = bpf_htonl(from[i]);
}

/* The LPM tries below: `entries` keys (network order, after a prefix length), each to a
 * value. */
#define BF_LPM_TRIE(name, entries, key_type, value_type)	\
	struct {						\
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);		\
		__uint(max_entries, entries);			\
		__uint(map_flags, BPF_F_NO_PREALLOC);		\
		__type(key, key_type);				\
		__type(value, value_type);			\
	} name SEC(".maps")

/* Folded rule runs (passes/fold.py): (run, address prefix) -> the counter slot of the one
 * rule of the run whose prefix holds the address. */
struct bf_prefix_key {
	__u32 prefixlen; /* 16 bits of run number + the prefix length */
	__be16 run;      /* generation << 15 | run */
	__be32 addr;
} __attribute__((packed));

BF_LPM_TRIE(bf_prefixes, 2 * BF_NPREFIXES, struct bf_prefix_key, __u32);

/* The same for runs of IPv6 prefixes (always a trie: their keys would not fit a hash of
 * one length better). */
#ifndef BF_NPREFIXES6
#define BF_NPREFIXES6 64
#endif

struct bf_prefix6_key {
	__u32 prefixlen; /* 16 bits of run number + the prefix length */
	__be16 run;      /* generation << 15 | run */
	__be32 addr[4];
} __attribute__((packed));

BF_LPM_TRIE(bf_prefixes6, 2 * BF_NPREFIXES6, struct bf_prefix6_key, __u32);

/* The destinations the kernel delivers locally (its `local` table: local and broadcast
 * routes), kept equal to the kernel's by bpfilter/runtime/hostview.py while the program
 * runs: INPUT sees only packets for these. A Kubernetes node with IPVS has a local route
 * per service address: room for many (an LPM trie allocates per entry). */
#define BF_LOCAL_MAX 65536

struct bf_local_key {
	__u32 prefixlen;
	__be32 addr;
};

BF_LPM_TRIE(bf_local, BF_LOCAL_MAX, struct bf_local_key, __u8);

/* Moves on every change hostview.py writes into bf_local, bf_local6 or bf_ifmatch. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bf_host SEC(".maps");

/* The kernel's settings the programs follow, kept by hostview.py (followed within the
 * watcher's resync). */
struct bf_sysctl {
	__u32 ct_checksum;     /* net.netfilter.nf_conntrack_checksum */
	__u32 icmp_ratelimit;  /* net.ipv4.icmp_ratelimit, ms */
	__u32 icmp_ratemask;   /* net.ipv4.icmp_ratemask */
	__u32 icmp6_ratelimit; /* net.ipv6.icmp.ratelimit, ms */
	__u32 icmp6_unreach;   /* net.ipv6.icmp.ratemask holds destination unreachable (1) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bf_sysctl);
} bf_sysctl SEC(".maps");

static __always_inline struct bf_sysctl *bf_settings(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&bf_sysctl, &zero);
}

/* This CPU's last answers about the host: whether the last destination and the last
 * source were local, and the last input interface's MAC. A trie or hash lookup costs
 * about as much as the rest of a short ruleset, and most packets come from and go to
 * where the previous one did; the answers hold while bf_host's epoch stays the one they
 * were given in (hostview.py moves it on every change it writes). */
struct bf_memo {
	__u32 epoch;
	__u32 daddr;
	__u32 saddr;
	__u32 ifindex;
	__u8 dlocal;  /* 0: empty, 1: not local, 2: local */
	__u8 slocal;
	__u8 has_mac; /* 0: empty, 1: no MAC known, 2: mac */
	__u8 pad;
	__u64 mac;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bf_memo);
} bf_memo SEC(".maps");

/* This CPU's memo, emptied when the host moved since it was written (NULL only when the
 * maps are missing, which the verifier cannot know they are not). */
static __always_inline struct bf_memo *bf_host_memo(void)
{
	__u32 zero = 0, *epoch = bpf_map_lookup_elem(&bf_host, &zero);
	struct bf_memo *memo = bpf_map_lookup_elem(&bf_memo, &zero);

	if (!memo || !epoch)
		return 0;
	if (memo->epoch != *epoch) {
		memo->dlocal = memo->slocal = memo->has_mac = 0;
		memo->epoch = *epoch;
	}
	return memo;
}

/* The local table has a local or broadcast route for `addr` (host order). */
static __always_inline int bf_local_route(__u32 addr)
{
	struct bf_local_key key = { .prefixlen = 32, .addr = bpf_htonl(addr) };

	return bpf_map_lookup_elem(&bf_local, &key) != 0;
}

/* IPv6's local table (local and anycast routes), as bf_local holds IPv4's. The value says
 * whether the route is an address of this host (a /128): an ICMPv6 error comes from it. */
struct bf_local6_key {
	__u32 prefixlen;
	__be32 addr[4];
};

enum bf_local6 { BF_LOCAL6_ROUTE = 1, BF_LOCAL6_ADDRESS = 2 };

BF_LPM_TRIE(bf_local6, BF_LOCAL_MAX, struct bf_local6_key, __u8);

/* What bf_local6 says of an IPv6 address (host order words): 0 when it is not local. */
static __always_inline __u8 bf_local6_route(const __u32 *addr)
{
	struct bf_local6_key key = { .prefixlen = 128 };
	__u8 *kind;

	bf_ip6_net(key.addr, addr);
	kind = bpf_map_lookup_elem(&bf_local6, &key);
	return kind ? *kind : 0;
}

/* bf_local_route(addr), through the memo's slot (*seen, *answer). */
static __always_inline int bf_local_memoized(__u32 addr, __u32 *seen, __u8 *answer)
{
	if (*answer && *seen == addr)
		return *answer == 2;
	*seen = addr;
	*answer = bf_local_route(addr) ? 2 : 1;
	return *answer == 2;
}

static __always_inline int bf_local_destination(const struct bf_pkt *p)
{
	struct bf_memo *memo;

	/* Multicast (and IPv4's limited broadcast) is delivered locally when anyone
	 * listens. */
	if (BF_FAMILY6(p))
		return (p->dst[0] >> 24) == 0xff || bf_local6_route(p->dst);
	if ((p->daddr >> 28) == 0xe || p->daddr == 0xffffffff)
		return 1;
	memo = bf_host_memo();
	return memo ? bf_local_memoized(p->daddr, &memo->daddr, &memo->dlocal)
		    : bf_local_route(p->daddr);
}

/* Folded runs whose prefixes all have one length: (run, masked address) -> slot, one hash
 * lookup instead of a walk down the trie. */
struct bf_exact_key {
	__u32 run;  /* generation << 16 | run */
	__u32 addr; /* host order, masked to the run's prefix length */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * BF_NEXACT);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bf_exact_key);
	__type(value, __u32);
} bf_exact SEC(".maps");

static __always_inline __u32 *bf_exact_lookup(const struct bf_pkt *p, __u32 run, __u32 addr)
{
	struct bf_exact_key key = { .run = run | (p->gen << 16), .addr = addr };

	return bpf_map_lookup_elem(&bf_exact, &key);
}

static __always_inline __u32 *bf_prefix_lookup(const struct bf_pkt *p, __u16 run, __u32 addr)
{
	struct bf_prefix_key key = {
		.prefixlen = 16 + 32, .run = bpf_htons(run | (p->gen << 15)),
		.addr = bpf_htonl(addr),
	};

	return bpf_map_lookup_elem(&bf_prefixes, &key);
}

static __always_inline __u32 *bf_prefix6_lookup(const struct bf_pkt *p, __u16 run,
						const __u32 *addr)
{
	struct bf_prefix6_key key = {
		.prefixlen = 16 + 128, .run = bpf_htons(run | (p->gen << 15)),
	};
	int i;

	/* Field by field, not through bf_ip6_net(): the packed key's address is not aligned,
	 * which only the member's own type tells clang. */
	for (i = 0; i < 4; i++)
		key.addr[i] = bpf_htonl(addr[i]);
	return bpf_map_lookup_elem(&bf_prefixes6, &key);
}

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * BF_NLIMITS);
	__type(key, __u32);
	__type(value, struct bf_limit);
} bf_limits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} bf_log SEC(".maps");

static __always_inline void bf_count(__u32 slot, const struct bf_pkt *p)
{
	__u32 index = slot + p->gen * BF_NSLOTS;
	struct bf_counter *c = bpf_map_lookup_elem(&bf_counters, &index);

	if (c) {
		c->packets++;
		c->bytes += p->len;
	}
}

/* xt_limit's token bucket, in nanoseconds instead of jiffies. */
static __always_inline int bf_limit(const struct bf_pkt *p, __u32 index, __u64 cost, __u64 cap)
{
	__u32 key = index + p->gen * BF_NLIMITS;
	struct bf_limit *l = bpf_map_lookup_elem(&bf_limits, &key);
	__u64 now = bpf_ktime_get_ns();
	int hit = 0;

	if (!l)
		return 0;
	bpf_spin_lock(&l->lock);
	if (l->last == 0) {
		l->credit = cap;
	} else {
		l->credit += now - l->last;
		if (l->credit > cap)
			l->credit = cap;
	}
	l->last = now;
	if (l->credit >= cost) {
		l->credit -= cost;
		hit = 1;
	}
	bpf_spin_unlock(&l->lock);
	return hit;
}

/* xt_statistic's nth mode, with a slot of bf_limits as the rule's count (`credit`; `last`
 * says it started): the count goes up to `every` (n - 1) and wraps to 0, and the rule
 * holds at 0. It starts at every - packet, so packet number `packet` is the first. */
static __always_inline int bf_nth(const struct bf_pkt *p, __u32 index, __u32 every,
				  __u32 start)
{
	__u32 key = index + p->gen * BF_NLIMITS;
	struct bf_limit *l = bpf_map_lookup_elem(&bf_limits, &key);
	int hit;

	if (!l)
		return 0;
	bpf_spin_lock(&l->lock);
	if (l->last == 0) {
		l->credit = start;
		l->last = 1;
	}
	l->credit = l->credit == every ? 0 : l->credit + 1;
	hit = l->credit == 0;
	bpf_spin_unlock(&l->lock);
	return hit;
}

static __always_inline void bf_log_packet(__u32 slot, const struct bf_pkt *p)
{
	struct bf_log_event *e = bpf_ringbuf_reserve(&bf_log, sizeof(*e), 0);

	if (!e)
		return;
	e->timestamp_ns = bpf_ktime_get_ns();
	e->slot = slot;
	e->ifindex = p->ifindex;
	e->oifindex = p->oifindex;
	bf_addr_copy(e->src, p->src, 4);
	bf_addr_copy(e->dst, p->dst, 4);
	e->mark = p->mark;
	e->l4_len = p->l4_len;
	e->sport = p->sport;
	e->dport = p->dport;
	e->len = p->len;
	e->tcp_win = p->tcp_win;
	e->icmp_id = p->icmp_id;
	e->frag_off = p->frag_off;
	e->ethertype = p->ethertype;
	e->proto = p->proto;
	e->ttl = p->ttl;
	e->tos = p->tos;
	e->tcp_flags = p->tcp_flags;
	e->icmp_type = p->icmp_type;
	e->icmp_code = p->icmp_code;
	e->family = p->family;
	e->hook = p->hook;
#ifdef BF_EGRESS
	e->egress = 1;
#else
	e->egress = 0;
#endif
	e->ip_df = p->ip_df;
	__builtin_memcpy(e->smac, p->smac, 6);
	__builtin_memcpy(e->dmac, p->dmac, 6);
	bpf_ringbuf_submit(e, 0);
}

static __always_inline __u16 bf_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* One's-complement sum of `len` bytes at `start`, at most `max_words` 16-bit words. */
static __always_inline __u64 bf_sum(void *start, __u32 len, void *end, __u32 max_words)
{
	__u16 *w = start;
	__u64 sum = 0;
	__u32 i;

	for (i = 0; i < max_words; i++) {
		if (i * 2 + 1 >= len)
			break;
		if ((void *)(w + 1) > end)
			break;
		sum += *w;
		w++;
	}
	if (len & 1) {
		__u8 *last = (__u8 *)w;

		if ((void *)(last + 1) <= end && i * 2 + 1 == len)
			sum += *last; /* little-endian: the odd byte is the low half of a word */
	}
	return sum;
}

/* The 16-bit words of an address of `words` 32-bit words (host order), summed. */
static __always_inline __u64 bf_addr_sum(const __u32 *a, int words)
{
	__u64 sum = 0;
	int i;

	for (i = 0; i < words; i++)
		sum += (bpf_htonl(a[i]) & 0xffff) + (bpf_htonl(a[i]) >> 16);
	return sum;
}

/* The pseudo-header (TCP and UDP; every IPv6 protocol), the addresses as the packet has
 * them (a reply swaps them, which leaves the sum unchanged). */
static __always_inline __u64 bf_pseudo_sum(const struct bf_pkt *p, __u8 proto, __u16 len)
{
	int words = BF_FAMILY6(p) ? 4 : 1;

	return bf_addr_sum(p->src, words) + bf_addr_sum(p->dst, words) + bpf_htons(proto) +
	       bpf_htons(len);
}

/* The IPv4 header checksum as ip_rcv() verifies it. Almost every header has no options:
 * five 32-bit loads then, instead of the general loop's ten bounds-checked steps. */
static __always_inline __u16 bf_header_sum(struct iphdr *ip, __u32 hlen, void *end)
{
	if (hlen == sizeof(*ip)) {
		__u32 *w = (__u32 *)ip;

		return bf_fold((__u64)w[0] + w[1] + w[2] + w[3] + w[4]);
	}
	return bf_fold(bf_sum(ip, hlen, end, 30));
}

/* Bytes from the IP header to the end of the packet. An skb (GRO, TSO) may hold more
 * than its linear data, which is all a pointer reaches. */
static __always_inline __u32 bf_l3_len(struct bf_ctx *ctx, void *ip, void *end)
{
#ifdef BF_TC
	return ctx->len - sizeof(struct ethhdr);
#else
	return end - ip;
#endif
}

/* The transport header's fields: `l4` is where it starts, p->l4_len how much of it the
 * IP packet holds. Ports sit in the first 4 bytes for every protocol multiport accepts;
 * nftables reads each field that is there, so each is read on its own. */
static __always_inline void bf_parse_l4(struct bf_pkt *p, __u8 *l4, void *end)
{
	__u8 icmp = BF_FAMILY6(p) ? IPPROTO_ICMPV6 : IPPROTO_ICMP;

	if (p->l4_len >= 2 && (void *)(l4 + 2) <= end)
		p->sport = ((__u16)l4[0] << 8) | l4[1];
	if (p->l4_len >= 4 && (void *)(l4 + 4) <= end)
		p->dport = ((__u16)l4[2] << 8) | l4[3];
	if (p->proto == IPPROTO_TCP && p->l4_len >= 14 && (void *)(l4 + 14) <= end)
		p->th_flags = l4[13];
	if (p->proto == IPPROTO_TCP && p->l4_len >= 20 && (void *)(l4 + 20) <= end) {
		struct tcphdr *th = (void *)l4;

		p->tcp_seq = bpf_ntohl(th->seq);
		p->tcp_ack = bpf_ntohl(th->ack_seq);
		p->tcp_doff = l4[12] >> 4;
		p->tcp_flags = l4[13];
		p->tcp_win = bpf_ntohs(th->window);
	} else if (p->proto == icmp && p->l4_len >= 1 && (void *)(l4 + 1) <= end) {
		/* nftables reads the type of a 1-byte message. */
		p->icmp_type = l4[0];
		if (p->l4_len >= 2 && (void *)(l4 + 2) <= end)
			p->icmp_code = l4[1];
		if (p->l4_len >= 8 && (void *)(l4 + 8) <= end)
			p->icmp_id = ((__u16)l4[4] << 8) | l4[5];
	}
}

/* IPv4 as ip_rcv() checks it; -1 for what the kernel drops before netfilter. */
static __always_inline int bf_parse4(struct bf_ctx *ctx, struct bf_pkt *p, struct iphdr *ip,
				     void *end)
{
	__u32 hlen, tot;

	if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
		return -1;
	hlen = ip->ihl * 4;
	if ((void *)ip + hlen > end)
		return -1;
	tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || tot > bf_l3_len(ctx, ip, end))
		return -1;
	if (bf_header_sum(ip, hlen, end) != 0xffff)
		return -1;
	p->family = 4;
	p->len = tot;
	p->saddr = bpf_ntohl(ip->saddr);
	p->daddr = bpf_ntohl(ip->daddr);
	p->proto = ip->protocol;
	p->ttl = ip->ttl;
	p->tos = ip->tos;
	p->frag_off = bpf_ntohs(ip->frag_off) & 0x1fff;
	p->ip_df = !!(bpf_ntohs(ip->frag_off) & BF_IP_DF);
	p->more_frags = !!(bpf_ntohs(ip->frag_off) & BF_IP_MF);
	p->l4_len = tot - hlen;
	p->l4_off = sizeof(struct ethhdr) + hlen;
	if (p->frag_off == 0)
		bf_parse_l4(p, (__u8 *)ip + hlen, end);
	return 0;
}

#if BF_IPV6
/* ::1 */
static __always_inline int bf_ip6_loopback(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 1;
}

/* The extension headers ipv6_find_hdr() walks through to the transport header: hop-by-hop,
 * routing, fragment, AH, destination options. */
static __always_inline int bf_ip6_ext(__u8 next)
{
	return next == 0 || next == 43 || next == 44 || next == 51 || next == 60;
}

/* The first routing header (ip6t_rt reads it where ipv6_find_hdr() finds it), at `off`
 * in the packet, whose first 8 bytes the program can read. */
static __always_inline void bf_ip6_routing(struct bf_pkt *p, const __u8 *h, __u32 off)
{
	p->ip6_flags |= BF_IP6_RT;
	p->rt_len = h[1];
	p->rt_type = h[2];
	p->rt_segs = h[3];
	if (off + (h[1] + 1) * 8 <= p->len)
		p->ip6_flags |= BF_IP6_RT_WHOLE;
	if (!h[4] && !h[5] && !h[6] && !h[7])
		p->ip6_flags |= BF_IP6_RT_RES0;
}

/* Headers followed at most; a longer chain is one bpfilter cannot follow (l4_unknown). */
#define BF_IP6_EXT_MAX 8

/* IPv6 as ip6_rcv_core() checks it, then the header chain as ipv6_find_hdr() follows it
 * for ip6tables and nftables: p->proto is the transport protocol, p->frag_off the
 * fragment's offset (a later fragment ends the chain). -1 for what the kernel drops
 * before netfilter. */
static __always_inline int bf_parse6(struct bf_ctx *ctx, struct bf_pkt *p,
				     struct ipv6hdr *ip6, void *end)
{
	__u32 off = sizeof(*ip6), cut = 0, i;
	__u8 next;

	if ((void *)(ip6 + 1) > end || ip6->version != 6)
		return -1;
	p->len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	/* A zero payload length behind a hop-by-hop header is a jumbogram's (left to the
	 * kernel); elsewhere it is an empty payload. */
	if ((ip6->payload_len == 0 && ip6->nexthdr == 0) || p->len > bf_l3_len(ctx, ip6, end))
		return -1;
	bf_ip6_host(p->src, ip6->saddr.in6_u.u6_addr32);
	bf_ip6_host(p->dst, ip6->daddr.in6_u.u6_addr32);
	/* Multicast sources, loopback addresses from a device, interface-local (or scope 0)
	 * multicast destinations. */
	if ((p->src[0] >> 24) == 0xff || bf_ip6_loopback(p->src) || bf_ip6_loopback(p->dst) ||
	    ((p->dst[0] >> 24) == 0xff && ((p->dst[0] >> 16) & 0xf) <= 1))
		return -1;
	p->family = 6;
	p->ip_df = 1; /* routers never fragment IPv6 */
	p->ttl = ip6->hop_limit;
	p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	next = ip6->nexthdr;
	for (i = 0; i < BF_IP6_EXT_MAX && bf_ip6_ext(next); i++) {
		__u8 *h = (__u8 *)ip6 + (off & 0x7ff);

		if (off >= 0x800 || off + 8 > p->len || (void *)(h + 8) > end)
			break;
		if (next == 44) {
			__u16 field = ((__u16)h[2] << 8) | h[3];

			next = h[0];
			off += 8;
			p->frag_off = field >> 3;
			p->more_frags = field & 1;
			if (p->frag_off)
				break;
			/* Connection tracking's defragmenter takes a whole datagram in one
			 * fragment ("atomic") out of its fragment header before any table. */
			if (BF_CONNTRACK && !(field & 1))
				cut = 8;
			continue;
		}
		if (next == 43 && !(p->ip6_flags & BF_IP6_RT))
			bf_ip6_routing(p, h, off);
		off += next == 51 ? (h[1] + 2) * 4 : (h[1] + 1) * 8;
		next = h[0];
	}
	/* ipv6_find_hdr() fails: a truncated or too long chain; a later fragment of a
	 * packet whose first fragment has more extension headers. */
	p->l4_unknown = bf_ip6_ext(next) && next != 59 ? 1 : 0;
	p->proto = next;
	p->l4_len = off < p->len ? p->len - off : 0;
	p->len -= cut;
	if (cut)
		p->ip6_flags |= BF_IP6_DEFRAGGED;
	p->l4_off = sizeof(struct ethhdr) + (off & 0x7ff);
	if (!p->frag_off && !p->l4_unknown && off < 0x800)
		bf_parse_l4(p, (__u8 *)ip6 + (off & 0x7ff), end);
	return 0;
}
#endif

/* Parse Ethernet and IPv4 (or IPv6 with BF_IPV6): anything the kernel would drop before
 * netfilter, or that is of another protocol, is left to the kernel: returns -1. */
static __always_inline int bf_parse(struct bf_ctx *ctx, struct bf_pkt *p)
{
	void *data, *end;
	struct ethhdr *eth;

#ifdef BF_TC
	/* An skb may hold part of the packet outside its linear data, where no pointer
	 * reaches: pull what the program reads (nothing to do when it is there already). */
	bpf_skb_pull_data(ctx, ctx->len < BF_TC_LINEAR ? ctx->len : BF_TC_LINEAR);
#endif
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	p->ethertype = bpf_ntohs(eth->h_proto);
	__builtin_memcpy(p->smac, eth->h_source, 6);
	__builtin_memcpy(p->dmac, eth->h_dest, 6);
	p->ifindex = ctx->ingress_ifindex;
#ifdef BF_TC
	p->otherhost = ctx->pkt_type == 3; /* PACKET_OTHERHOST */
#else
	{
		struct bf_memo *memo = bf_host_memo();
		__u64 dest = 0, mac = 0;
		int known;

		if (memo && memo->has_mac && memo->ifindex == p->ifindex) {
			known = memo->has_mac == 2;
			mac = memo->mac;
		} else {
			__u64 *found = bpf_map_lookup_elem(&bf_ifmac, &p->ifindex);

			known = found != 0;
			mac = found ? *found : 0;
			if (memo) {
				memo->ifindex = p->ifindex;
				memo->has_mac = known ? 2 : 1;
				memo->mac = mac;
			}
		}
		__builtin_memcpy(&dest, eth->h_dest, 6);
		p->otherhost = known && mac != dest && !(eth->h_dest[0] & 1) &&
			       p->ifindex != BF_LOOPBACK_IFINDEX;
	}
#endif
	{
		__u32 zero = 0;
		__u32 *gen = bpf_map_lookup_elem(&bf_gen, &zero);

		p->gen = gen ? (*gen & 1) : 0;
	}
	if (BF_NIFPATTERNS)
		p->ifbits = bf_ifbits(p->ifindex) & BF_IFBITS_IN;
#if BF_IPV6
	if (p->ethertype == BF_ETH_P_IPV6)
		return bf_parse6(ctx, p, (void *)(eth + 1), end) ? -1 : 0;
#endif
	if (p->ethertype == BF_ETH_P_IP)
		return bf_parse4(ctx, p, (void *)(eth + 1), end) ? -1 : 0;
	/* Another protocol (or IPv6 in a program without IPv6 rules): only netdev chains
	 * see it, with what skb->len is then (the frame past its Ethernet header). */
#ifdef BF_TC
	p->len = ctx->len - sizeof(*eth);
#else
	p->len = end - data - sizeof(*eth);
#endif
	return 1;
}

#ifdef BF_TC
/* At TC the kernel routes the skb with the mark the rules gave it (`ip rule fwmark`). */
#define BF_ROUTE_MARK(p) ((p)->mark)
#define BF_ROUTE_FLAGS (BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_MARK)
#else
/* After XDP the kernel routes the packet with no mark, whatever bpfilter's rules set. */
#define BF_ROUTE_MARK(p) 0
#define BF_ROUTE_FLAGS BPF_FIB_LOOKUP_SKIP_NEIGH
#endif

/* The lookup's addresses: the packet's, or (`back`) none to its source (the way back,
 * with the source left for the lookup to choose). */
static __always_inline void bf_fib_addresses(struct bpf_fib_lookup *fib, const struct bf_pkt *p,
					     int back)
{
	if (BF_FAMILY6(p)) {
		fib->family = 10; /* AF_INET6 */
		if (back)
			__builtin_memset(fib->ipv6_src, 0, sizeof(fib->ipv6_src));
		else
			bf_ip6_net(fib->ipv6_src, p->src);
		bf_ip6_net(fib->ipv6_dst, back ? p->src : p->dst);
		return;
	}
	fib->family = 2; /* AF_INET */
	fib->ipv4_src = back ? 0 : bpf_htonl(p->saddr);
	fib->ipv4_dst = bpf_htonl(back ? p->saddr : p->daddr);
}

/* What ip_route_input_slow() drops as a martian after PREROUTING, whatever the
 * destination, in its order: a multicast or broadcast source; then (what is not
 * 0.0.0.0 to a broadcast, DHCP's, taken in) a source or destination 0.0.0.0 (the rest
 * of 0/8 is unicast since Linux 5.3) or in 127/8 (route_localnet off), and a source
 * fib_validate_source() refuses: an address of this host. Not for IPv6 (bf_parse6() and
 * bf_unroutable() hold its rules). */
static __always_inline int bf_martian(const struct bf_pkt *p)
{
	__u32 s = p->saddr, d = p->daddr;
	struct bf_memo *memo;

	if (BF_FAMILY6(p) || p->ifindex == BF_LOOPBACK_IFINDEX)
		return 0;
	if ((s >> 28) == 0xe || s == 0xffffffff)
		return 1;
	if (d == 0xffffffff || (s == 0 && d == 0))
		return 0;
	if (s == 0 || d == 0 || (s >> 24) == 127 || (d >> 24) == 127)
		return 1;
	memo = bf_host_memo();
	return memo ? bf_local_memoized(s, &memo->saddr, &memo->slocal) : bf_local_route(s);
}

/* IPv6 packets the kernel never forwards (IPv4's martians never reach the routing
 * decision: bf_martian()): what ip6_forward() refuses, link-local sources (multicast and
 * loopback ones bf_parse6() left to the kernel already), and link-local destinations,
 * which stay on their link. */
static __always_inline int bf_unroutable(const struct bf_pkt *p)
{
	return BF_FAMILY6(p) && ((p->src[0] >> 22) == 0x3fa || (p->dst[0] >> 22) == 0x3fa);
}

/* Where the kernel routes a packet that is not for this host, as ip_route_input() and
 * ip_forward() (ip6_forward()) decide before the FORWARD hook: the output interface, or 0
 * when the packet never reaches FORWARD (a martian source, forwarding off on the input
 * interface, no unicast route, TTL or hop limit spent, too big with DF set or for IPv6:
 * the kernel drops it or answers with an ICMP error first).
 * Global, so its lookup's 64 bytes are not on the stack the chains share. */
__noinline __u32 bf_route(struct bf_ctx *ctx, const struct bf_pkt *p)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	if (!p || p->ttl <= 1 || bf_unroutable(p))
		return 0;
	bf_fib_addresses(&fib, p, 0);
	fib.tos = p->tos;
	fib.l4_protocol = p->proto;
	fib.sport = bpf_htons(p->sport);
	fib.dport = bpf_htons(p->dport);
	fib.tot_len = p->len;
	fib.ifindex = p->ifindex;
	fib.mark = BF_ROUTE_MARK(p);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BF_ROUTE_FLAGS);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && !p->ip_df) {
		/* Fragmented after the hook: look again with a length that fits, for the
		 * interface (a failed MTU check does not report it). */
		fib.tot_len = 20;
		bf_fib_addresses(&fib, p, 0);
		fib.ifindex = p->ifindex;
		fib.mark = BF_ROUTE_MARK(p);
		rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BF_ROUTE_FLAGS);
	}
	return rc == BPF_FIB_LKUP_RET_SUCCESS ? fib.ifindex : 0;
}

/* The address an ICMP error about this packet comes from, into `from` (host order words):
 * the packet's destination at INPUT (for IPv6 only an address of this host: icmp6_send()
 * picks a source as for any packet otherwise, which only a host that forwards can look
 * up); at FORWARD, as icmp_send() picks for a
 * packet it did not deliver, the source the route back to the sender prefers. At OUTPUT
 * the destination too: the kernel's own error comes from the host's address, but it
 * reaches lo already routed; one that comes in from an own address is a martian (OUTPUT
 * still sees the kernel's source: stage.c.j2). 0 if there is none. Global, as
 * bf_route(). */
__noinline int bf_error_source(struct bf_ctx *ctx, const struct bf_pkt *p,
			       struct bf_addr *from)
{
	struct bpf_fib_lookup fib = {};

	if (!p || !from)
		return 0;
	if (p->hook != BF_HOOK_FORWARD &&
	    (!BF_FAMILY6(p) || bf_local6_route(p->dst) == BF_LOCAL6_ADDRESS))
		goto destination;
	bf_fib_addresses(&fib, p, 1);
	fib.ifindex = p->ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT |
			   BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC)) {
		/* IPv6's lookup needs forwarding on (BPF_FIB_LKUP_RET_FWD_DISABLED): a host
		 * answers from the local destination itself, as IPv4 does. */
		if (!BF_FAMILY6(p) || p->hook == BF_HOOK_FORWARD)
			return 0;
		goto destination;
	}
	if (!BF_FAMILY6(p)) {
		from->w[0] = bpf_ntohl(fib.ipv4_src);
		return from->w[0] != 0;
	}
	bf_ip6_host(from->w, fib.ipv6_src);
	return 1;
destination:
	bf_addr_copy(from->w, p->dst, 4);
	return 1;
}

/* The barrier keeps clang from folding this into 32-bit pointer arithmetic, which the
 * verifier refuses. */
static __always_inline int bf_frame_len(struct bf_ctx *ctx)
{
	long len = (void *)(long)ctx->data_end - (void *)(long)ctx->data;

	asm volatile("" : "+r"(len));
	return len;
}

/* Room for `head` more bytes between the Ethernet header and the IP header (at XDP: in
 * front of the frame, whose Ethernet header is rewritten anyway). */
static __always_inline int bf_grow_head(struct bf_ctx *ctx, __u32 head)
{
#ifdef BF_TC
	return bpf_skb_adjust_room(ctx, head, BPF_ADJ_ROOM_MAC, 0);
#else
	return bpf_xdp_adjust_head(ctx, -(int)head);
#endif
}

/* At egress the packet came from this host: the reply goes back into it through lo, as
 * the kernel's REJECT at OUTPUT sends it (INPUT sees it with `-i lo`). */

static __always_inline int bf_transmit(struct bf_ctx *ctx)
{
#ifdef BF_EGRESS
	return bpf_redirect(BF_LOOPBACK_IFINDEX, BPF_F_INGRESS);
#elif defined(BF_TC)
	return bpf_redirect(ctx->ifindex, 0);
#else
	return XDP_TX;
#endif
}

static __always_inline void bf_swap_eth(struct ethhdr *eth, const struct bf_pkt *p)
{
#ifdef BF_EGRESS
	/* lo's address, which its frames carry both ways */
	__builtin_memset(eth->h_dest, 0, 6);
	__builtin_memset(eth->h_source, 0, 6);
#else
	__builtin_memcpy(eth->h_dest, p->smac, 6);
	__builtin_memcpy(eth->h_source, p->dmac, 6);
#endif
	eth->h_proto = bpf_htons(BF_FAMILY6(p) ? BF_ETH_P_IPV6 : BF_ETH_P_IP);
}

/* Resize the frame to `want` bytes for a reply; NULL unless its first `need` bytes are
 * there to write. */
static __always_inline struct ethhdr *bf_reply_frame(struct bf_ctx *ctx, __u32 want,
						     __u32 need)
{
	void *data;

#ifdef BF_TC
	if (bpf_skb_change_tail(ctx, want, 0) || bpf_skb_pull_data(ctx, need))
		return NULL;
#else
	if (bpf_xdp_adjust_tail(ctx, (int)want - bf_frame_len(ctx)))
		return NULL;
#endif
	data = (void *)(long)ctx->data;
	if (data + need > (void *)(long)ctx->data_end)
		return NULL;
	return data;
}

static __always_inline void bf_put_iphdr(struct iphdr *ip, const struct bf_pkt *p, __u32 saddr,
					 __u8 tos,
					 __u16 tot_len, __u16 frag_off, __u8 proto)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = tos;
	ip->tot_len = bpf_htons(tot_len);
	ip->id = 0;
	ip->frag_off = bpf_htons(frag_off);
	ip->ttl = BF_TTL;
	ip->protocol = proto;
	ip->check = 0;
	ip->saddr = bpf_htonl(saddr);
	ip->daddr = bpf_htonl(p->saddr);
	ip->check = ~bf_fold(bf_sum(ip, sizeof(*ip), (void *)(ip + 1), 10));
}

/* An IPv6 header from `from` back to the packet's source, as ip6_xmit() writes it for the
 * kernel's replies (traffic class and flow label 0). */
static __always_inline void bf_put_ip6hdr(struct ipv6hdr *ip6, const struct bf_pkt *p,
					  const __u32 *from, __u16 payload, __u8 proto)
{
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(payload);
	ip6->nexthdr = proto;
	ip6->hop_limit = BF_TTL;
	bf_ip6_net(ip6->saddr.in6_u.u6_addr32, from);
	bf_ip6_net(ip6->daddr.in6_u.u6_addr32, p->src);
}

/* :: */
static __always_inline int bf_ip6_unspecified(const __u32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) == 0;
}

/* The sequence number after a TCP segment (segment_seq_plus_len()): what a reset answering
 * it acknowledges, and what connection tracking expects next from its sender. */
static __always_inline __u32 bf_tcp_end(const struct bf_pkt *p)
{
	return p->tcp_seq + (p->l4_len - p->tcp_doff * 4) + !!(p->tcp_flags & 0x02) +
	       !!(p->tcp_flags & 0x01);
}

/* nf_send_reset() / nf_send_reset6(): a bare RST from the rejected packet's destination
 * (for IPv6 only between unicast addresses). */
static __always_inline int bf_reject_tcp(struct bf_ctx *ctx, const struct bf_pkt *p)
{
	int v6 = BF_FAMILY6(p);
	__u32 want = sizeof(struct ethhdr) + sizeof(struct tcphdr) +
		     (v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr));
	struct ethhdr *eth;
	struct tcphdr *th;

	if (p->frag_off || p->l4_len < sizeof(struct tcphdr) || (p->tcp_flags & 0x04))
		return BF_OUT_DROP;
	if (v6 && ((p->dst[0] >> 24) == 0xff || bf_ip6_unspecified(p->src)))
		return BF_OUT_DROP;
	eth = bf_reply_frame(ctx, want, want);
	if (!eth)
		return BF_OUT_DROP;
	bf_swap_eth(eth, p);
	if (v6) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		bf_put_ip6hdr(ip6, p, p->dst, sizeof(*th), IPPROTO_TCP);
		th = (void *)(ip6 + 1);
	} else {
		struct iphdr *ip = (void *)(eth + 1);

		bf_put_iphdr(ip, p, p->daddr, 0, sizeof(*ip) + sizeof(*th), BF_IP_DF,
			     IPPROTO_TCP);
		th = (void *)(ip + 1);
	}
	if ((void *)(th + 1) > (void *)(long)ctx->data_end)
		return BF_OUT_DROP;
	__builtin_memset(th, 0, sizeof(*th));
	th->source = bpf_htons(p->dport);
	th->dest = bpf_htons(p->sport);
	th->doff = 5;
	th->rst = 1;
	if (p->tcp_flags & 0x10) {
		th->seq = bpf_htonl(p->tcp_ack);
	} else {
		th->ack = 1;
		th->ack_seq = bpf_htonl(bf_tcp_end(p));
	}
	th->check = ~bf_fold(bf_sum(th, sizeof(*th), (void *)(th + 1), 10) +
			     bf_pseudo_sum(p, IPPROTO_TCP, sizeof(*th)));
	return bf_transmit(ctx);
}

/* icmp_send() never answers what icmp_pointers[] marks .error: the error types and the
 * unassigned or deprecated ones (1, 2, 6, 7, 9, 10), and anything above 18. */
static __always_inline int bf_icmp_is_error(__u8 type)
{
	return type > 18 || ((0x1efe >> type) & 1);
}

/* nf_send_unreach() sends nothing for a packet whose checksum is wrong, except for the
 * protocols nf_reject_verify_csum() exempts (and UDP without a checksum).
 *
 * A global (non-static) function: the verifier checks it once, on its own, instead of once
 * per path that reaches a REJECT, which would multiply the cost of its loop.
 * `shape` packs l4_off (bits 0-7), the protocol (8-15) and l4_len (16-31); `pseudo` is the
 * pseudo-header's sum for the protocols whose checksum covers it, else 0. */
__attribute__((noinline)) int bf_l4_checksum_ok(struct bf_ctx *ctx, __u32 shape, __u64 pseudo)
{
	void *end = (void *)(long)ctx->data_end;
	void *l4 = (void *)(long)ctx->data + (shape & 0xff);
	__u32 proto = (shape >> 8) & 0xff, len = shape >> 16;
	__u64 sum;

	switch (proto) {
	case IPPROTO_GRE: case IPPROTO_AH: case IPPROTO_ESP: case IPPROTO_SCTP:
	case IPPROTO_UDPLITE: case IPPROTO_DCCP:
		return 1;
	case IPPROTO_UDP:
		if (len >= 8) {
			__u16 *check = l4 + 6;

			if ((void *)(check + 1) > end)
				return 0;
			if (*check == 0)
				return 1;
		}
	}
	if (len > BF_CSUM_MAX_WORDS * 2)
		return 1; /* beyond what a bounded loop can sum: assume the NIC checked it */
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		/* A local sender's packet (a container's, through a veth) whose checksum its
		 * stack left to the NIC holds the pseudo-header's sum there; the kernel knows it
		 * as CHECKSUM_PARTIAL and takes it as good. */
		__u16 *check = l4 + (proto == IPPROTO_TCP ? 16 : 6);

		if ((void *)(check + 1) > end)
			return 0;
		if (*check == bf_fold(pseudo))
			return 1;
	}
	/* Both zeros of one's complement pass, as in the kernel (whose sum also covers the
	 * IP header, which turns +0 into -0): Linux answers an echo of id 0 and sequence 0
	 * with an all-zero ICMP message, checksum 0x0000 where 0xffff was due. */
	sum = bf_fold(bf_sum(l4, len, end, BF_CSUM_MAX_WORDS) + pseudo);
	return sum == 0xffff || sum == 0;
}

/* The ICMP checksum of a reply: `len` bytes from the ICMP header, which starts `l3` bytes
 * after the Ethernet header, plus `pseudo` (ICMPv6's pseudo-header). Global, like above. */
__attribute__((noinline)) int bf_icmp_reply_checksum(struct bf_ctx *ctx, __u32 l3, __u32 len,
						     __u64 pseudo)
{
	void *icmp = (void *)(long)ctx->data + sizeof(struct ethhdr) + (l3 & 0x3f);

	return (__u16)~bf_fold(bf_sum(icmp, len, (void *)(long)ctx->data_end,
				      (sizeof(struct icmphdr) + BF_ICMP6_QUOTE_MAX) / 2) + pseudo);
}

/* Whether icmp_send() / icmp6_send() answer the packet at all: never a later fragment,
 * an ICMP error (or a message too short to tell), a packet to a multicast or broadcast
 * address, or for IPv6 from the unspecified one; nor (nf_send_unreach()) one whose
 * checksum is wrong. */
static __always_inline int bf_icmp_answers(struct bf_ctx *ctx, const struct bf_pkt *p)
{
	__u64 pseudo = 0;

	if (p->frag_off)
		return 0;
	if (BF_FAMILY6(p)) {
		if (p->l4_unknown || p->l4_off > 0xff || (p->dst[0] >> 24) == 0xff ||
		    bf_ip6_unspecified(p->src))
			return 0;
		if (p->proto == IPPROTO_ICMPV6 && (p->l4_len < 1 || p->icmp_type < 128))
			return 0;
		pseudo = bf_pseudo_sum(p, p->proto, p->l4_len);
	} else {
		if (p->proto == IPPROTO_ICMP && (p->l4_len < 1 || bf_icmp_is_error(p->icmp_type)))
			return 0;
		if ((p->daddr >> 28) == 0xe || p->daddr == 0xffffffff)
			return 0;
		if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)
			pseudo = bf_pseudo_sum(p, p->proto, p->l4_len);
	}
	/* A first fragment's checksum covers the whole datagram. The kernel answers the
	 * datagram it reassembled (before INPUT always, before PREROUTING with connection
	 * tracking) and checks the fragment alone elsewhere (and fails: no answer). */
	if (p->more_frags && (BF_CONNTRACK || p->hook == BF_HOOK_INPUT))
		return 1;
	return bf_l4_checksum_ok(ctx, p->l4_off | (p->proto << 8) | (p->l4_len << 16), pseudo);
}

/* IPv6 routes of the main table: prefix -> its length (the value), kept by hostview.py
 * for the ICMPv6 rate limit, which gives wider routes a shorter timeout. */
BF_LPM_TRIE(bf_route6, BF_LOCAL_MAX, struct bf_local6_key, __u8);

/* A destination's token bucket for ICMP errors, as the kernel keeps one per peer. */
struct bf_icmp_peer_key {
	__u32 addr[4];
	__u32 family;
};

struct bf_icmp_peer {
	__u64 tokens, last; /* ns */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct bf_icmp_peer_key);
	__type(value, struct bf_icmp_peer);
} bf_icmp_peers SEC(".maps");

#define BF_XRLIM_BURST 6 /* XRLIM_BURST_FACTOR */

/* icmpv4_xrlim_allow() / icmpv6_xrlim_allow(): whether the kernel's rate limit lets a
 * destination unreachable to the packet's source go now. Per destination a bucket of
 * BF_XRLIM_BURST timeouts (icmp_ratelimit; for IPv6 halved for every 32 bits the route to
 * it is shorter than /128), refilled with time, one timeout taken per error; none on
 * what goes back to this host (OUTPUT's REJECT, through lo). (The kernel's global
 * icmp_msgs_per_sec, whose cost per error is random, is not followed.) */
static __always_inline int bf_icmp_rate_allows(const struct bf_pkt *p, int v6)
{
	struct bf_icmp_peer_key key = { .family = v6 };
	struct bf_sysctl *sys = bf_settings();
	struct bf_icmp_peer *peer, fresh = {};
	__u64 now = bpf_ktime_get_ns(), tmo, token;

	if (!sys || p->hook == BF_HOOK_OUTPUT)
		return 1;
	if (v6) {
		struct bf_local6_key route = { .prefixlen = 128 };
		__u8 *plen;

		if (!sys->icmp6_unreach)
			return 1;
		tmo = sys->icmp6_ratelimit * 1000000ULL;
		bf_ip6_net(route.addr, p->src);
		plen = bpf_map_lookup_elem(&bf_route6, &route);
		if (plen && *plen < 128)
			tmo >>= (128 - *plen) >> 5;
	} else {
		if (!(sys->icmp_ratemask & (1 << 3)))
			return 1;
		tmo = sys->icmp_ratelimit * 1000000ULL;
	}
	/* (With a timeout of 0 nothing is refused, but the bucket is kept, empty, as the
	 * kernel keeps it: a limit set later starts from it.) */
	bf_addr_copy(key.addr, p->src, BF_ADDR_WORDS(p));
	peer = bpf_map_lookup_elem(&bf_icmp_peers, &key);
	if (!peer) {
		/* inet_getpeer() dates a new peer's last error a minute back: a full bucket */
		fresh.tokens = BF_XRLIM_BURST * tmo;
		fresh.last = now;
		bpf_map_update_elem(&bf_icmp_peers, &key, &fresh, BPF_NOEXIST);
		peer = bpf_map_lookup_elem(&bf_icmp_peers, &key);
		if (!peer)
			return 1;
	}
	token = peer->tokens + (now - peer->last);
	peer->last = now;
	if (token > BF_XRLIM_BURST * tmo)
		token = BF_XRLIM_BURST * tmo;
	if (token < tmo) {
		peer->tokens = token;
		return 0;
	}
	peer->tokens = token - tmo;
	return 1;
}

/* icmp_send(ICMP_DEST_UNREACH) or icmp6_send(ICMPV6_DEST_UNREACH): the error quotes the
 * rejected packet from its IP header. Global: its frame is not on the stack the chains
 * share with the program's. */
__noinline int bf_reject_icmp(struct bf_ctx *ctx, const struct bf_pkt *p, __u8 code)
{
	__u32 l3, max, quote, head, want, whole;
	struct bf_addr from = {};
	struct ethhdr *eth;
	struct icmphdr *ic;
	__u64 pseudo = 0;
	int v6;

	if (!p)
		return BF_OUT_DROP;
	v6 = BF_FAMILY6(p);
	l3 = v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	max = v6 ? BF_ICMP6_QUOTE_MAX : BF_ICMP_QUOTE_MAX;
	/* (The kernel quotes an atomic fragment without its fragment header; this one keeps
	 * it: below its transport header the skb cannot be cut.) */
	whole = p->len + (p->ip6_flags & BF_IP6_DEFRAGGED ? 8 : 0);
	quote = whole < max ? whole : max;
	head = l3 + sizeof(struct icmphdr);
	want = sizeof(struct ethhdr) + head + quote;
	if (!bf_icmp_answers(ctx, p) || !bf_error_source(ctx, p, &from) ||
	    !bf_icmp_rate_allows(p, v6))
		return BF_OUT_DROP;
	if (p->hook == BF_HOOK_FORWARD) {
		/* The error quotes the packet as FORWARD saw it: its TTL already decremented. */
		void *orig = (void *)(long)ctx->data + sizeof(struct ethhdr);
		void *end = (void *)(long)ctx->data_end;

		if (v6) {
			struct ipv6hdr *ip6 = orig;

			if ((void *)(ip6 + 1) > end)
				return BF_OUT_DROP;
			ip6->hop_limit--;
		} else {
			struct iphdr *ip = orig;

			if ((void *)(ip + 1) > end)
				return BF_OUT_DROP;
			ip->ttl--;
			ip->check = bf_fold((__u64)ip->check + bpf_htons(0x0100));
		}
	}
	if (bf_grow_head(ctx, head))
		return BF_OUT_DROP;
	eth = bf_reply_frame(ctx, want, sizeof(*eth) + sizeof(struct ipv6hdr) +
				       sizeof(*ic));
	if (!eth)
		return BF_OUT_DROP;
	bf_swap_eth(eth, p);
	if (v6) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		bf_put_ip6hdr(ip6, p, from.w, sizeof(*ic) + quote, IPPROTO_ICMPV6);
		ic = (void *)(ip6 + 1);
		pseudo = bf_addr_sum(from.w, 4) + bf_addr_sum(p->src, 4) +
			 bpf_htons(IPPROTO_ICMPV6) + bpf_htons(sizeof(*ic) + quote);
	} else {
		struct iphdr *ip = (void *)(eth + 1);

		bf_put_iphdr(ip, p, from.w[0], (p->tos & 0x1e) | 0xc0, head + quote, 0,
			     IPPROTO_ICMP);
		ic = (void *)(ip + 1);
	}
	ic->type = v6 ? 1 : 3;
	ic->code = code;
	ic->checksum = 0;
	ic->un.gateway = 0;
	ic->checksum = bf_icmp_reply_checksum(ctx, l3, sizeof(*ic) + quote, pseudo);
	return bf_transmit(ctx);
}

#ifdef BF_TC
/* The skb's mark. The barrier gives each access its own view of the context: clang would
 * otherwise keep ctx + offsetof(mark) from one access for the next, and the verifier
 * refuses a context pointer that moved. */
static __always_inline __u32 *bf_skb_mark(struct __sk_buff *skb)
{
	asm volatile("" : "+r"(skb));
	return &skb->mark;
}
#endif

static __always_inline int bf_verdict(struct bf_ctx *ctx, struct bf_pkt *p, int verdict)
{
#ifdef BF_TC
	/* The stack sees the mark the rules set (routing by fwmark, sockets). XDP runs before
	 * there is an skb to carry it: there it lives only as long as the program. */
	*bf_skb_mark(ctx) = p->mark;
#endif
	switch (verdict) {
	case BF_DROP:
		return BF_OUT_DROP;
	case BF_REJECT:
		/* Said, not left to clang to find out: a program without REJECT rules then has
		 * no reply code, which the verifier would check (~130k instructions) for nothing. */
		if (!BF_REJECTS)
			return BF_OUT_DROP;
		if (p->reject_with == BF_REJECT_TCP_RESET)
			return bf_reject_tcp(ctx, p);
		return bf_reject_icmp(ctx, p, p->reject_with);
	default:
		return BF_OUT_PASS;
	}
}
