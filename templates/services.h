/* SPDX-License-Identifier: GPL-2.0 */
/* The service map: kube-proxy's dispatch, service and endpoint chains as data
 * (bpfilter/passes/services.py). A connection's first packet finds its service by one
 * hash lookup of (destination, protocol, port); the service's ladder is then drawn rung
 * by rung as xt_statistic draws it (or, kube-proxy's nftables mode, one numgen draw picks
 * the endpoint), and the chosen endpoint's DNAT ends the walk. Every
 * rule the data stands for keeps its counter slot.
 *
 * Indexed by generation, like the folded runs (see bpfilter.h). */
#pragma once

#if BF_NSVC

#define BF_SVC_ANY_PORT 0x10000 /* the key that says "a rule tests this address and protocol" */
#define BF_SVC_ONE 0x80000000U  /* a rung without a statistic match */

enum bf_svc_when { BF_SVC_NEVER, BF_SVC_ALWAYS, BF_SVC_IN, BF_SVC_NOT_IN };

/* Layouts shared with bpfilter/codegen/services.py. */
struct bf_svc_key {
	__u32 run;  /* generation << 16 | run */
	__u32 addr; /* host order */
	__u32 port; /* or BF_SVC_ANY_PORT */
	__u32 proto;
};

/* A jump to a chain whose one rule is MARK, held when the source is (not) in a prefix. */
struct bf_svc_mark {
	__u32 slot, mark_slot; /* the jumping rule, the MARK rule */
	__u32 net, mask;       /* host order */
	__u32 value, vmask;    /* mark = (mark & ~vmask) ^ value */
	__u32 when;            /* enum bf_svc_when */
};

struct bf_svc {
	__u32 slot;         /* the dispatch rule */
	__u32 first, count; /* its endpoints in bf_svc_ep */
	__u32 modulus;      /* 0: a statistic ladder; N: one numgen draw picks endpoint N */
	__u32 via, via_slot; /* an external chain's rule that goes on to the service chain */
	struct bf_svc_mark ext; /* the external chain's marking */
	struct bf_svc_mark masq;
};

struct bf_svc_ep {
	__u32 pick_slot, dnat_slot;
	__u32 probability; /* of 2^31, or BF_SVC_ONE */
	__u32 addr;        /* host order */
	__u32 port;        /* 0x10000 | port, or 0: the packet's own */
	struct bf_svc_mark hairpin;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * BF_NSVC);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bf_svc_key);
	__type(value, struct bf_svc);
} bf_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * BF_NSVC_EP);
	__type(key, __u32);
	__type(value, struct bf_svc_ep);
} bf_svc_ep SEC(".maps");

static __always_inline void bf_svc_mark(struct bf_pkt *p, const struct bf_svc_mark *m)
{
	if (m->when == BF_SVC_NEVER)
		return;
	if (m->when != BF_SVC_ALWAYS && ((p->saddr & m->mask) == m->net) != (m->when == BF_SVC_IN))
		return;
	bf_count(m->slot, p);
	bf_count(m->mark_slot, p);
	p->mark = (p->mark & ~m->vmask) ^ m->value;
}

/* The endpoint `e` drew: its rung, hairpin marking and DNAT. */
static __always_inline int bf_svc_dnat(struct bf_pkt *p, const struct bf_svc_ep *e)
{
	bf_count(e->pick_slot, p);
	bf_svc_mark(p, &e->hairpin);
	bf_count(e->dnat_slot, p);
	return bf_dnat(p, e->addr, e->port ? (__u16)e->port : p->dport);
}

/* Walk service run `run` of a nat chain: BF_NEXT when no rule of it matched or the
 * service's chain returned (no rung drew), else the DNAT's verdict (or the kernel's
 * hotdrop: a packet too short for the xtables port match of a rule whose address and
 * protocol it has; `partial`: nftables' port match, which such a packet fails).
 * Global: verified once, however many runs a ruleset has. */
__noinline int bf_service(struct bf_pkt *p, __u32 run, __u32 partial)
{
	struct bf_svc_key key = {};
	const struct bf_svc *s;
	__u32 i, need;

	if (!p)
		return BF_DROP;
	key.run = run | (__u32)p->gen << 16;
	key.addr = p->daddr;
	key.proto = p->proto;
	need = partial ? 4 : p->proto == IPPROTO_TCP ? 20 : 8;
	if (p->frag_off || p->l4_len < need) {
		/* xt_tcp and xt_udp: a later fragment does not match (tcp's at offset 1 is
		 * dropped), a short first one is dropped. */
		key.port = BF_SVC_ANY_PORT;
		if (!bpf_map_lookup_elem(&bf_svc, &key))
			return BF_NEXT;
		if (p->frag_off && !(p->frag_off == 1 && p->proto == IPPROTO_TCP))
			return BF_NEXT;
		return BF_DROP;
	}
	key.port = p->dport;
	s = bpf_map_lookup_elem(&bf_svc, &key);
	if (!s)
		return BF_NEXT;
	bf_count(s->slot, p);
	bf_svc_mark(p, &s->ext);
	if (s->via)
		bf_count(s->via_slot, p);
	bf_svc_mark(p, &s->masq);
	if (s->modulus) { /* nft_ng_random_eval(): reciprocal_scale() */
		const struct bf_svc_ep *e;
		__u32 index;

		i = (__u32)(((__u64)bpf_get_prandom_u32() * s->modulus) >> 32);
		if (i >= BF_SVC_ENDPOINTS)
			return BF_DROP;
		index = p->gen * BF_NSVC_EP + s->first + i;
		e = bpf_map_lookup_elem(&bf_svc_ep, &index);
		return e ? bf_svc_dnat(p, e) : BF_DROP;
	}
	for (i = 0; i < BF_SVC_ENDPOINTS && i < s->count; i++) {
		__u32 index = p->gen * BF_NSVC_EP + s->first + i;
		const struct bf_svc_ep *e = bpf_map_lookup_elem(&bf_svc_ep, &index);

		if (!e)
			return BF_DROP;
		if (e->probability != BF_SVC_ONE &&
		    (bpf_get_prandom_u32() & 0x7fffffff) >= e->probability)
			continue;
		return bf_svc_dnat(p, e);
	}
	return BF_NEXT;
}

#endif
