/* SPDX-License-Identifier: GPL-2.0 */
/* The nat table (IPv4), as nf_nat does it: DNAT at PREROUTING, SNAT and MASQUERADE at
 * POSTROUTING.
 *
 * A connection's first packet walks the nat chains; DNAT chooses its new destination,
 * SNAT its new source, and when the connection is confirmed the choices become a binding.
 * Every later packet of either direction is rewritten from the binding, without a walk:
 * destinations at PREROUTING (so the routing decision and FORWARD or INPUT see the new
 * one), sources at the end of POSTROUTING, in TC egress (the host's own packets and
 * forwarded ones alike: a source rewritten before the routing decision would make a
 * forwarded packet a martian).
 *
 * A binding is up to three entries of bf_nat, keyed as connections are (struct bf_ct_key,
 * the endpoints in canonical order), one per tuple its packets carry on the way: the
 * original tuple c -> d as the client sends it, the tuple c -> b between DNAT and SNAT
 * (b: DNAT's new destination), and the reply tuple b -> n (n: SNAT's new source), whose
 * packets connection tracking reads as the original connection's. Each entry says, per
 * endpoint, what the endpoint stands for in the original tuple and what a packet gets
 * there: to it (as the destination, at PREROUTING) or from it (as the source, at
 * POSTROUTING's end). The connection table stays keyed by the original tuple, as the
 * kernel's first tuplehash. The map lives with the connection table (one per namespace,
 * across swaps); an entry whose connection is gone is never used and is overwritten by
 * the next binding of its tuple. */
#pragma once

#include "bpfilter.h"

/* ifindex -> the interface's primary IPv4 address (host order), the first of its
 * in_device's list, which REDIRECT sends to. Kept by hostview.py (and followed by the
 * watcher) in every program, as the rest of the host view. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} bf_ifaddr SEC(".maps");

#if BF_CONNTRACK

enum bf_nat_end_todo { BF_NAT_TO = 1 /* a packet to it: destination as_dst */,
		       BF_NAT_FROM = 2 /* a packet from it: source as_src */ };

/* One endpoint of a tuple, as its binding has it (addresses in host order). */
struct bf_nat_end {
	__u32 view;      /* what it stands for in the connection's original tuple */
	__u32 as_dst, as_src;
	__u16 view_port, dst_port, src_port;
	__u8 todo;       /* enum bf_nat_end_todo */
	__u8 masq;       /* as_src is MASQUERADE's: forgotten when the address goes */
};

struct bf_nat_entry {
	struct bf_nat_end end[2]; /* in the key's order */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 3 * BF_CT_MAX); /* up to three per binding, one per connection */
	__type(key, struct bf_ct_key);
	__type(value, struct bf_nat_entry);
} bf_nat SEC(".maps");

/* nf_nat's bysource table, as find_appropriate_src() reads it: the source SNAT or
 * MASQUERADE last gave a client's endpoint (address, port or ICMP id, protocol), and the
 * connection it gave it to (its original destination), which must still live for a new
 * connection of the endpoint to take the same source. The kernel walks every connection
 * of the endpoint; this keeps the newest. Shared as bf_nat. */
struct bf_nat_src_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct bf_nat_src {
	__u32 addr, peer;
	__u16 port, peer_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BF_CT_MAX);
	__type(key, struct bf_nat_src_key);
	__type(value, struct bf_nat_src);
} bf_nat_src SEC(".maps");

#if BF_NAT

static __always_inline int bf_nat_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

/* The key of the ICMP query `asker` sends `other` with identifier `id` (its own: NAT may
 * change it, as nf_nat's ICMP "port"), for a message of `type`, the query or its answer
 * (`from` says which: 1 for the answer). */
static __always_inline void bf_nat_icmp_key(struct bf_ct_key *key, __u8 *from, __u8 type,
					    __u16 id, __u32 *asker, __u32 *other)
{
	if (bf_icmp_answer(type, 0))
		bf_ct_icmp_key(key, from, type, id, other, asker, 1);
	else
		bf_ct_icmp_key(key, from, type, id, asker, other, 1);
}

/* The key of the tuple in which `asker` (port or ICMP id `aport`) and `other` (port
 * `oport`) exchange the packet's kind of packets; for TCP and UDP as bf_ct_key_at() with
 * the asker as the sender. */
static __always_inline void bf_nat_key(const struct bf_pkt *p, __u32 *asker, __u16 aport,
				       __u32 *other, __u16 oport, struct bf_ct_key *key)
{
	__u8 from;

	if (p->proto == IPPROTO_ICMP)
		bf_nat_icmp_key(key, &from, p->icmp_type, aport, asker, other);
	else
		bf_ct_key_at(p, asker, aport, other, oport, key, &from);
}

/* Before connection tracking looks the packet up: a packet of a binding's other tuples is
 * read as its connection's, and learns what its binding does to it in this program: its
 * destination at ingress (PREROUTING), its source at egress (POSTROUTING's end). Only a
 * packet of a live connection keeps that (bf_ct_classify forgets it otherwise). */
static __always_inline void bf_nat_view(struct bf_pkt *p, struct bf_ct_key *key, __u8 *from)
{
	const struct bf_nat_end *s, *d;
	struct bf_nat_entry *n;
	__u32 src, dst;

	p->nat = 0;
	if (BF_FAMILY6(p))
		return;
	n = bpf_map_lookup_elem(&bf_nat, key);
	if (!n)
		return;
	s = *from ? &n->end[1] : &n->end[0];
	d = *from ? &n->end[0] : &n->end[1];
#ifdef BF_EGRESS
	if (s->todo & BF_NAT_FROM) {
		p->nat = BF_NAT_SRC;
		p->nat_addr = s->as_src;
		p->nat_port = s->src_port;
	} else if (d->todo & BF_NAT_TO) { /* the host's own: OUTPUT's DNAT (bf_nat_output) */
		p->nat = BF_NAT_DST;
		p->nat_addr = d->as_dst;
		p->nat_port = d->dst_port;
	}
#else
	if (d->todo & BF_NAT_TO) {
		p->nat = BF_NAT_DST;
		p->nat_addr = d->as_dst;
		p->nat_port = d->dst_port;
	}
#endif
	if (p->proto == IPPROTO_ICMP) { /* the asker is the key's first: its own id */
		src = n->end[0].view, dst = n->end[1].view;
		bf_nat_key(p, &src, n->end[0].view_port, &dst, 0, key);
		return;
	}
	src = s->view, dst = d->view;
	bf_ct_key_at(p, &src, s->view_port, &dst, d->view_port, key, from);
}

/* An ICMP error quoting a packet of a binding's tuple, on its way back to the packet's
 * sender: its key becomes the connection's (for RELATED). What this program does to it
 * (if the connection lives: enum bf_nat_todo, 0 for nothing), as
 * nf_nat_icmp_reply_translation(): an error to SNAT's source (the quoted packet left
 * with it, or INPUT's SNAT gave it to the host) gets the client back, at PREROUTING or
 * at the host's own error's egress; at egress an error about a packet DNAT sent on gets
 * the old destination back, at POSTROUTING's end. */
static __always_inline int bf_nat_quoted(struct bf_pkt *p, struct bf_ct_key *key, __u8 *from,
					 __u8 proto, const __u32 *saddr, const __u32 *daddr,
					 __u8 *l4, void *end)
{
	const struct bf_nat_end *s, *d;
	struct bf_nat_entry *n;
	__u32 src, dst;
	int translate;

	p->nat = 0;
	if (BF_FAMILY6(p))
		return 0;
	n = bpf_map_lookup_elem(&bf_nat, key);
	if (!n)
		return 0;
	s = *from ? &n->end[1] : &n->end[0];
	d = *from ? &n->end[0] : &n->end[1];
	translate = s->todo & BF_NAT_TO ? BF_NAT_ERROR | BF_NAT_ERROR_SRC : 0;
	p->nat_addr = s->as_dst;
	p->nat_port = s->dst_port;
#ifdef BF_EGRESS
	if (!translate && (d->todo & BF_NAT_FROM)) {
		translate = BF_NAT_ERROR;
		p->nat_addr = d->view;
		p->nat_port = d->view_port;
	}
#endif
	src = s->view, dst = d->view;
	if (bf_nat_ports(proto)) {
		if ((void *)(l4 + 4) > end)
			return 0;
		bf_ct_endpoints(key, from, proto, &src, s->view_port, &dst, d->view_port, 1);
	} else if (proto == IPPROTO_ICMP) { /* a query's: its asker's own identifier */
		if ((void *)(l4 + 6) > end)
			return 0;
		src = n->end[0].view, dst = n->end[1].view;
		bf_nat_icmp_key(key, from, l4[0], n->end[0].view_port, &src, &dst);
	} else if (!bf_ct_quoted_key(key, from, proto, &src, &dst, l4, end, 1)) {
		return 0;
	}
	return translate;
}

static __always_inline __u32 bf_rol32(__u32 word, int shift)
{
	return (word << shift) | (word >> (32 - shift));
}

/* find_best_ips_proto(): an address of first-last for a connection from `src` to `dst`,
 * as nf_nat chooses it, so that the kernel and bpfilter send a connection to the same
 * one: jhash2() of the source as the tuple's 16 bytes hold it (IPv4's last three words
 * zero), seeded with the destination (`persistent`: 0, the client alone decides), scaled
 * onto the range. Both in network order as the kernel's words; a range given backwards
 * wraps as the kernel's arithmetic does. */
static __always_inline __u32 bf_nat_pick(__u32 first, __u32 last, __u32 src, __u32 dst,
					 int persistent)
{
	__u32 a, b, c;

	a = b = c = 0xdeadbeef + (4 << 2) + (persistent ? 0 : bpf_htonl(dst));
	a += bpf_htonl(src); /* words 1 and 2 are zero; then __jhash_mix() */
	a -= c; a ^= bf_rol32(c, 4); c += b;
	b -= a; b ^= bf_rol32(a, 6); a += c;
	c -= b; c ^= bf_rol32(b, 8); b += a;
	a -= c; a ^= bf_rol32(c, 16); c += b;
	b -= a; b ^= bf_rol32(a, 19); a += c;
	c -= b; c ^= bf_rol32(b, 4); b += a;
	/* word 3 is zero; __jhash_final() */
	c ^= b; c -= bf_rol32(b, 14);
	a ^= c; a -= bf_rol32(c, 11);
	b ^= a; b -= bf_rol32(a, 25);
	c ^= b; c -= bf_rol32(b, 16);
	a ^= c; a -= bf_rol32(c, 4);
	b ^= a; b -= bf_rol32(a, 14);
	c ^= b; c -= bf_rol32(b, 24);
	return first + (__u32)(((__u64)c * (__u32)(last - first + 1)) >> 32);
}

/* DNAT: the connection's new destination (the packet's address or port where the rule
 * keeps it); the walk of this hook's nat chains ends. */
static __always_inline int bf_dnat(struct bf_pkt *p, __u32 addr, __u16 port)
{
	if (addr != p->daddr || port != p->dport) /* the chains after it see DNAT */
		p->ct_state |= BF_CT_DNAT;
	p->nat |= BF_NAT_NEW;
	p->nat_addr = addr;
	p->nat_port = port;
	return BF_ACCEPT;
}

enum bf_snat_flags { BF_SNAT_MASQUERADE = 1, BF_SNAT_RANDOM = 2, BF_SNAT_RANDOM_FULLY = 4,
		     BF_SNAT_PORTS = 8 /* a port range was given */, BF_SNAT_PERSISTENT = 16 };

/* What SNAT or MASQUERADE chose for the packet's connection, until it is bound (struct
 * bf_pkt has no room left: this CPU's, for the one packet it runs). */
struct bf_snat {
	__u32 addr;      /* 0 for MASQUERADE until the route gives it */
	__u32 last;      /* the address range's last (addr: one address) */
	__u16 min, max;  /* the port range */
	__u8 flags;      /* enum bf_snat_flags */
	__u8 pad[3];
	struct bf_nat_src_key client; /* bf_nat_src's key, kept here off the stack */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bf_snat);
} bf_snat_choice SEC(".maps");

/* SNAT / MASQUERADE: the connection's new source; the walk of the nat chains ends. */
static __always_inline int bf_snat(struct bf_pkt *p, __u32 addr, __u32 last, __u16 min,
				   __u16 max, __u8 flags)
{
	__u32 zero = 0;
	struct bf_snat *s = bpf_map_lookup_elem(&bf_snat_choice, &zero);

	if (!s)
		return BF_DROP;
	s->addr = addr;
	s->last = last;
	s->min = min;
	s->max = max;
	s->flags = flags;
	p->nat |= BF_NAT_SNAT;
	return BF_ACCEPT;
}

/* One's-complement checksum update for a 32-bit (or 16-bit) field changed from `from` to
 * `to`, all as they lie in the packet (RFC 1624). */
static __always_inline __u16 bf_csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__u64 sum = (__u16)~check;

	sum += (__u16)~from + (__u16)~(from >> 16) + (to & 0xffff) + (to >> 16);
	return ~bf_fold(sum);
}

static __always_inline __u16 bf_csum_replace2(__u16 check, __u16 from, __u16 to)
{
	return ~bf_fold((__u64)(__u16)~check + (__u16)~from + to);
}

/* The packet's destination (`dst`) or source becomes addr:port (the port only for TCP
 * and UDP), with the IP header's checksum and the transport's (its pseudo-header; a UDP
 * datagram without a checksum keeps none). At TC the kernel's helpers also keep a
 * checksum the device is still to finish (CHECKSUM_PARTIAL) right. */
static __always_inline int bf_nat_rewrite(struct bf_ctx *ctx, struct bf_pkt *p, int dst,
					  __u32 addr, __u16 port)
{
	__u32 from = bpf_htonl(dst ? p->daddr : p->saddr), to = bpf_htonl(addr);
	__u16 pfrom = bpf_htons(dst ? p->dport : p->sport), pto = bpf_htons(port);
	int ports = bf_nat_ports(p->proto) && !p->frag_off && p->l4_len >= 8;
	__u32 l4 = p->l4_off & 0xff;
	/* An ICMP query's identifier is its sender's "port", an answer's its receiver's. */
	int id = p->proto == IPPROTO_ICMP && !p->frag_off && p->l4_len >= 8 &&
		 port != p->icmp_id && (dst ? bf_icmp_answer(p->icmp_type, 0) :
					bf_icmp_query(p->icmp_type, 0));
	__u16 idfrom = bpf_htons(p->icmp_id);
#ifdef BF_TC
	__u32 check = l4 + (p->proto == IPPROTO_TCP ? 16 : 6);
	__u32 where = sizeof(struct ethhdr) + (dst ? offsetof(struct iphdr, daddr) :
						    offsetof(struct iphdr, saddr));
	__u64 udp = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (ports && p->proto == IPPROTO_TCP && p->l4_len < 20)
		ports = 0;
	if (from != to) {
		if (ports && bpf_l4_csum_replace(ctx, check, from, to,
						 BPF_F_PSEUDO_HDR | udp | 4))
			return -1;
		if (bpf_l3_csum_replace(ctx, sizeof(struct ethhdr) +
					offsetof(struct iphdr, check), from, to, 4) ||
		    bpf_skb_store_bytes(ctx, where, &to, 4, 0))
			return -1;
	}
	if (ports && pfrom != pto &&
	    (bpf_l4_csum_replace(ctx, check, pfrom, pto, udp | 2) ||
	     bpf_skb_store_bytes(ctx, l4 + (dst ? 2 : 0), &pto, 2, 0)))
		return -1;
	if (id && (bpf_l4_csum_replace(ctx, l4 + 2, idfrom, pto, 2) ||
		   bpf_skb_store_bytes(ctx, l4 + 4, &pto, 2, 0)))
		return -1;
#else
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__u8 *th;

	if ((void *)(ip + 1) > end)
		return -1;
	th = data + l4;
	asm volatile("" : "+r"(th));
	ip->check = bf_csum_replace4(ip->check, from, to);
	if (dst)
		ip->daddr = to;
	else
		ip->saddr = to;
	if (ports) {
		__u16 *sum;

		if (p->proto == IPPROTO_TCP) {
			if ((void *)(th + 20) > end)
				return -1;
			sum = (__u16 *)(th + 16);
		} else {
			if ((void *)(th + 8) > end)
				return -1;
			sum = (__u16 *)(th + 6);
		}
		if (p->proto != IPPROTO_UDP || *sum) {
			__u16 c = bf_csum_replace2(bf_csum_replace4(*sum, from, to), pfrom, pto);

			*sum = p->proto == IPPROTO_UDP && !c ? 0xffff : c;
		}
		*(__u16 *)(th + (dst ? 2 : 0)) = pto;
	}
	if (id) {
		if ((void *)(th + 8) > end)
			return -1;
		*(__u16 *)(th + 2) = bf_csum_replace2(*(__u16 *)(th + 2), idfrom, pto);
		*(__u16 *)(th + 4) = pto;
	}
#endif
	if (id)
		p->icmp_id = port;
	if (dst) {
		p->daddr = addr;
		if (ports)
			p->dport = port;
	} else {
		p->saddr = addr;
		if (ports)
			p->sport = port;
	}
	return 0;
}

/* The address a datagram's first fragment got, for its later ones, which have no ports to
 * find their binding by (the kernel reassembles before NAT; here the first fragment is
 * rewritten before the kernel's reassembly, so the others must be too, or the datagram
 * is never whole). Keyed by the header fields every fragment carries, as they came. */
struct bf_nat_frag_key {
	__u32 saddr, daddr;
	__u16 id;
	__u8 proto;
	__u8 dst;        /* the destination is rewritten (else the source) */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct bf_nat_frag_key);
	__type(value, __u32);
} bf_nat_frags SEC(".maps");

static __always_inline void bf_nat_frag_key(struct bf_ctx *ctx, const struct bf_pkt *p,
					    struct bf_nat_frag_key *key, int dst)
{
	__u16 id = 0;

	bf_load_bytes(ctx, sizeof(struct ethhdr) + offsetof(struct iphdr, id), &id, 2);
	key->saddr = p->saddr;
	key->daddr = p->daddr;
	key->id = id;
	key->proto = p->proto;
	key->dst = dst;
}

/* A rewrite of the packet's destination (`dst`) or source from its binding; a first
 * fragment's is remembered for the rest of its datagram. */
static __always_inline int bf_nat_rewrite_first(struct bf_ctx *ctx, struct bf_pkt *p, int dst)
{
	struct bf_nat_frag_key key = {};
	int first = p->more_frags && !p->frag_off;

	if (first)
		bf_nat_frag_key(ctx, p, &key, dst);
	if (bf_nat_rewrite(ctx, p, dst, p->nat_addr, p->nat_port))
		return -1;
	if (first)
		bpf_map_update_elem(&bf_nat_frags, &key, &p->nat_addr, BPF_ANY);
	return 0;
}

/* A later fragment: the address its first fragment got, if that one came first. Global,
 * as below. */
__noinline int bf_nat_fragment(struct bf_ctx *ctx, struct bf_pkt *p, int dst)
{
	struct bf_nat_frag_key key = {};
	__u32 *addr;

	if (!ctx || !p)
		return 0;
	bf_nat_frag_key(ctx, p, &key, !!dst);
	addr = bpf_map_lookup_elem(&bf_nat_frags, &key);
	if (addr)
		bf_nat_rewrite(ctx, p, !!dst, *addr, 0);
	return 0;
}

/* At PREROUTING's nat place: the destination DNAT chose or the binding holds. (What the
 * packet was addressed to stays in p->ct_orig, for the binding.) Global: the rewrite's
 * locals stay off the program's stack, which is full at TC with IPv6. */
__noinline int bf_nat_destination(struct bf_ctx *ctx, struct bf_pkt *p)
{
	if (!ctx || !p)
		return 0;
	if (bf_nat_rewrite_first(ctx, p, 1))
		p->nat = 0;
	return 0;
}

/* The source the binding of the tuple the packet carries now gives it, if any (a later
 * packet whose destination was just rewritten: at egress SNAT's for the tuple c -> b; at
 * INPUT's end the address a reply's sender stands for). Global: its key stays off the
 * stack. */
__noinline int bf_nat_source_of(struct bf_pkt *p)
{
	const struct bf_nat_end *s;
	struct bf_ct_key key = {};
	struct bf_nat_entry *n;
	__u8 from;

	if (!p)
		return 0;
	bf_ct_key_of(p, &key, &from);
	n = bpf_map_lookup_elem(&bf_nat, &key);
	if (!n)
		return 0;
	s = from ? &n->end[1] : &n->end[0];
	if (!(s->todo & BF_NAT_FROM))
		return 0;
	p->nat |= BF_NAT_SRC;
	p->nat_addr = s->as_src;
	p->nat_port = s->src_port;
	return 1;
}

#ifdef BF_EGRESS
/* Where OUTPUT's DNAT sends the host's packet on (ip_route_me_harder()): this CPU's, for
 * the one packet it runs, and for the run of the egress program the redirect makes, which
 * lets it through untouched (it is the same packet, walked already). */
struct bf_nat_route {
	__u32 ifindex;   /* the interface the new destination's route leaves by */
	__u32 hash;      /* the redirected packet (skb->hash), */
	__u64 until;     /* while it is on its way */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bf_nat_route);
} bf_nat_routes SEC(".maps");

/* The route to the packet's new destination from its source, as a packet forwarded from
 * the interface it was to leave by (a lookup as output would keep to that interface);
 * where forwarding is off there, that interface's own routes. POSTROUTING then sees the
 * new interface (the host's own packet has only `-o` patterns). 0: no route, or a local
 * destination (delivered through lo, which this does not follow: the packet is dropped).
 * Global: the lookup's 64 bytes stay off the egress program's stack. */
__noinline int bf_nat_reroute(struct bf_ctx *ctx, struct bf_pkt *p)
{
	struct bpf_fib_lookup fib = {};
	struct bf_nat_route *r;
	__u32 zero = 0;
	int rc;

	if (!ctx || !p)
		return 0;
	fib.family = 2; /* AF_INET */
	fib.ipv4_src = bpf_htonl(p->saddr);
	fib.ipv4_dst = bpf_htonl(p->daddr);
	fib.l4_protocol = p->proto;
	fib.ifindex = ctx->ifindex;
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		fib.ifindex = ctx->ifindex;
		rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT |
				    BPF_FIB_LOOKUP_SKIP_NEIGH);
	}
	r = bpf_map_lookup_elem(&bf_nat_routes, &zero);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || !r)
		return 0;
	r->ifindex = fib.ifindex;
	p->oifindex = fib.ifindex; /* what POSTROUTING's -o and MASQUERADE see */
	if (BF_IFBITS_OUT)
		p->ifbits = bf_ifbits(fib.ifindex) & BF_IFBITS_OUT;
	p->nat |= BF_NAT_REROUTE;
	return 1;
}

/* OUTPUT's nat place (-100), for a packet this host sends: the destination DNAT chose or
 * the binding holds, then its route; a later packet's source, if SNAT is bound too, is
 * the one of the tuple it carries now (c -> b). DROP when the new destination has no
 * route this can follow. Global, as bf_nat_destination(). */
__noinline int bf_nat_output(struct bf_ctx *ctx, struct bf_pkt *p)
{
	__u32 was;
	int later;

	if (!ctx || !p)
		return BF_DROP;
	was = p->daddr;
	later = !!(p->nat & BF_NAT_DST);
	if (!(p->nat & (BF_NAT_NEW | BF_NAT_DST)))
		return BF_ACCEPT;
	if (bf_nat_rewrite(ctx, p, 1, p->nat_addr, p->nat_port)) {
		p->nat = 0;
		return BF_ACCEPT;
	}
	p->nat &= ~BF_NAT_DST;
	if (p->daddr != was && !bf_nat_reroute(ctx, p))
		return BF_DROP;
	if (later)
		bf_nat_source_of(p);
	return BF_ACCEPT;
}

/* The egress program's run for a packet OUTPUT's DNAT redirected here: let it go. */
static __always_inline int bf_nat_rerouted(struct bf_ctx *ctx)
{
	__u32 zero = 0;
	struct bf_nat_route *r = bpf_map_lookup_elem(&bf_nat_routes, &zero);

	if (!r || !r->until || r->ifindex != ctx->ifindex || bf_now() > r->until ||
	    bpf_get_hash_recalc(ctx) != r->hash)
		return 0;
	r->until = 0;
	return 1;
}

/* At egress's end: send the packet to the interface its new destination's route leaves
 * by (its MAC addresses from the neighbour table), once. */
static __always_inline int bf_nat_redirect(struct bf_ctx *ctx)
{
	__u32 zero = 0;
	struct bf_nat_route *r = bpf_map_lookup_elem(&bf_nat_routes, &zero);

	if (!r)
		return BF_OUT_DROP;
	r->hash = bpf_get_hash_recalc(ctx);
	r->until = bf_now() + BF_SEC / 1000;
	return bpf_redirect_neigh(r->ifindex, NULL, 0, 0);
}
#endif

/* At the end of POSTROUTING: the source the binding gives (SNAT's; for a reply to a
 * DNATed packet, the address and port its peer sent to). Global, as above. */
__noinline int bf_nat_source(struct bf_ctx *ctx, struct bf_pkt *p)
{
	if (!ctx || !p)
		return 0;
	bf_nat_rewrite_first(ctx, p, 0);
	return 0;
}

/* The quoted ICMP query of an error on its way back to its asker: its identifier is
 * the asker's own again (and its checksum); the error's checksum `sum` follows. */
static __always_inline __u16 bf_nat_quoted_id(struct bf_ctx *ctx, __u32 l4, __u16 sum,
					      __u16 pto)
{
	__u16 id, check, c;
	__u8 type;

	if (bf_load_bytes(ctx, l4, &type, 1) || !bf_icmp_query(type, 0) ||
	    bf_load_bytes(ctx, l4 + 4, &id, 2) || id == pto)
		return sum;
	sum = bf_csum_replace2(sum, id, pto);
	bf_store_bytes(ctx, l4 + 4, &pto, 2);
	if (!bf_load_bytes(ctx, l4 + 2, &check, 2)) { /* where the quote reaches it */
		c = bf_csum_replace2(check, id, pto);
		sum = bf_csum_replace2(sum, check, c);
		bf_store_bytes(ctx, l4 + 2, &c, 2);
	}
	return sum;
}

/* nf_nat_icmp_reply_translation() for an error on its way to the sender of the packet it
 * quotes: the quoted packet gets back the endpoint its sender knows (at egress its
 * destination, DNAT's old one; at ingress its source, the client SNAT stood in for):
 * address, port, its checksums; the error's own source (egress) or destination (ingress)
 * follows, and the ICMP checksum. Every field changed lies at an even offset from the
 * ICMP header: one increment each. Global: its header copy stays off the program's
 * stack. */
__noinline int bf_nat_error(struct bf_ctx *ctx, struct bf_pkt *p)
{
	__u32 icmp, inner, l4, to, from, field;
	__u16 sum, ip_sum, port, l4_sum, pto;
	struct iphdr ip;
	int quoted_src;

	if (!p)
		return 0;
	quoted_src = !!(p->nat & BF_NAT_ERROR_SRC);
	icmp = p->l4_off & 0xff, inner = icmp + 8, to = bpf_htonl(p->nat_addr);
	pto = bpf_htons(p->nat_port);
	if (bf_load_bytes(ctx, inner, &ip, sizeof(ip)) ||
	    bf_load_bytes(ctx, icmp + 2, &sum, 2))
		return 0;
	from = quoted_src ? ip.saddr : ip.daddr;
	field = inner + (quoted_src ? offsetof(struct iphdr, saddr) :
				      offsetof(struct iphdr, daddr));
	ip_sum = bf_csum_replace4(ip.check, from, to);
	sum = bf_csum_replace2(bf_csum_replace4(sum, from, to), ip.check, ip_sum);
	l4 = inner + (ip.ihl & 0xf) * 4;
	if (bf_nat_ports(ip.protocol) &&
	    !bf_load_bytes(ctx, l4 + (quoted_src ? 0 : 2), &port, 2)) {
		__u32 at = l4 + (ip.protocol == IPPROTO_TCP ? 16 : 6);

		sum = bf_csum_replace2(sum, port, pto);
		bf_store_bytes(ctx, l4 + (quoted_src ? 0 : 2), &pto, 2);
		/* the quoted transport checksum, where the quote reaches it */
		if (!bf_load_bytes(ctx, at, &l4_sum, 2) &&
		    (ip.protocol != IPPROTO_UDP || l4_sum)) {
			__u16 c = bf_csum_replace2(bf_csum_replace4(l4_sum, from, to), port, pto);

			if (ip.protocol == IPPROTO_UDP && !c)
				c = 0xffff;
			sum = bf_csum_replace2(sum, l4_sum, c);
			bf_store_bytes(ctx, at, &c, 2);
		}
	}
	if (ip.protocol == IPPROTO_ICMP && quoted_src)
		sum = bf_nat_quoted_id(ctx, l4, sum, pto);
	bf_store_bytes(ctx, inner + offsetof(struct iphdr, check), &ip_sum, 2);
	bf_store_bytes(ctx, field, &to, 4);
	bf_store_bytes(ctx, icmp + 2, &sum, 2);
	bf_nat_rewrite(ctx, p, quoted_src, p->nat_addr, 0);
#ifdef BF_EGRESS
	if (quoted_src) /* the host's error to its INPUT SNAT's client: sent by its route */
		bf_nat_reroute(ctx, p);
#endif
	return 0;
}

/* nf_nat_used_tuple(): whether another connection holds the tuple of a and b (an ICMP
 * query's: b asks, bport its identifier): a live entry of the connection table, or a
 * binding of a live connection. Global: the port search calls it in a loop. */
__noinline int bf_nat_used(const struct bf_pkt *p, __u32 a, __u16 aport, __u32 b, __u16 bport)
{
	struct bf_ct_key key = {};
	struct bf_ct_entry *e;
	struct bf_nat_entry *n;
	__u64 now = bf_now();

	if (!p)
		return 1;
	bf_nat_key(p, &b, bport, &a, aport, &key);
	e = bpf_map_lookup_elem(&bf_conntrack, &key);
	if (e && e->expires > now)
		return 1;
	n = bpf_map_lookup_elem(&bf_nat, &key);
	if (!n)
		return 0;
	a = n->end[0].view;
	b = n->end[1].view;
	bf_nat_key(p, &a, n->end[0].view_port, &b, n->end[1].view_port, &key);
	e = bpf_map_lookup_elem(&bf_conntrack, &key);
	return e && e->expires > now;
}

/* A destination port of min-max, as nf_nat_l4proto_unique_tuple() chooses one (for
 * DNAT's and REDIRECT's ranges): the packet's own if it is in the range and no other
 * connection's reply tuple has it, else the lowest free one (--random: from a random
 * place; a shift, `base` > 0: from the packet's port less base, 16 bits as the kernel's
 * offset), 128 tries; the last tried when none is free. */
static __always_inline __u16 bf_dnat_port(const struct bf_pkt *p, __u32 addr, __u16 min,
					  __u16 max, int random, __u16 base)
{
	__u32 span = (__u32)max - min + 1, off = random ? bpf_get_prandom_u32() : 0, i;
	__u16 port = min;

	if (base)
		off = (__u16)(p->dport - base);
	else if (!random && p->dport >= min && p->dport <= max &&
		 !bf_nat_used(p, addr, p->dport, p->saddr, p->sport))
		return p->dport;
	for (i = 0; i < 128 && i < span; i++) {
		port = min + (__u16)(off + i) % span;
		if (!bf_nat_used(p, addr, port, p->saddr, p->sport))
			break;
	}
	return port;
}

/* DNAT to a port range: the port chosen as above. */
static __always_inline int bf_dnat_range(struct bf_pkt *p, __u32 addr, __u16 min, __u16 max,
					 int random, __u16 base)
{
	return bf_dnat(p, addr, bf_nat_ports(p->proto) ?
			bf_dnat_port(p, addr, min, max, random, base) : p->dport);
}

/* REDIRECT (nf_nat_redirect_ipv4): DNAT to the primary address of the interface the
 * packet came in by (the kernel drops the packet when the interface has none), to a port
 * of min-max (0-0: the packet's own). */
static __always_inline int bf_redirect(struct bf_pkt *p, __u16 min, __u16 max, int random)
{
	__u32 *addr = bpf_map_lookup_elem(&bf_ifaddr, &p->ifindex);

	if (!addr)
		return BF_DROP;
	if (!min)
		return bf_dnat(p, *addr, p->dport);
	return bf_dnat_range(p, *addr, min, max, random, 0);
}

/* The new source port, as nf_nat_l4proto_unique_tuple() chooses it: the client's own if
 * it is in the range (without a range: ports of its class, 1-511, 600-1023 or
 * 1024-65535) and no other connection's reply tuple has it, else a free one from a
 * random place in the range; 0 when none is found (the kernel drops the packet: a
 * range of one port is taken even when held, and the clash drops it at confirm). */
static __always_inline __u16 bf_snat_port(const struct bf_pkt *p, const struct bf_snat *s,
					  __u32 from, __u16 port, __u32 to, __u16 to_port)
{
	__u16 min = s->min, max = s->max;
	__u32 span, start, i;

	if (!(s->flags & BF_SNAT_PORTS) && p->proto == IPPROTO_ICMP) {
		min = 0, max = 65535; /* an identifier: any */
	} else if (!(s->flags & BF_SNAT_PORTS)) {
		min = port < 512 ? 1 : port < 1024 ? 600 : 1024;
		max = port < 512 ? 511 : port < 1024 ? 1023 : 65535;
	}
	if (min == max && (s->flags & BF_SNAT_PORTS)) /* one port: taken if free */
		return bf_nat_used(p, to, to_port, from, min) ? 0 : min;
	if (!(s->flags & (BF_SNAT_RANDOM | BF_SNAT_RANDOM_FULLY)) && port >= min &&
	    port <= max && !bf_nat_used(p, to, to_port, from, port))
		return port;
	span = (__u32)max - min + 1;
	start = bpf_get_prandom_u32();
	for (i = 0; i < 64; i++) {
		__u16 candidate = min + (start + i) % span;

		if (!bf_nat_used(p, to, to_port, from, candidate))
			return candidate;
	}
	return 0;
}

static __always_inline int bf_nat_in(__u32 value, __u32 first, __u32 last)
{
	return value >= first && value <= last;
}

/* The source SNAT gave the packet's client endpoint, for bf_snat_choose(). Global: its
 * key and value stay off bf_nat_setup()'s stack. */
__noinline int bf_nat_src_put(const struct bf_pkt *p, __u32 addr, __u16 port)
{
	struct bf_nat_src_key key = {};
	struct bf_nat_src given = {};

	if (!p)
		return 0;
	key.addr = p->ct_orig[0][0];
	key.port = p->ct_port[0];
	key.proto = p->proto;
	given.addr = addr;
	given.port = port;
	given.peer = p->ct_orig[1][0];
	given.peer_port = p->ct_port[1];
	bpf_map_update_elem(&bf_nat_src, &key, &given, BPF_ANY);
	return 0;
}

/* get_unique_tuple() for SNAT and MASQUERADE: the new source of the connection c:cp ->
 * b:bp, as addr << 16 | port; 0 when there is none (the kernel drops the packet).
 * Without --random*: the client's own where it lies in the ranges and is free; else the
 * source a live connection of the same client endpoint got, where it lies in the ranges
 * and is free. Else an address of the range (bf_nat_pick) and a port (bf_snat_port). */
static __always_inline __u64 bf_snat_choose(const struct bf_pkt *p, struct bf_snat *s,
					    __u32 ca, __u16 cp, __u32 ba, __u16 bp)
{
	struct bf_nat_src *m;
	__u16 np = cp;
	__u32 na;

	if (!(s->flags & (BF_SNAT_RANDOM | BF_SNAT_RANDOM_FULLY))) {
		if (bf_nat_in(ca, s->addr, s->last) &&
		    (!(s->flags & BF_SNAT_PORTS) || bf_nat_in(cp, s->min, s->max))) {
			if (!bf_nat_used(p, ba, bp, ca, cp))
				return (__u64)ca << 16 | cp;
		} else { /* find_appropriate_src(): its connection must live (be "used") */
			s->client.addr = ca, s->client.port = cp, s->client.proto = p->proto;
			s->client.pad = 0;
			m = bpf_map_lookup_elem(&bf_nat_src, &s->client);
			if (m && bf_nat_in(m->addr, s->addr, s->last) &&
			    (!(s->flags & BF_SNAT_PORTS) || bf_nat_in(m->port, s->min, s->max)) &&
			    bf_nat_used(p, m->peer, m->peer_port, ca, cp) &&
			    !bf_nat_used(p, ba, bp, m->addr, m->port))
				return (__u64)m->addr << 16 | m->port;
		}
	}
	na = s->addr == s->last ? s->addr : bf_nat_pick(s->addr, s->last, ca, ba,
							 s->flags & BF_SNAT_PERSISTENT);
	if (bf_nat_ports(p->proto) || p->proto == IPPROTO_ICMP) { /* a port or query id */
		np = bf_snat_port(p, s, na, cp, ba, bp);
		if (!np)
			return 0;
	}
	return (__u64)na << 16 | np;
}

/* masquerade_tg(): the address of the interface the packet leaves by that the route to
 * its destination prefers (inet_select_addr(); a route's own `src` is taken here, not by
 * the kernel), into the choice. 0 when there is none. Global: the lookup's 64 bytes stay
 * off bf_nat_setup()'s stack. */
__noinline int bf_nat_masquerade(struct bf_ctx *ctx, const struct bf_pkt *p, struct bf_snat *s)
{
	struct bpf_fib_lookup fib = {};

	if (!p || !s)
		return 0;
	fib.family = 2; /* AF_INET */
	fib.ipv4_dst = bpf_htonl(p->daddr);
	fib.ifindex = p->oifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT |
			   BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC))
		return 0;
	s->addr = s->last = bpf_ntohl(fib.ipv4_src);
	return 1;
}

/* One entry of a binding, its endpoints given in `ends` as a -> b (a: the sender of the
 * tuple's original way, as ICMP keys need; `ports`: a's << 16 | b's). Global, as
 * bf_nat_used(): its key and entry stay off bf_nat_setup()'s stack. */
__noinline int bf_nat_put(const struct bf_pkt *p, __u32 a, __u32 b, __u32 ports,
			  const struct bf_nat_entry *ends)
{
	struct bf_nat_entry entry;
	struct bf_ct_key key = {};
	__u8 from = 0;

	if (!p || !ends)
		return 0;
	if (p->proto == IPPROTO_ICMP) /* a asks: the key's first */
		bf_nat_key(p, &a, ports >> 16, &b, 0, &key);
	else
		bf_ct_key_at(p, &a, ports >> 16, &b, ports & 0xffff, &key, &from);
	entry.end[0] = ends->end[from ? 1 : 0];
	entry.end[1] = ends->end[from ? 0 : 1];
	bpf_map_update_elem(&bf_nat, &key, &entry, BPF_ANY);
	return 0;
}

#ifndef BF_EGRESS
/* nat's place at INPUT's end, for a packet of a known connection the host takes (never
 * routed out): a reply to its own connection that OUTPUT's DNAT sent elsewhere gets back
 * the source its socket knows. Global, apart from bf_nat_setup(): the two calls' frames
 * never stack. */
__noinline int bf_nat_input_end(struct bf_ctx *ctx, struct bf_pkt *p, int verdict)
{
	if (p && p->ct_create == sNO && (p->noif & BF_NO_OUT) && verdict == BF_ACCEPT &&
	    bf_nat_source_of(p))
		bf_nat_source(ctx, p);
	return 0;
}
#endif

/* nf_nat_setup_info() at __nf_conntrack_confirm() of a new connection DNAT or SNAT
 * chose for: its source port, then its binding's entries (c -> d the original tuple, b
 * DNAT's destination, n SNAT's source; without DNAT b is d, without SNAT n is c). At
 * egress the packet's own source is rewritten next. The verdict, DROP where the kernel
 * drops: MASQUERADE without an address, no free port. Global, as bf_ct_confirm(): its
 * entries stay off the stack the walk uses. */
__noinline int bf_nat_setup(struct bf_ctx *ctx, struct bf_pkt *p, int verdict)
{
	struct bf_nat_entry e = {};
	__u32 ca, da, ba, na, zero = 0;
	__u16 cp, dp, bp, np;
	struct bf_snat *s;
	__u64 chosen;
	int dnat, snat, masq = 0;

	if (!p)
		return BF_DROP;
	if (!(p->nat & (BF_NAT_NEW | BF_NAT_SNAT)) || p->ct_create == sNO ||
	    verdict == BF_DROP || verdict == BF_REJECT)
		return verdict;
	dnat = !!(p->nat & BF_NAT_NEW);
	snat = !!(p->nat & BF_NAT_SNAT);
	ca = p->ct_orig[0][0], cp = p->ct_port[0];
	da = p->ct_orig[1][0], dp = p->ct_port[1];
	ba = p->daddr, bp = p->dport;
	na = ca, np = cp;
	if (snat) {
		s = bpf_map_lookup_elem(&bf_snat_choice, &zero);
		if (!s)
			return BF_DROP;
		masq = !!(s->flags & BF_SNAT_MASQUERADE);
		if (masq && !bf_nat_masquerade(ctx, p, s))
			return BF_DROP;
		if (!s->addr)
			return BF_DROP;
		chosen = bf_snat_choose(p, s, ca, cp, ba, bp);
		if (!chosen)
			return BF_DROP;
		na = chosen >> 16, np = chosen & 0xffff;
		snat = na != ca || np != cp; /* else a null binding: nothing changes */
		if (snat) {
			p->ct_state |= BF_CT_SNAT; /* for the connection's later packets */
			bf_nat_src_put(p, na, np);
		}
	}
	if (!dnat && !snat)
		return verdict;
	/* The original tuple: DNAT's new destination for packets to d; without DNAT, SNAT's
	 * new source for packets from c (with it, they carry c -> b by then). */
	e.end[0].view = ca, e.end[0].view_port = cp;
	e.end[1].view = da, e.end[1].view_port = dp;
	e.end[0].as_src = na, e.end[0].src_port = np; /* (what `bpfilter conntrack` shows) */
	e.end[0].masq = masq;
	e.end[1].as_dst = ba, e.end[1].dst_port = bp;
	if (dnat)
		e.end[1].todo = BF_NAT_TO;
	else
		e.end[0].todo = BF_NAT_FROM;
	bf_nat_put(p, ca, da, (__u32)cp << 16 | dp, &e);
	/* c -> b: b answers as d; SNAT's source for packets from c */
	e.end[1].todo = dnat ? BF_NAT_FROM : 0;
	e.end[1].as_src = da, e.end[1].src_port = dp;
	e.end[0].todo = snat ? BF_NAT_FROM : 0;
	e.end[0].as_src = na, e.end[0].src_port = np;
	if (dnat && snat)
		bf_nat_put(p, ca, ba, (__u32)cp << 16 | bp, &e);
	/* The reply tuple n -> b: n stands for c, and packets to it go to c. */
	e.end[0].todo = snat ? BF_NAT_TO : 0;
	e.end[0].as_dst = ca, e.end[0].dst_port = cp;
	bf_nat_put(p, na, ba, (__u32)np << 16 | bp, &e);
#ifndef BF_EGRESS
	if (!(p->noif & BF_NO_OUT)) /* forwarded: its source is written at egress */
		return verdict;
#endif
	if (snat) { /* at egress next; for INPUT's SNAT by bf_nat_bind() */
		p->nat |= BF_NAT_SRC;
		p->nat_addr = na;
		p->nat_port = np;
	}
	return verdict;
}

/* At the stage's end: INPUT's nat place (ingress) for known connections, then the new
 * connection's binding. */
static __always_inline int bf_nat_bind(struct bf_ctx *ctx, struct bf_pkt *p, int verdict)
{
#ifndef BF_EGRESS
	bf_nat_input_end(ctx, p, verdict);
#endif
	return bf_nat_setup(ctx, p, verdict);
}

#ifndef BF_EGRESS
/* INPUT's SNAT of a new connection's first packet (nf_nat_ipv4_fn at LOCAL_IN: after
 * filter INPUT, before the socket), once its connection is confirmed under the original
 * tuple, as at egress. */
static __always_inline void bf_nat_input_snat(struct bf_ctx *ctx, struct bf_pkt *p,
					      int verdict)
{
	if (p->ct_create != sNO && verdict == BF_ACCEPT && (p->nat & BF_NAT_SRC))
		bf_nat_source(ctx, p);
}
#endif

#endif
#endif
