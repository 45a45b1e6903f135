/* SPDX-License-Identifier: GPL-2.0 */
/* The classifier: chains turned into data (bpfilter/passes/classify.py), walked by this
 * fixed code, whatever the number of rules.
 *
 * Entries are numbered across all classified chains; a segment is the range of one chain's
 * entries. For each of five packet fields a lookup gives a class, and each class a bitset
 * over all entries: those whose match on that field holds. A sixth bitset, chosen by the
 * L4 header length, holds the entries whose protocol match the packet is too short for
 * (the kernel drops such a packet when it tries that rule). The lowest bit set in
 *     proto & saddr & daddr & ((sport & dport) | short)
 * from the current position on is the next rule iptables would try; its remaining checks
 * (interface, TCP flags, length, TTL, limit) and its target come from its entry.
 *
 * Everything is indexed by generation, like the folded runs (see bpfilter.h). */
#pragma once

#if BF_CLS_ENTRIES

#define BF_CLS_PORTS 65537 /* every port, then "no ports readable" */
#define BF_CLS_NO_PORTS 65536
#define BF_CLS_SCAN 32 /* words one step scans (the verifier checks the loop once) */
#define BF_CLS_NEED_TCP 20 /* the L4 bytes -m tcp reads (passes/classify.py: _L4_NEEDS) */

enum bf_cls_action {
	BF_ACT_NONE, BF_ACT_ACCEPT, BF_ACT_DROP, BF_ACT_REJECT, BF_ACT_RETURN, BF_ACT_JUMP,
	BF_ACT_GOTO, BF_ACT_LOG,
};

enum bf_cls_check {
	BF_CHK_IFACE = 1, BF_CHK_IFACE_NEG = 2, BF_CHK_FLAGS = 4, BF_CHK_FLAGS_NEG = 8,
	BF_CHK_LEN = 16, BF_CHK_LEN_NEG = 32, BF_CHK_TTL_NEG = 64, BF_CHK_LIMIT = 128,
};

enum bf_cls_fold { BF_FOLD_NONE, BF_FOLD_PREFIX_SRC, BF_FOLD_PREFIX_DST, BF_FOLD_EXACT_SRC,
		   BF_FOLD_EXACT_DST };

enum bf_cls_ttl { BF_TTL_NONE, BF_TTL_EQ, BF_TTL_LT, BF_TTL_GT };

/* Layout shared with bpfilter/codegen/classifier.py (ENTRY_FORMAT). */
struct bf_entry {
	__u32 slot;      /* counter slot; for a folded run, the run number */
	__u32 fold_mask; /* a folded run's address mask, for the exact lookup */
	__u32 target;    /* the segment a jump or goto enters */
	__u32 limit;     /* limit bucket */
	__u64 limit_cost, limit_burst;
	__u16 len_low, len_high;
	__u8 action, reject_with, need, checks;
	__u8 ifbit, tcp_mask, tcp_comp, ttl_op, ttl_value, fold;
	__u8 ct_states, ct_negate; /* a connection-state match: enum bf_ct_state bits, or 0 */
};

struct bf_segment {
	__u32 start, end; /* entries [start, end) */
};

struct bf_bits {
	__u64 w[BF_CLS_WORDS];
};

struct bf_cls_addr_key {
	__u32 prefixlen; /* 32 (the generation) + the prefix length */
	__u32 gen;
	__be32 addr;
};

/* Arrays and tries of two generations: value per index, class per prefix. */
#define BF_CLS_ARRAY(name, rows, value_type)			\
	struct {						\
		__uint(type, BPF_MAP_TYPE_ARRAY);		\
		__uint(max_entries, 2 * (rows));		\
		__type(key, __u32);				\
		__type(value, value_type);			\
	} name SEC(".maps")
#define BF_CLS_TRIE(name) \
	BF_LPM_TRIE(name, 2 * BF_CLS_PREFIXES, struct bf_cls_addr_key, __u32)

BF_CLS_ARRAY(bf_cls_bits, BF_CLS_CLASSES, struct bf_bits);
BF_CLS_ARRAY(bf_cls_proto, 256, __u32);
BF_CLS_ARRAY(bf_cls_sport, BF_CLS_PORTS, __u32);
BF_CLS_ARRAY(bf_cls_dport, BF_CLS_PORTS, __u32);
BF_CLS_TRIE(bf_cls_saddr);
BF_CLS_TRIE(bf_cls_daddr);
BF_CLS_ARRAY(bf_cls_entries, BF_CLS_ENTRIES, struct bf_entry);
BF_CLS_ARRAY(bf_cls_segments, BF_CLS_SEGMENTS, struct bf_segment);

struct bf_frame {
	__u32 pos, end;
};

/* The walk's state, shared with the bpf_loop callback. The steps are global functions,
 * which the verifier checks once on their own instead of along every path into them;
 * that needs the packet in here by value (a global function cannot follow a pointer
 * read from memory). */
struct bf_walk {
	struct bf_pkt pkt;
	__u32 cls[6]; /* bf_cls_bits indexes: proto, saddr, daddr, sport, dport, short */
	__u32 pos, end, depth, gone; /* gone: a goto left the chain the walk started in */
	__u32 candidate;              /* an entry to try next, plus one; 0: none */
	int result;
	struct bf_frame frames[BF_CLS_DEPTH];
};

static __always_inline __u32 bf_ctz(__u64 x)
{
	__u32 n = 0;

	if (!(x & 0xffffffffULL)) { n += 32; x >>= 32; }
	if (!(x & 0xffff)) { n += 16; x >>= 16; }
	if (!(x & 0xff)) { n += 8; x >>= 8; }
	if (!(x & 0xf)) { n += 4; x >>= 4; }
	if (!(x & 0x3)) { n += 2; x >>= 2; }
	if (!(x & 0x1)) { n += 1; }
	return n;
}

static __always_inline __u32 bf_cls_class(void *map, __u32 index)
{
	__u32 *cls = bpf_map_lookup_elem(map, &index);

	return cls ? *cls : 0;
}

static __always_inline __u32 bf_cls_addr(void *map, __u32 gen, __u32 addr)
{
	struct bf_cls_addr_key key = { .prefixlen = 64, .gen = gen, .addr = bpf_htonl(addr) };
	__u32 *cls = bpf_map_lookup_elem(map, &key);

	return cls ? *cls : 0;
}

/* Enter a segment; 0 when it does not exist. */
static __always_inline int bf_cls_enter(struct bf_walk *w, __u32 segment)
{
	__u32 key = w->pkt.gen * BF_CLS_SEGMENTS + segment;
	struct bf_segment *s = bpf_map_lookup_elem(&bf_cls_segments, &key);

	if (!s)
		return 0;
	w->pos = s->start;
	w->end = s->end;
	return 1;
}

/* Back to the chain that jumped (the rule after the jump), or out of the walk. */
static __always_inline long bf_cls_return(struct bf_walk *w, int finished)
{
	__u32 d = w->depth;

	if (d == 0 || d > BF_CLS_DEPTH) {
		w->result = finished;
		return 1;
	}
	d--;
	w->depth = d;
	w->pos = w->frames[d].pos;
	w->end = w->frames[d].end;
	return 0;
}

static __always_inline int bf_cls_checks(const struct bf_entry *e, const struct bf_pkt *p)
{
	__u8 c = e->checks;

	if ((c & BF_CHK_FLAGS) &&
	    ((p->tcp_flags & e->tcp_mask) == e->tcp_comp) == !!(c & BF_CHK_FLAGS_NEG))
		return 0;
	if ((c & BF_CHK_LEN) &&
	    (p->len >= e->len_low && p->len <= e->len_high) == !!(c & BF_CHK_LEN_NEG))
		return 0;
	if (e->ttl_op) {
		int hit = e->ttl_op == BF_TTL_EQ ? p->ttl == e->ttl_value :
			  e->ttl_op == BF_TTL_LT ? p->ttl < e->ttl_value : p->ttl > e->ttl_value;

		if (hit == !!(c & BF_CHK_TTL_NEG))
			return 0;
	}
	if (e->ct_states && !!(p->ct_state & e->ct_states) == e->ct_negate)
		return 0;
	return 1;
}

/* Try entry `index`, a candidate: 1 when the walk is over (w->result set). */
__noinline long bf_cls_try(struct bf_walk *w, __u32 index)
{
	struct bf_pkt *p;
	__u32 key, slot;
	struct bf_entry *e;
	__u32 *hit;

	if (!w)
		return 1;
	p = &w->pkt;
	key = p->gen * BF_CLS_ENTRIES + index;
	e = bpf_map_lookup_elem(&bf_cls_entries, &key);
	if (!e) {
		w->result = BF_DROP;
		return 1;
	}
	if ((e->checks & BF_CHK_IFACE) &&
	    ((p->ifbits >> (e->ifbit & 63)) & 1) == !!(e->checks & BF_CHK_IFACE_NEG))
		return 0;
	slot = e->slot;
	if (e->fold) {
		__u32 addr = (e->fold == BF_FOLD_PREFIX_SRC || e->fold == BF_FOLD_EXACT_SRC) ?
			     p->saddr : p->daddr;

		hit = e->fold >= BF_FOLD_EXACT_SRC ? bf_exact_lookup(p, slot, addr & e->fold_mask) :
						     bf_prefix_lookup(p, slot, addr);
		if (!hit)
			return 0;
		slot = *hit;
	}
	if (e->need && p->frag_off) {
		/* A later fragment has no transport header: the protocol's match does not hold
		 * (tcp's drops the packet at offset 1: a flag overwrite, xt_tcp says). */
		if (p->frag_off == 1 && e->need == BF_CLS_NEED_TCP) {
			w->result = BF_DROP;
			return 1;
		}
		return 0;
	}
	if (e->need > p->l4_len) {
		w->result = BF_DROP; /* the kernel's hotdrop */
		return 1;
	}
	if (!bf_cls_checks(e, p))
		return 0;
	if ((e->checks & BF_CHK_LIMIT) && !bf_limit(p, e->limit, e->limit_cost, e->limit_burst))
		return 0;
	bf_count(slot, p);
	switch (e->action) {
	case BF_ACT_ACCEPT:
		w->result = BF_ACCEPT;
		return 1;
	case BF_ACT_DROP:
		w->result = BF_DROP;
		return 1;
	case BF_ACT_REJECT:
		p->reject_with = e->reject_with;
		w->result = BF_REJECT;
		return 1;
	case BF_ACT_RETURN:
		return bf_cls_return(w, BF_CONTINUE);
	case BF_ACT_JUMP: {
		__u32 d = w->depth;

		if (d >= BF_CLS_DEPTH) {
			w->result = BF_DROP;
			return 1;
		}
		w->frames[d].pos = w->pos;
		w->frames[d].end = w->end;
		w->depth = d + 1;
		break;
	}
	case BF_ACT_GOTO:
		if (w->depth == 0)
			w->gone = 1;
		break;
	case BF_ACT_LOG:
		bf_log_packet(slot, p);
		return 0;
	default:
		return 0;
	}
	if (!bf_cls_enter(w, e->target)) {
		w->result = BF_DROP;
		return 1;
	}
	return 0;
}

/* One step: up to BF_CLS_SCAN words of the current range, up to the next candidate. */
__noinline long bf_cls_step(struct bf_walk *w)
{
	__u32 gen, word, last, index, k;
	struct bf_bits *b[6];
	__u64 first, m;

	if (!w)
		return 1;
	gen = w->pkt.gen;
	if (w->pos >= w->end)
		return bf_cls_return(w, w->gone ? BF_CONTINUE : BF_NEXT);
	for (k = 0; k < 6; k++) {
		__u32 key = gen * BF_CLS_CLASSES + w->cls[k];

		b[k] = bpf_map_lookup_elem(&bf_cls_bits, &key);
		if (!b[k]) {
			w->result = BF_DROP;
			return 1;
		}
	}
	word = w->pos / 64;
	last = (w->end - 1) / 64;
	first = ~0ULL << (w->pos % 64);
	m = 0;
	/* `m` holds only what a word's bitsets gave: a window scanned without a hit must leave
	 * it 0, or the next window's first entry would be tried without its field test (the
	 * wrong verdicts past 2,048 entries: 32 words of 64). */
	for (k = 0; k < BF_CLS_SCAN; k++) {
		if (word > last) {
			w->pos = w->end;
			return 0;
		}
		__u32 i = word & (BF_CLS_WORDS - 1); /* a power of two: a bound clang keeps */

		m = (k ? ~0ULL : first) & b[0]->w[i] & b[1]->w[i] & b[2]->w[i] &
		    ((b[3]->w[i] & b[4]->w[i]) | b[5]->w[i]);
		if (m)
			break;
		word++;
	}
	if (!m) {
		w->pos = word * 64;
		return 0;
	}
	index = word * 64 + bf_ctz(m);
	if (index >= w->end) {
		w->pos = w->end;
		return 0;
	}
	/* Tried by the next step: step and try each on their own keep the call stack of a
	 * walk three frames deep, which leaves chains of code room below the limit of 8. */
	w->pos = index + 1;
	w->candidate = index + 1;
	return 0;
}

/* The walk's state. Not on the stack, which the program, its chains and the walk's own
 * frames share (512 bytes), and which a walk with its copy of the packet would fill: a CPU
 * runs one program at a time (softirqs are off while one runs), so one walk per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bf_walk);
} bf_cls_walk SEC(".maps");

static long bf_cls_loop(__u32 i, void *ctx)
{
	__u32 zero = 0, candidate;
	struct bf_walk *w = bpf_map_lookup_elem(&bf_cls_walk, &zero);

	if (!w)
		return 1;
	candidate = w->candidate;

	if (candidate) {
		w->candidate = 0;
		return bf_cls_try(w, candidate - 1) ? 1 : 0;
	}
	return bf_cls_step(w) ? 1 : 0;
}

/* Walk segment `segment`: a verdict, BF_CONTINUE (the chain returned, or a goto's chain
 * ended), or BF_NEXT (no rule of the segment decided: go on after it). Global, like the
 * chain functions, so that the loop is verified once rather than at every segment. */
__noinline int bf_classify(struct bf_pkt *p, __u32 segment)
{
	__u32 gen, ports, zero = 0;
	struct bf_walk *w = bpf_map_lookup_elem(&bf_cls_walk, &zero);

	if (!p || !w)
		return BF_DROP;
	__builtin_memset(w, 0, sizeof(*w));
	w->result = BF_DROP;
	w->pkt = *p;
	gen = p->gen;
	ports = p->l4_len >= 4 && !p->frag_off;

	w->cls[0] = bf_cls_class(&bf_cls_proto, gen * 256 + p->proto);
	w->cls[1] = bf_cls_addr(&bf_cls_saddr, gen, p->saddr);
	w->cls[2] = bf_cls_addr(&bf_cls_daddr, gen, p->daddr);
	w->cls[3] = bf_cls_class(&bf_cls_sport, gen * BF_CLS_PORTS +
				(ports ? p->sport : BF_CLS_NO_PORTS));
	w->cls[4] = bf_cls_class(&bf_cls_dport, gen * BF_CLS_PORTS +
				(ports ? p->dport : BF_CLS_NO_PORTS));
	/* Classes 0-3: entries needing more than 3, 7, 19 L4 bytes, and none. A later
	 * fragment meets every entry with a transport match at offset 1 (tcp's drops it),
	 * and none elsewhere (no ports: the port classes hold none of them). */
	if (p->frag_off)
		w->cls[5] = p->frag_off == 1 ? 0 : 3;
	else
		w->cls[5] = p->l4_len < 4 ? 0 : p->l4_len < 8 ? 1 : p->l4_len < 20 ? 2 : 3;
	if (!bf_cls_enter(w, segment))
		return BF_DROP;
	/* Every step scans a word or tries a candidate, so this bound is never reached by a
	 * ruleset the compiler accepted; if it were, the packet is dropped (fail closed). */
	bpf_loop(BF_CLS_STEPS, bf_cls_loop, NULL, 0);
	p->reject_with = w->pkt.reject_with;
	return w->result;
}

#endif
