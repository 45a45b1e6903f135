/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking: the state `-m conntrack --ctstate` / `-m state --state` sees, as
 * nf_conntrack decides it.
 *
 * One entry per connection, keyed by its two endpoints in a canonical order, remembering
 * which endpoint opened it. The ingress program tracks arriving packets, the egress program
 * the host's own, which XDP never sees. Both share the map, which is pinned per namespace
 * and outlives ruleset swaps.
 *
 * As in the kernel, a packet of a known connection moves its state after the raw table's
 * rules and before the others' (NOTRACK in raw keeps a packet out), while a new connection
 * is remembered only once its first packet has walked every hook (the kernel confirms it
 * at the end of INPUT or POSTROUTING). TCP follows nf_conntrack's state table
 * (tcp_conntracks[]) and its window tracking (tcp_in_window(), SACK blocks aside).
 * Checksums are not verified for INVALID.
 */
#pragma once

/* NOTRACK sets the state whether or not the ruleset reads it. BF_CT_CONN: the states of a
 * packet that has a connection (the kernel's nf_ct_get() is not NULL), which connmark
 * reads and CONNMARK writes. */
/* With a connection's state, xt_conntrack's SNAT and DNAT bits: its source (destination)
 * was translated (IPS_SRC_NAT, IPS_DST_NAT). */
enum bf_ct_state { BF_CT_INVALID = 1, BF_CT_NEW = 2, BF_CT_RELATED = 4, BF_CT_ESTABLISHED = 8,
		   BF_CT_UNTRACKED = 16, BF_CT_CONN = 2 | 4 | 8, BF_CT_SNAT = 32, BF_CT_DNAT = 64,
		   BF_CT_NAT = 32 | 64 };

#if BF_CONNTRACK

#define BF_CT_MAX 65536
#define BF_SEC 1000000000ULL

/* nf_conntrack's TCP states; IV and IG are the table's "invalid" and "ignore". */
enum { sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2, sIV, sIG };

struct bf_ct_key {
	__u32 addr[2][4]; /* endpoint 0 sorts before endpoint 1 (struct bf_pkt's layout) */
	__u16 port[2];    /* ports; for ICMP queries the identifier */
	__u8 proto;
	__u8 family;      /* 4 or 6 */
	__u8 pad[2];
};

/* What nf_conntrack's window tracking keeps of each direction (struct ip_ct_tcp_state). */
struct bf_tcp_dir {
	__u32 end;    /* max of seq + len */
	__u32 maxend; /* max of ack + max(win, 1) */
	__u32 maxwin; /* max(win) */
	__u32 maxack; /* max of ack */
	__u8 scale;   /* window scale factor */
	__u8 flags;   /* BF_TCPF_* */
	__u8 pad[2];
};

/* IP_CT_TCP_FLAG_*, and the two bits of last_flags beyond them, with the kernel's values. */
enum { BF_TCPF_WSCALE = 0x01, BF_TCPF_SACK = 0x02, BF_TCPF_CLOSE_INIT = 0x04,
       BF_TCPF_LIBERAL = 0x08, BF_TCPF_UNACKED = 0x10, BF_TCPF_MAXACK = 0x20,
       BF_TCPF_CHALLENGE = 0x40, BF_TCPF_SIMOPEN = 0x80 };

struct bf_ct_entry {
	__u64 expires;   /* bf_now(), CLOCK_MONOTONIC */
	__u8 orig;       /* the endpoint that opened the connection */
	__u8 replied;    /* a packet went the other way (IPS_SEEN_REPLY) */
	__u8 tcp;        /* TCP state */
	__u8 assured;    /* IPS_ASSURED */
	/* proto.tcp.last_*: the last segment that moved the connection or was ignored */
	__u8 last_dir, last_kind, last_wscale, last_flags;
	__u32 mark;      /* CONNMARK's */
	__u16 last_win;
	__u8 nat;        /* BF_CT_SNAT, BF_CT_DNAT: what NAT translated */
	__u8 pad;
	__u32 last_seq, last_end, last_ack;
	struct bf_tcp_dir seen[2]; /* the original direction, the reply direction */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BF_CT_MAX);
	__type(key, struct bf_ct_key);
	__type(value, struct bf_ct_entry);
} bf_conntrack SEC(".maps");

/* Entries created: the table's occupancy falls short of it by what the LRU evicted (and
 * what was flushed, which zeroes this). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bf_ct_created SEC(".maps");

/* tcp_conntracks[direction][segment kind][state]: kinds syn, synack, fin, ack, rst, none.
 * 16 states wide, so that a state masked with 15 is a bound the verifier sees (an entry's
 * state is always one of the first 10). */
static const __u8 bf_tcp_next[2][6][16] = {
	{
		{ sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2 },
		{ sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR },
		{ sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV },
		{ sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV },
		{ sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL },
		{ sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV },
	},
	{
		{ sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2 },
		{ sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR },
		{ sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV },
		{ sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG },
		{ sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL },
		{ sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV },
	},
};

/* Timeouts count in seconds: the coarse clock (a tick's precision, no clock read) does. */
static __always_inline __u64 bf_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* nf_conntrack's default timeouts, in seconds, per TCP state. */
static const __u32 bf_tcp_timeout[16] = { 0, 120, 60, 432000, 120, 60, 30, 120, 10, 120 };

/* get_conntrack_index(): which row of the table a segment uses. */
static __always_inline __u32 bf_tcp_kind(__u8 flags)
{
	if (flags & 0x04)
		return 4;
	if (flags & 0x02)
		return (flags & 0x10) ? 1 : 0;
	if (flags & 0x01)
		return 2;
	return (flags & 0x10) ? 3 : 5;
}

/* tcp_valid_flags[]: the combinations tcp_error() lets through (ECE, CWR, PSH aside). */
static __always_inline int bf_tcp_flags_valid(__u8 flags)
{
	__u32 f = flags & ~(0x40 | 0x80 | 0x08);

	/* bits 0x02 SYN, 0x22 SYN|URG, 0x12 SYN|ACK, 0x04 RST, 0x14 RST|ACK, 0x11 FIN|ACK,
	 * 0x31 FIN|ACK|URG, 0x10 ACK, 0x30 ACK|URG */
	return f < 64 && ((0x3000400170014ULL >> f) & 1);
}

static __always_inline void bf_ct_endpoints(struct bf_ct_key *key, __u8 *from, __u8 proto,
					    const __u32 *saddr, __u16 sport, const __u32 *daddr,
					    __u16 dport, int words)
{
	int order = bf_addr_cmp(saddr, daddr, words);
	int swap = order > 0 || (order == 0 && sport > dport);

	key->proto = proto;
	key->family = words == 4 ? 6 : 4;
	bf_addr_copy(key->addr[0], swap ? daddr : saddr, words);
	bf_addr_copy(key->addr[1], swap ? saddr : daddr, words);
	key->port[0] = swap ? dport : sport;
	key->port[1] = swap ? sport : dport;
	*from = swap;
}

/* The query types nf_conntrack_proto_icmp (icmpv6) tracks, and the replies to them: echo,
 * timestamp, information, address mask; ICMPv6's echo and node information. */
static __always_inline int bf_icmp_query(__u8 type, int v6)
{
	if (v6)
		return type == 128 || type == 139;
	return type == 8 || type == 13 || type == 15 || type == 17;
}

static __always_inline int bf_icmp_answer(__u8 type, int v6)
{
	if (v6)
		return type == 129 || type == 140;
	return type == 0 || type == 14 || type == 16 || type == 18;
}

/* The errors that quote a packet: RELATED to its connection. */
static __always_inline int bf_icmp_error_type(__u8 type, int v6)
{
	if (v6)
		return type >= 1 && type <= 4;
	return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
}

/* Neighbour discovery and multicast listener messages: nf_conntrack_icmpv6 leaves them
 * untracked (noct_valid_new[]), so that no rule about connections stops them. */
static __always_inline int bf_icmp6_untracked(__u8 type)
{
	return (type >= 130 && type <= 136) || type == 143;
}

/* An ICMP query and its answer: endpoint 0 asks. Its tuple holds the query type, so a
 * query each way between two hosts is two connections, as in the kernel. */
static __always_inline void bf_ct_icmp_key(struct bf_ct_key *key, __u8 *from, __u8 type,
					   __u16 id, const __u32 *saddr, const __u32 *daddr,
					   int words)
{
	int v6 = words == 4, answer = bf_icmp_answer(type, v6);

	key->proto = v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP;
	key->family = v6 ? 6 : 4;
	bf_addr_copy(key->addr[0], answer ? daddr : saddr, words);
	bf_addr_copy(key->addr[1], answer ? saddr : daddr, words);
	key->port[0] = id;
	key->port[1] = !answer ? type : type == 0 ? 8 : type - 1;
	*from = answer;
}

/* The key of the connection of a packet of the given endpoints, and which of them sent it. */
static __always_inline void bf_ct_key_at(const struct bf_pkt *p, const __u32 *src, __u16 sport,
					 const __u32 *dst, __u16 dport, struct bf_ct_key *key,
					 __u8 *from)
{
	if (p->proto == BF_ICMP_PROTO(p)) {
		bf_ct_icmp_key(key, from, p->icmp_type, p->icmp_id, src, dst, BF_ADDR_WORDS(p));
		return;
	}
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		sport = dport = 0;
	bf_ct_endpoints(key, from, p->proto, src, sport, dst, dport, BF_ADDR_WORDS(p));
}

/* The key of the packet's connection, and which of its endpoints sent it. */
static __always_inline void bf_ct_key_of(const struct bf_pkt *p, struct bf_ct_key *key,
					 __u8 *from)
{
	bf_ct_key_at(p, p->src, p->sport, p->dst, p->dport, key, from);
}

#if BF_NAT
/* What NAT does to a packet (struct bf_pkt.nat). */
enum bf_nat_todo { BF_NAT_NEW = 1 /* DNAT chose: rewrite, and bind at confirm */,
		   BF_NAT_DST = 2 /* the binding gives the destination */,
		   BF_NAT_SRC = 4 /* the binding gives the source */,
		   BF_NAT_ERROR = 8 /* an ICMP error quoting a packet the binding rewrote */,
		   BF_NAT_SNAT = 16 /* SNAT chose (bf_snat_choice): bind at confirm */,
		   BF_NAT_REROUTE = 32 /* OUTPUT's DNAT moved it: sent on by bf_nat_reroute */,
		   BF_NAT_ERROR_SRC = 64 /* BF_NAT_ERROR's quoted source and the error's
					  * destination (else the quoted destination) */ };

/* nat.h: the packet (or the packet an ICMP error quotes) as its binding has it. */
static __always_inline void bf_nat_view(struct bf_pkt *p, struct bf_ct_key *key, __u8 *from);
static __always_inline int bf_nat_quoted(struct bf_pkt *p, struct bf_ct_key *key, __u8 *from,
					 __u8 proto, const __u32 *saddr, const __u32 *daddr,
					 __u8 *l4, void *end);
#endif

static __always_inline __u64 bf_ct_timeout(const struct bf_pkt *p, const struct bf_ct_entry *e)
{
	if (p->proto == IPPROTO_TCP)
		return (__u64)bf_tcp_timeout[e->tcp & 15] * BF_SEC;
	if (p->proto == IPPROTO_UDP)
		return (e->replied ? 120 : 30) * BF_SEC;
	if (p->proto == BF_ICMP_PROTO(p))
		return 30 * BF_SEC;
	return 600 * BF_SEC;
}

/* The state of a packet of a connection that has no live entry, and the TCP state a new
 * entry starts in (sNO: none is created). */
static __always_inline __u8 bf_ct_first(const struct bf_pkt *p, __u8 *tcp)
{
	*tcp = sNO;
	if (p->proto == IPPROTO_TCP) {
		__u8 next = bf_tcp_next[0][bf_tcp_kind(p->tcp_flags)][sNO];

		if (next == sIV)
			return BF_CT_INVALID;
		*tcp = next; /* sSS, or sES for a connection picked up mid-stream (tcp_loose) */
		return BF_CT_NEW;
	}
	if (p->proto == BF_ICMP_PROTO(p) && !bf_icmp_query(p->icmp_type, BF_FAMILY6(p)))
		return BF_CT_INVALID;
	*tcp = sES; /* any non-zero value: create one */
	return BF_CT_NEW;
}

#define bf_before(a, b) ((__s32)((__u32)(a) - (__u32)(b)) < 0)
#define bf_after(a, b) bf_before(b, a)

/* tcp_options(), one option per bpf_loop() step (a loop the verifier would otherwise walk
 * through every way the options could be laid out): window scale and SACK permitted. */
struct bf_tcp_opts {
	__u8 bytes[40];
	__u32 length, at;
	__u8 scale, found;
};

static long bf_tcp_option(__u32 n, void *ctx)
{
	struct bf_tcp_opts *o = ctx;
	__u32 at = o->at, size;
	__u8 kind;

	if (at >= o->length || at >= 39)
		return 1;
	kind = o->bytes[at];
	if (kind == 0) /* end of options */
		return 1;
	if (kind == 1) { /* no-operation */
		o->at = at + 1;
		return 0;
	}
	size = o->bytes[at + 1];
	if (size < 2 || size > o->length - at)
		return 1;
	if (kind == 4 && size == 2) {
		o->found |= BF_TCPF_SACK;
	} else if (kind == 3 && size == 3 && at < 38) {
		o->scale = o->bytes[at + 2] > 14 ? 14 : o->bytes[at + 2];
		o->found |= BF_TCPF_WSCALE;
	}
	o->at = at + size;
	return 0;
}

/* A SYN's options into p->tcp_wscale and p->tcp_optflags. */
static __always_inline void bf_tcp_options(struct bf_ctx *ctx, struct bf_pkt *p)
{
	struct bf_tcp_opts o = {};
	__u32 length = p->tcp_doff * 4 - 20;

	if (length < 1 || length > 40)
		return;
	o.length = length;
	if (bf_load_bytes(ctx, p->l4_off + 20, o.bytes, length))
		return;
	bpf_loop(20, bf_tcp_option, &o, 0);
	p->tcp_wscale = o.scale;
	p->tcp_optflags = o.found;
}

/* tcp_options() into a direction's state (which a SYN without options leaves alone). */
static __always_inline void bf_tcp_take_options(struct bf_tcp_dir *d, const struct bf_pkt *p)
{
	if (p->tcp_doff <= 5)
		return;
	d->scale = p->tcp_wscale;
	d->flags = (d->flags & BF_TCPF_LIBERAL) | p->tcp_optflags;
}

/* tcp_init_sender(): a SYN/ACK, or a SYN from the reply direction. */
static __always_inline void bf_tcp_init_sender(struct bf_tcp_dir *s, struct bf_tcp_dir *r,
					       const struct bf_pkt *p, __u32 end, __u32 dir)
{
	s->end = s->maxend = end;
	s->maxwin = p->tcp_win ? p->tcp_win : 1;
	bf_tcp_take_options(s, p);
	/* RFC 1323: scaling only when both sides offered it. */
	if (dir && !(s->flags & BF_TCPF_WSCALE && r->flags & BF_TCPF_WSCALE)) {
		s->scale = 0;
		r->scale = 0;
	}
}

enum { BF_TCP_ACCEPT, BF_TCP_IGNORE, BF_TCP_INVALID };

/* nf_tcp_log_invalid(): a connection picked up mid-stream lets everything through. */
static __always_inline int bf_tcp_refuse(const struct bf_tcp_dir *s, int result)
{
	return s->flags & BF_TCPF_LIBERAL ? BF_TCP_ACCEPT : result;
}

static __always_inline __u32 bf_maxackwin(const struct bf_tcp_dir *s)
{
	return s->maxwin > 66000 ? s->maxwin : 66000; /* MAXACKWINDOW() */
}

/* tcp_in_window() (SACK blocks aside: the ack alone bounds what was acknowledged). */
static __always_inline int bf_tcp_window(const struct bf_pkt *p, struct bf_ct_entry *e,
					 __u32 dir, __u32 kind, __u32 end)
{
	struct bf_tcp_dir *s = &e->seen[dir & 1], *r = &e->seen[!(dir & 1)];
	__u32 seq = p->tcp_seq, ack = p->tcp_ack, sack = ack, win = p->tcp_win, swin;
	__u8 flags = p->tcp_flags; /* FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10 */

	if (s->maxwin == 0) {
		if (flags & 0x02) {
			bf_tcp_init_sender(s, r, p, end, dir);
			if (!(flags & 0x10))
				return BF_TCP_ACCEPT; /* simultaneous open */
		} else {
			/* Picked up mid-stream: take what the segment says. */
			s->end = end;
			swin = win << (s->scale & 15);
			s->maxwin = swin ? swin : 1;
			s->maxend = end + s->maxwin;
			if (r->maxwin == 0)
				r->end = r->maxend = sack;
			else if (sack == r->end + 1)
				r->end++; /* likely the answer to a keep-alive */
		}
	} else if ((flags & 0x02) && bf_after(end, s->end) && (e->tcp == sSS || e->tcp == sSR)) {
		bf_tcp_init_sender(s, r, p, end, dir); /* a SYN again, with larger numbers */
		if (dir && !(flags & 0x10))
			return BF_TCP_ACCEPT;
	}
	if (!(flags & 0x10) || ((flags & 0x14) == 0x14 && ack == 0))
		ack = sack = r->end; /* no ACK, or a broken stack's RST/ACK with ack 0 */
	if ((flags & 0x04) && seq == 0 && e->tcp == sSS)
		seq = end = s->end; /* a RST answering a SYN */
	if (!bf_before(seq, s->maxend + 1)) {
		__u32 overshot = end - s->maxend + 1;

		if (r->maxwin && bf_after(end, s->end - r->maxwin - 1) &&
		    bf_after(sack, r->end - bf_maxackwin(s) - 1) && overshot <= r->maxwin &&
		    bf_before(sack, r->end + 1)) {
			/* more than the window allows, but acknowledgeable */
			s->end = end;
			s->flags |= BF_TCPF_UNACKED;
			return bf_tcp_refuse(s, BF_TCP_IGNORE);
		}
		return bf_tcp_refuse(s, BF_TCP_INVALID); /* beyond the receiver's window */
	}
	if (!bf_before(sack, r->end + 1))
		return bf_tcp_refuse(s, BF_TCP_INVALID); /* acknowledges what was never sent */
	if (r->maxwin && !bf_after(end, s->end - r->maxwin - 1))
		return bf_tcp_refuse(s, BF_TCP_IGNORE); /* old data again */
	if (!bf_after(sack, r->end - bf_maxackwin(s) - 1))
		return bf_tcp_refuse(s, BF_TCP_IGNORE); /* a very late acknowledgement */
	if (!(flags & 0x02))
		win <<= s->scale & 15;
	swin = win + (sack - ack);
	if (s->maxwin < swin)
		s->maxwin = swin;
	if (bf_after(end, s->end)) {
		s->end = end;
		s->flags |= BF_TCPF_UNACKED;
	}
	if (flags & 0x10) {
		if (!(s->flags & BF_TCPF_MAXACK)) {
			s->maxack = ack;
			s->flags |= BF_TCPF_MAXACK;
		} else if (bf_after(ack, s->maxack)) {
			s->maxack = ack;
		}
	}
	if (r->maxwin != 0 && bf_after(end, s->maxend))
		r->maxwin += end - s->maxend;
	if (bf_after(sack + win, r->maxend - 1)) {
		r->maxend = sack + win;
		if (win == 0)
			r->maxend++;
	}
	if (ack == r->end)
		r->flags &= ~BF_TCPF_UNACKED;
	if (kind == 3) { /* what the retransmission count compares (the count: timeouts) */
		e->last_dir = dir;
		e->last_seq = seq;
		e->last_ack = ack;
		e->last_end = end;
		e->last_win = p->tcp_win;
	}
	return BF_TCP_ACCEPT;
}

/* nf_ct_tcp_state_reset() */
static __always_inline void bf_tcp_dir_reset(struct bf_tcp_dir *d)
{
	d->end = d->maxend = d->maxwin = d->maxack = 0;
	d->scale = 0;
	d->flags &= BF_TCPF_LIBERAL;
}

/* nf_conntrack_tcp_packet() on a segment of a known connection: move the entry; 0 when the
 * segment is invalid, 1 when it is let through without moving it, 2 when it reopens a
 * closed connection (the entry is dropped and the segment starts a new one), 3 when it
 * moved the entry. Global: the verifier checks its many branches once, not once per
 * path of the caller. */
__noinline int bf_tcp_follow(const struct bf_pkt *p, struct bf_ct_entry *e, __u32 dir)
{
	__u32 kind, old, end;
	__u8 next;
	int result;

	if (!p || !e)
		return 0;
	kind = bf_tcp_kind(p->tcp_flags);
	old = e->tcp & 15;
	end = bf_tcp_end(p);
	next = bf_tcp_next[dir & 1][kind][old];
	switch (next) {
	case sSS:
		if (old < sTW)
			break;
		if (((e->seen[0].flags | e->seen[1].flags) & BF_TCPF_CLOSE_INIT) ||
		    (e->last_dir == dir && e->last_kind == 4))
			return 2;
		/* fall through: ignored */
	case sIG:
		if (kind == 1 && e->last_kind == 0 && e->last_dir != dir &&
		    p->tcp_ack == e->last_end) {
			/* A SYN/ACK to a SYN that was ignored: both ends agree, get in step with
			 * them from what the SYN said. */
			struct bf_tcp_dir *syn = &e->seen[e->last_dir & 1];

			old = sSS;
			next = sSR;
			syn->end = syn->maxend = e->last_end;
			syn->maxwin = e->last_win ? e->last_win : 1;
			syn->scale = e->last_wscale;
			e->last_flags &= ~BF_TCPF_CHALLENGE;
			syn->flags = e->last_flags;
			bf_tcp_dir_reset(&e->seen[dir & 1]);
			break;
		}
		e->last_kind = kind;
		e->last_dir = dir;
		e->last_seq = p->tcp_seq;
		e->last_end = end;
		e->last_win = p->tcp_win;
		if (kind == 0 && dir == 0) {
			e->last_flags = p->tcp_optflags;
			e->last_wscale = p->tcp_wscale;
			if (old == sLA) /* the answer may be a challenge ACK (RFC 5961) */
				e->last_flags |= BF_TCPF_CHALLENGE;
		}
		if (old == sSS && kind == 3 && dir)
			e->last_ack = p->tcp_ack; /* a challenge ACK answering the SYN */
		return 1;
	case sIV:
		return 0;
	case sTW:
		if (old == sLA && kind == 3 && e->last_dir != dir && e->last_kind == 0 &&
		    (e->last_flags & BF_TCPF_CHALLENGE)) {
			e->last_flags &= ~BF_TCPF_CHALLENGE; /* a challenge ACK, not the last one */
			return 1;
		}
		break;
	case sS2:
		e->last_flags |= BF_TCPF_SIMOPEN;
		break;
	case sSR:
		if (dir && kind == 3 && (e->last_flags & BF_TCPF_SIMOPEN))
			next = sES;
		break;
	case sCL:
		if (kind != 4)
			break;
		if (old == sFW || old == sCW || old == sLA || old == sTW || old == sCL)
			goto moved; /* closing already: nothing left to check it against */
		if ((e->seen[!(dir & 1)].flags & BF_TCPF_MAXACK) && e->last_kind != 0) {
			__u32 maxack = e->seen[!(dir & 1)].maxack, seq = p->tcp_seq;
			int established = old == sES && e->assured;

			if (seq == 0 && !established)
				break;
			if (bf_before(seq, maxack))
				return 0; /* a reset from before what was acknowledged */
			if (!established || seq == maxack)
				break;
			if (e->last_kind == 3 && e->last_dir == dir && seq == e->last_end)
				break; /* the reset that follows the data */
			next = old; /* inexact: wait for a challenge ACK */
		}
		if (((e->replied && e->last_kind == 0) || (!e->assured && e->last_kind == 3)) &&
		    p->tcp_ack == e->last_end)
			goto moved; /* a reset to a SYN or ACK let through unchecked */
		if (old == sSS && e->last_kind == 3 && e->last_dir == 1 && p->tcp_seq == e->last_ack)
			goto moved; /* a reset to a challenge ACK */
		break;
	}
	result = bf_tcp_window(p, e, dir, kind, end);
	if (result == BF_TCP_IGNORE)
		return 1;
	if (result == BF_TCP_INVALID)
		return 0;
moved:
	e->last_kind = kind;
	e->last_dir = dir;
	if (next != old && next == sFW)
		e->seen[dir & 1].flags |= BF_TCPF_CLOSE_INIT;
	if (e->replied && !e->assured && (old == sSR || old == sES) && next == sES)
		e->assured = 1;
	e->tcp = next;
	return 3;
}

/* A packet of a connection with a live entry: its state (decided, as in the kernel, by
 * its direction and by whether an answer was seen before it), or 0 when it opens a new
 * connection in the entry's place. Moves the entry. */
static __always_inline __u8 bf_ct_follow(const struct bf_pkt *p, struct bf_ct_entry *e,
					 __u8 from, __u64 now)
{
	__u32 dir = from != e->orig;
	__u8 state = dir || e->replied ? BF_CT_ESTABLISHED : BF_CT_NEW;
	__u64 expires;

	if (p->proto == IPPROTO_TCP) {
		int moved = bf_tcp_follow(p, e, dir);

		if (moved == 0)
			return BF_CT_INVALID;
		if (moved == 2)
			return 0;
		if (moved == 3 && !e->replied && (p->tcp_flags & 0x04)) {
			/* "If only reply is a RST": no connection, the entry goes (now: when
			 * the RST is seen again, at egress, its binding still holds for it) */
			e->expires = now;
			return state;
		}
	} else if (p->proto == BF_ICMP_PROTO(p)) {
		int v6 = BF_FAMILY6(p);

		if (dir ? !bf_icmp_answer(p->icmp_type, v6) : !bf_icmp_query(p->icmp_type, v6))
			return BF_CT_INVALID;
	}
	if (dir && !e->replied)
		e->replied = 1;
	/* Written only when it moves: a cache line every CPU of a busy flow would share. */
	expires = now + bf_ct_timeout(p, e);
	if (expires != e->expires)
		e->expires = expires;
	return state;
}

/* What `--ctdir`, `--ctorigsrc` and kin compare: the connection's original endpoints,
 * and the way the packet goes. */
static __always_inline void bf_ct_note(struct bf_pkt *p, const struct bf_ct_key *key,
				       __u8 orig, __u8 dir)
{
	bf_addr_copy(p->ct_orig[0], key->addr[orig ? 1 : 0], 4);
	bf_addr_copy(p->ct_orig[1], key->addr[orig ? 0 : 1], 4);
	p->ct_proto = key->proto;
	if (key->proto == IPPROTO_ICMP || key->proto == IPPROTO_ICMPV6) {
		p->ct_port[0] = key->port[0];
		p->ct_port[1] = key->port[1] << 8;
	} else {
		p->ct_port[0] = orig ? key->port[1] : key->port[0];
		p->ct_port[1] = orig ? key->port[0] : key->port[1];
	}
	p->ct_dir = dir;
}

/* The key of the connection of a packet an ICMP error quotes: its addresses (`saddr`,
 * `daddr`), protocol, and transport header at `l4`. 0 if what it needs is not there. */
static __always_inline int bf_ct_quoted_key(struct bf_ct_key *key, __u8 *from, __u8 proto,
					    const __u32 *saddr, const __u32 *daddr, __u8 *l4,
					    void *end, int words)
{
	__u16 sport = 0, dport = 0;

	if (proto == (words == 4 ? IPPROTO_ICMPV6 : IPPROTO_ICMP)) {
		if ((void *)(l4 + 6) > end)
			return 0;
		bf_ct_icmp_key(key, from, l4[0], ((__u16)l4[4] << 8) | l4[5], saddr, daddr,
			       words);
		return 1;
	}
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		if ((void *)(l4 + 4) > end)
			return 0;
		sport = ((__u16)l4[0] << 8) | l4[1];
		dport = ((__u16)l4[2] << 8) | l4[3];
	}
	bf_ct_endpoints(key, from, proto, saddr, sport, daddr, dport, words);
	return 1;
}

/* RELATED: an ICMP error quoting a packet of a live connection, sent to that packet's
 * source (nf_conntrack_inet_error()). It goes the other way from the packet it quotes.
 * (An IPv6 packet quoted with extension headers is not followed: INVALID.) Global: its
 * key is not on the stack bf_ct_track() adds to the chains'. */
__noinline int bf_ct_related(struct bf_ctx *ctx, struct bf_pkt *p)
{
	void *end = (void *)(long)ctx->data_end, *quoted;
	struct bf_ct_key key = {};
	struct bf_ct_entry *e;
	__u32 saddr[4] = {}, daddr[4] = {};
	__u8 *l4, from, proto;
	int words, translated = 0;

	if (!p)
		return BF_CT_INVALID;
	words = BF_ADDR_WORDS(p);
	/* l4_off < 256: a bound kept */
	quoted = (void *)(long)ctx->data + (p->l4_off & 0xff) + 8;
	asm volatile("" : "+r"(quoted));
	if (BF_FAMILY6(p)) {
		struct ipv6hdr *inner = quoted;

		if ((void *)(inner + 1) > end)
			return BF_CT_INVALID;
		bf_ip6_host(saddr, inner->saddr.in6_u.u6_addr32);
		bf_ip6_host(daddr, inner->daddr.in6_u.u6_addr32);
		proto = inner->nexthdr;
		l4 = (__u8 *)(inner + 1);
	} else {
		struct iphdr *inner = quoted;

		if ((void *)(inner + 1) > end || inner->ihl < 5)
			return BF_CT_INVALID;
		saddr[0] = bpf_ntohl(inner->saddr);
		daddr[0] = bpf_ntohl(inner->daddr);
		proto = inner->protocol;
		l4 = (__u8 *)inner + (inner->ihl & 0xf) * 4;
	}
	asm volatile("" : "+r"(l4));
	if (bf_addr_cmp(saddr, p->dst, words) != 0 ||
	    !bf_ct_quoted_key(&key, &from, proto, saddr, daddr, l4, end, words))
		return BF_CT_INVALID;
#if BF_NAT
	translated = bf_nat_quoted(p, &key, &from, proto, saddr, daddr, l4, end);
#endif
	e = bpf_map_lookup_elem(&bf_conntrack, &key);
	if (!e || e->expires <= bf_now())
		return BF_CT_INVALID;
#if BF_NAT
	p->nat = translated;
#endif
	bf_ct_note(p, &key, e->orig, from == e->orig);
	p->ct_mark = e->mark;
	return BF_CT_RELATED | e->nat;
}

/* nf_conntrack's tcp_error(), udp_error() and icmp_error() at PREROUTING, with
 * nf_conntrack_checksum on: a transport checksum that does not hold makes the packet
 * INVALID. UDP without a checksum holds; a NIC's verified one (at TC) is taken as it is
 * (at XDP none is known); a first fragment's stands for a datagram the kernel checks
 * once reassembled (taken as good); OUTPUT's packets are not checked. */
static __always_inline int bf_ct_bad_checksum(struct bf_ctx *ctx, const struct bf_pkt *p)
{
#ifdef BF_EGRESS
	return 0;
#else
	struct bf_sysctl *sys = bf_settings();
	__u64 pseudo = 0;

	if (!sys || !sys->ct_checksum || p->l4_off > 0xff || p->more_frags)
		return 0;
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->proto != BF_ICMP_PROTO(p))
		return 0;
#ifdef BF_TC
	if (bpf_csum_level(ctx, BPF_CSUM_LEVEL_QUERY) >= 0)
		return 0;
#endif
	if (p->proto != IPPROTO_ICMP)
		pseudo = bf_pseudo_sum(p, p->proto, p->l4_len);
	return !bf_l4_checksum_ok(ctx, p->l4_off | (p->proto << 8) | (p->l4_len << 16), pseudo);
#endif
}

/* 1: an ICMP error, for bf_ct_related(). */
static __always_inline int bf_ct_classify(struct bf_ctx *ctx, struct bf_pkt *p)
{
	struct bf_ct_key key = {};
	struct bf_ct_entry *e;
	__u64 now = bf_now();
	__u8 from, state;

	p->ct_create = sNO;
	if (p->proto == IPPROTO_TCP && (p->l4_len < 20 || p->tcp_doff < 5 ||
					p->tcp_doff * 4 > p->l4_len ||
					!bf_tcp_flags_valid(p->tcp_flags))) {
		p->ct_state = BF_CT_INVALID;
		return 0;
	}
	if ((p->proto == IPPROTO_UDP && p->l4_len < 8) ||
	    (p->proto == BF_ICMP_PROTO(p) && p->l4_len < 8) || p->l4_unknown ||
	    bf_ct_bad_checksum(ctx, p)) {
		p->ct_state = BF_CT_INVALID;
		return 0;
	}
	if (p->proto == BF_ICMP_PROTO(p)) {
		if (bf_icmp_error_type(p->icmp_type, BF_FAMILY6(p)))
			return 1;
		if (BF_FAMILY6(p) && bf_icmp6_untracked(p->icmp_type)) {
			p->ct_state = BF_CT_UNTRACKED;
			return 0;
		}
	}

	bf_ct_key_of(p, &key, &from);
#if BF_NAT
	bf_nat_view(p, &key, &from);
#endif
	e = bpf_map_lookup_elem(&bf_conntrack, &key);
	if (e && e->expires > now) {
		__u8 orig = e->orig;

		state = bf_ct_follow(p, e, from, now);
		if (state) {
			p->ct_state = state | e->nat;
			p->ct_mark = e->mark;
			bf_ct_note(p, &key, orig, from != orig);
			return 0;
		}
	}
#if BF_NAT
	/* A new connection: a binding its tuple had belonged to one gone. Only a reply that
	 * just ended its connection (a RST, tracked at ingress and again at egress) is still
	 * translated, as the kernel translates the packet that kills its connection. */
	if (p->nat) {
		if (p->nat != BF_NAT_SRC || !e || e->expires + BF_SEC <= now)
			p->nat = 0;
		bf_ct_key_of(p, &key, &from);
	}
#endif
	p->ct_state = bf_ct_first(p, &p->ct_create);
	bf_ct_note(p, &key, from, 0); /* a new connection: this packet's way is the original */
	return 0;
}

/* nf_conntrack_in() for a packet: sets p->ct_state (and what --ctdir and kin read),
 * moves a known connection, and leaves in p->ct_create the TCP state of an entry to create
 * if the packet is let through. Global functions, like the two below: their keys and
 * entries stay off the stack of the program, which the classifier's walk shares. 1: an
 * ICMP error, which bf_ct_track() hands to bf_ct_related(). */
__noinline int bf_ct_lookup(struct bf_ctx *ctx, struct bf_pkt *p)
{
	if (!p)
		return 0;
	/* nf_ct_attach(): the kernel's reply to a packet it REJECTs carries that packet's
	 * connection, unconfirmed as it may be, as RELATED. */
	if (p->ct_attached) {
		p->ct_state = BF_CT_RELATED;
		return 0;
	}
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & 0x02) && p->tcp_doff > 5 &&
	    p->tcp_doff * 4 <= p->l4_len)
		bf_tcp_options(ctx, p);
	return bf_ct_classify(ctx, p);
}

/* The two global functions called one after the other, so that their frames never stack
 * (with IPv6 at TC the program's own frame leaves no room for both). */
static __always_inline void bf_ct_track(struct bf_ctx *ctx, struct bf_pkt *p)
{
	if (bf_ct_lookup(ctx, p) == 1)
		p->ct_state = bf_ct_related(ctx, p);
}

/* tcp_new(), and the new connection's first segment through tcp_in_window(): done when
 * the connection is confirmed, as nothing of it outlives the packet before. */
static __always_inline void bf_tcp_new(const struct bf_pkt *p, struct bf_ct_entry *e)
{
	struct bf_tcp_dir *s = &e->seen[0];
	__u32 end = bf_tcp_end(p);

	s->end = end;
	s->maxwin = p->tcp_win ? p->tcp_win : 1;
	if (p->ct_create == sSS) {
		s->maxend = end;
		bf_tcp_take_options(s, p);
	} else {
		/* Picked up mid-stream: the window is a guess, so every check gives way. */
		s->maxend = end + s->maxwin;
		e->seen[0].flags = e->seen[1].flags = BF_TCPF_SACK | BF_TCPF_LIBERAL;
	}
	bf_tcp_window(p, e, 0, bf_tcp_kind(p->tcp_flags), end);
}

/* The key of the packet's connection from what bf_ct_note() kept of it (for an ICMP error,
 * the connection it quotes). */
static __always_inline void bf_ct_conn_key(const struct bf_pkt *p, struct bf_ct_key *key)
{
	__u8 from;

	if (p->ct_proto == BF_ICMP_PROTO(p)) {
		key->proto = p->ct_proto;
		key->family = BF_FAMILY6(p) ? 6 : 4;
		bf_addr_copy(key->addr[0], p->ct_orig[0], 4);
		bf_addr_copy(key->addr[1], p->ct_orig[1], 4);
		key->port[0] = p->ct_port[0];
		key->port[1] = p->ct_port[1] >> 8;
		return;
	}
	bf_ct_endpoints(key, &from, p->ct_proto, p->ct_orig[0], p->ct_port[0], p->ct_orig[1],
			p->ct_port[1], BF_ADDR_WORDS(p));
}

/* __nf_conntrack_confirm(): the packet was let through, remember its new connection. (Not
 * after a REJECT: the kernel's reset or ICMP error carries the connection in the reply
 * direction, and __nf_conntrack_confirm() does not confirm from there.) A known
 * connection whose mark CONNMARK changed keeps it, whatever the verdict: the kernel
 * writes it at once. */
__noinline int bf_ct_confirm(const struct bf_pkt *p, int verdict)
{
	struct bf_ct_key key = {};
	struct bf_ct_entry e = {};
	__u8 from;

	if (!p)
		return 0;
	if (p->ct_create == sNO) {
		struct bf_ct_entry *known;

		if (!p->ct_mark_set)
			return 0;
		bf_ct_conn_key(p, &key);
		known = bpf_map_lookup_elem(&bf_conntrack, &key);
		if (known)
			known->mark = p->ct_mark;
		return 0;
	}
	if (verdict == BF_DROP || verdict == BF_REJECT)
		return 0;
#if BF_NAT
	if (p->nat & BF_NAT_NEW) /* the tuple it came with */
		bf_ct_key_at(p, p->src, p->sport, p->ct_orig[1], p->ct_port[1], &key, &from);
	else
#endif
	bf_ct_key_of(p, &key, &from);
	e.orig = from;
	e.mark = p->ct_mark;
	e.nat = p->ct_state & BF_CT_NAT;
	if (p->proto == IPPROTO_TCP)
		bf_tcp_new(p, &e);
	e.tcp = p->ct_create;
	e.last_kind = bf_tcp_kind(p->tcp_flags);
	e.expires = bf_now() + bf_ct_timeout(p, &e);
	if (bpf_map_update_elem(&bf_conntrack, &key, &e, BPF_NOEXIST) == 0) {
		__u32 zero = 0;
		__u64 *created = bpf_map_lookup_elem(&bf_ct_created, &zero);

		if (created)
			*created += 1;
	} else {
		bpf_map_update_elem(&bf_conntrack, &key, &e, BPF_ANY); /* over an expired one */
	}
	return 0;
}

#endif
