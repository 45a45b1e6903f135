/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking of the host's own packets, at TC egress of an interface whose
 * ruleset reads the connection state: XDP never sees what the host sends, and without
 * this the answers to it would not be ESTABLISHED. It tracks as nf_conntrack does at
 * LOCAL_OUT and confirms as at POSTROUTING (OUTPUT is not filtered yet, so everything
 * that leaves was accepted). Forwarded packets too: their answers may come in on an
 * interface no ruleset tracks at (bpfilter/tracker.py). It never drops; it shares
 * bf_conntrack with the stage programs. */
#define BF_TC 1
#define BF_CONNTRACK 1
#define BF_NSLOTS 1
#define BF_NLIMITS 1
#define BF_NIFPATTERNS 0
#define BF_NPREFIXES 1
#define BF_NEXACT 1
#include "bpfilter.h"
#include "conntrack.h"

SEC("tc")
int bpfilter_ct_egress(struct __sk_buff *ctx)
{
	struct bf_pkt p = {};

	if (bf_parse(ctx, &p) || p.frag_off)
		return BF_OUT_PASS;
	bf_ct_track(ctx, &p);
	bf_ct_confirm(&p, BF_ACCEPT);
	return BF_OUT_PASS;
}

char LICENSE[] SEC("license") = "GPL";
