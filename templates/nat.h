/* SPDX-License-Identifier: GPL-2.0 */
/* Destination NAT (the nat table's DNAT at PREROUTING), IPv4, as nf_nat does it.
 *
 * A connection's first packet walks the nat chains; DNAT chooses its new destination, and
 * when the connection is confirmed the choice becomes a binding. Every later packet of
 * either direction is rewritten from the binding, without a walk: the original way's
 * destination at PREROUTING (so the routing decision and FORWARD or INPUT see the new
 * one), the reply way's source at the end of POSTROUTING, where the kernel puts its
 * inverse (TC egress: the host's own answers and forwarded ones alike).
 *
 * A binding is two entries of bf_nat, keyed as connections are (struct bf_ct_key, the
 * endpoints in canonical order): the original tuple, whose packets get the new
 * destination, and the reply tuple (the client and the new destination), whose packets
 * connection tracking reads as the original connection's and whose replies get the old
 * destination back as their source. The connection table stays keyed by the original
 * tuple, as the kernel's first tuplehash. The map lives with the connection table (one
 * per namespace, across swaps); an entry whose connection is gone is never used and is
 * overwritten by the next binding of its tuple. */
#pragma once

#include "bpfilter.h"

#if BF_CONNTRACK

struct bf_nat_entry {
	__u32 at;        /* the endpoint packets of this tuple carry (host order) */
	__u32 to;        /* what it stands for */
	__u16 at_port, to_port;
	__u8 reply;      /* 1: the connection's reply tuple */
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2 * BF_CT_MAX); /* two per binding: one per connection the table holds */
	__type(key, struct bf_ct_key);
	__type(value, struct bf_nat_entry);
} bf_nat SEC(".maps");

#if BF_NAT

static __always_inline int bf_nat_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

/* Whether the packet's destination (`dst`) or source is the entry's endpoint. */
static __always_inline int bf_nat_is(const struct bf_pkt *p, const struct bf_nat_entry *n,
				     int dst)
{
	if ((dst ? p->daddr : p->saddr) != n->at)
		return 0;
	return !bf_nat_ports(p->proto) || (dst ? p->dport : p->sport) == n->at_port;
}

/* Before connection tracking looks the packet up: a packet of a binding's reply tuple is
 * read as its connection's (its new destination as the old one), and the packet learns
 * what its binding rewrites. Only a packet of a live connection keeps that
 * (bf_ct_classify forgets it otherwise). */
static __always_inline void bf_nat_view(struct bf_pkt *p, struct bf_ct_key *key, __u8 *from)
{
	struct bf_nat_entry *n;
	__u32 src, dst;
	__u16 sport, dport;

	p->nat = 0;
	if (BF_FAMILY6(p))
		return;
	n = bpf_map_lookup_elem(&bf_nat, key);
	if (!n)
		return;
	p->nat_addr = n->to;
	p->nat_port = n->to_port;
	if (!n->reply) {
		if (bf_nat_is(p, n, 1))
			p->nat = BF_NAT_DST;
		return;
	}
	src = p->saddr, dst = p->daddr, sport = p->sport, dport = p->dport;
	if (bf_nat_is(p, n, 0)) {
		p->nat = BF_NAT_SRC;
		src = n->to, sport = n->to_port;
	} else if (bf_nat_is(p, n, 1)) {
		dst = n->to, dport = n->to_port;
	} else {
		return;
	}
	bf_ct_key_at(p, &src, sport, &dst, dport, key, from);
}

/* An ICMP error quoting a packet of a binding's reply tuple (one that went to the new
 * destination), on its way back to the packet's sender: its key becomes the connection's.
 * 1 when the error is to be translated (if the connection lives). */
static __always_inline int bf_nat_quoted(struct bf_pkt *p, struct bf_ct_key *key, __u8 *from,
					 __u8 proto, const __u32 *saddr, const __u32 *daddr,
					 __u8 *l4, void *end)
{
	struct bf_nat_entry *n;
	__u32 to;

	p->nat = 0;
	if (BF_FAMILY6(p))
		return 0;
	n = bpf_map_lookup_elem(&bf_nat, key);
	if (!n || !n->reply || daddr[0] != n->at)
		return 0;
	to = n->to;
	if (bf_nat_ports(proto)) {
		if ((void *)(l4 + 4) > end || (((__u16)l4[2] << 8) | l4[3]) != n->at_port)
			return 0;
		bf_ct_endpoints(key, from, proto, saddr, ((__u16)l4[0] << 8) | l4[1], &to,
				n->to_port, 1);
	} else if (!bf_ct_quoted_key(key, from, proto, saddr, &to, l4, end, 1)) {
		return 0;
	}
	p->nat_addr = n->to;
	p->nat_port = n->to_port;
	return 1;
}

/* DNAT: the connection's new destination (the packet's address or port where the rule
 * keeps it); the walk of this hook's nat chains ends. */
static __always_inline int bf_dnat(struct bf_pkt *p, __u32 addr, __u16 port)
{
	p->nat = BF_NAT_NEW;
	p->nat_addr = addr;
	p->nat_port = port;
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
#endif
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

/* At PREROUTING's nat place: the destination DNAT chose or the binding holds. (What the
 * packet was addressed to stays in p->ct_orig, for the binding.) */
static __always_inline void bf_nat_destination(struct bf_ctx *ctx, struct bf_pkt *p)
{
	if (bf_nat_rewrite(ctx, p, 1, p->nat_addr, p->nat_port))
		p->nat = 0;
}

/* At the end of POSTROUTING: a reply gets the address (and port) its peer sent to. */
static __always_inline void bf_nat_source(struct bf_ctx *ctx, struct bf_pkt *p)
{
	bf_nat_rewrite(ctx, p, 0, p->nat_addr, p->nat_port);
}

#ifdef BF_EGRESS
/* nf_nat_icmp_reply_translation() for an error on its way to the sender of the packet it
 * quotes: the quoted packet gets back the destination its sender used (address, port, its
 * checksums), the error comes from that address, and the ICMP checksum follows. Every
 * field changed lies at an even offset from the ICMP header: one increment each. */
static __always_inline void bf_nat_error(struct bf_ctx *ctx, struct bf_pkt *p)
{
	__u32 icmp = p->l4_off & 0xff, inner = icmp + 8, l4, to = bpf_htonl(p->nat_addr);
	__u16 sum, ip_sum, port, l4_sum, pto = bpf_htons(p->nat_port);
	struct iphdr ip;

	if (bpf_skb_load_bytes(ctx, inner, &ip, sizeof(ip)) ||
	    bpf_skb_load_bytes(ctx, icmp + 2, &sum, 2))
		return;
	ip_sum = bf_csum_replace4(ip.check, ip.daddr, to);
	sum = bf_csum_replace2(bf_csum_replace4(sum, ip.daddr, to), ip.check, ip_sum);
	l4 = inner + (ip.ihl & 0xf) * 4;
	if (bf_nat_ports(ip.protocol) && !bpf_skb_load_bytes(ctx, l4 + 2, &port, 2)) {
		__u32 at = l4 + (ip.protocol == IPPROTO_TCP ? 16 : 6);

		sum = bf_csum_replace2(sum, port, pto);
		bpf_skb_store_bytes(ctx, l4 + 2, &pto, 2, BPF_F_RECOMPUTE_CSUM);
		/* the quoted transport checksum, where the quote reaches it */
		if (!bpf_skb_load_bytes(ctx, at, &l4_sum, 2) &&
		    (ip.protocol != IPPROTO_UDP || l4_sum)) {
			__u16 c = bf_csum_replace2(bf_csum_replace4(l4_sum, ip.daddr, to), port, pto);

			if (ip.protocol == IPPROTO_UDP && !c)
				c = 0xffff;
			sum = bf_csum_replace2(sum, l4_sum, c);
			bpf_skb_store_bytes(ctx, at, &c, 2, BPF_F_RECOMPUTE_CSUM);
		}
	}
	bpf_skb_store_bytes(ctx, inner + offsetof(struct iphdr, check), &ip_sum, 2,
			    BPF_F_RECOMPUTE_CSUM);
	bpf_skb_store_bytes(ctx, inner + offsetof(struct iphdr, daddr), &to, 4,
			    BPF_F_RECOMPUTE_CSUM);
	bpf_skb_store_bytes(ctx, icmp + 2, &sum, 2, BPF_F_RECOMPUTE_CSUM);
	bf_nat_rewrite(ctx, p, 0, p->nat_addr, 0);
}
#endif

/* __nf_conntrack_confirm() of a new connection DNAT chose for: its binding's two entries
 * (the original tuple's key is the one the connection has). Global, as bf_ct_confirm():
 * its keys stay off the stack the walk uses. */
__noinline int bf_nat_bind(const struct bf_pkt *p, int verdict)
{
	struct bf_nat_entry orig = {}, reply = { .reply = 1 };
	struct bf_ct_key key = {}, rkey = {};
	__u8 from;

	if (!p || p->nat != BF_NAT_NEW || p->ct_create == sNO || verdict == BF_DROP ||
	    verdict == BF_REJECT)
		return 0;
	orig.at = reply.to = p->ct_orig[1][0];
	orig.at_port = reply.to_port = p->ct_port[1];
	orig.to = reply.at = p->daddr;
	orig.to_port = reply.at_port = p->dport;
	bf_ct_key_at(p, p->src, p->sport, p->ct_orig[1], p->ct_port[1], &key, &from);
	bf_ct_key_of(p, &rkey, &from);
	bpf_map_update_elem(&bf_nat, &key, &orig, BPF_ANY);
	bpf_map_update_elem(&bf_nat, &rkey, &reply, BPF_ANY);
	return 0;
}

#endif
#endif
