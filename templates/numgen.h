/* SPDX-License-Identifier: GPL-2.0 */
/* nft's numgen: a number per packet, at random (nft_ng_random_eval()) or the next of a
 * counter every CPU shares (nft_ng_inc_eval()), modulo the rule's modulus, plus its
 * offset.
 *
 * A verdict map on numgen is one draw in nft and several rules here (one per element):
 * the number is kept per CPU for the program's run (bf_numgen_run() starts one), and the
 * rules of one nft rule read the one drawn by the first of them the walk met. */
#pragma once

#include "bpfilter.h"

#ifndef BF_NNUMGEN
#define BF_NNUMGEN 0
#endif

struct bf_numgen_draw {
	__u64 run;   /* slot 0: this CPU's current run; others: the run it was drawn in */
	__u32 value;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BF_NNUMGEN + 1);
	__type(key, __u32);
	__type(value, struct bf_numgen_draw);
} bf_numgen_draws SEC(".maps");

/* A new packet for this CPU: every number drawn before is another packet's. */
static __always_inline void bf_numgen_run(void)
{
	__u32 zero = 0;
	struct bf_numgen_draw *run = bpf_map_lookup_elem(&bf_numgen_draws, &zero);

	if (run)
		run->run++;
}

/* nft_ng_inc_eval(): the shared counter (a slot of bf_limits: `credit`; `last` says it
 * started) steps, wrapping at the modulus, and gives its new value. It starts at
 * modulus - 1, as nft_ng_inc_init() sets it: the first packet gets 0. */
static __always_inline __u32 bf_numgen_next(const struct bf_pkt *p, __u32 index,
					    __u32 modulus)
{
	__u32 key = index + p->gen * BF_NLIMITS, value;
	struct bf_limit *l = bpf_map_lookup_elem(&bf_limits, &key);

	if (!l)
		return 0;
	bpf_spin_lock(&l->lock);
	if (l->last == 0) {
		l->credit = modulus - 1;
		l->last = 1;
	}
	value = l->credit + 1 < modulus ? l->credit + 1 : 0;
	l->credit = value;
	bpf_spin_unlock(&l->lock);
	return value;
}

/* The number of draw `slot` for this packet: the one drawn already in this run unless
 * `fresh` (the first rule of its nft rule draws anew: a chain the walk enters twice
 * meets it twice, as nft evaluates the rule twice). */
static __always_inline __u32 bf_numgen(const struct bf_pkt *p, __u32 slot, __u32 counter,
				       __u32 modulus, __u32 offset, int fresh, int inc)
{
	__u32 zero = 0, key = slot + 1, value;
	struct bf_numgen_draw *run = bpf_map_lookup_elem(&bf_numgen_draws, &zero);
	struct bf_numgen_draw *d = bpf_map_lookup_elem(&bf_numgen_draws, &key);

	if (!run || !d)
		return 0;
	if (!fresh && d->run == run->run)
		return d->value;
	if (inc)
		value = bf_numgen_next(p, counter, modulus);
	else /* reciprocal_scale() */
		value = (__u32)(((__u64)bpf_get_prandom_u32() * modulus) >> 32);
	d->run = run->run;
	d->value = value + offset;
	return d->value;
}
