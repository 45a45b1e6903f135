/* SPDX-License-Identifier: GPL-2.0 */
/* `-m addrtype` and nft's `fib ... type`: the route type of an IPv4 address, as the
 * kernel's inet_dev_addr_type() gives it. */
#pragma once

#include "bpfilter.h"

/* The kernel's route types (RTN_*) this file names. */
enum bf_rtn { BF_RTN_UNICAST = 1, BF_RTN_BROADCAST = 3, BF_RTN_MULTICAST = 5 };

/* A route of the local table, kept by hostview.py (bf_addrtype). */
struct bf_addrtype {
	__u8 type;     /* RTN_* */
	__u8 pad[3];
	__u32 ifindex; /* the route's output interface */
};

/* Every route of the local table, of every type (bf_local holds the ones that deliver
 * to INPUT only). Followed by the watcher as bf_local is. */
BF_LPM_TRIE(bf_addrtype, BF_LOCAL_MAX, struct bf_local_key, struct bf_addrtype);

/* inet_dev_addr_type(): 0.0.0.0/8 and the limited broadcast are BROADCAST, 224/4 is
 * MULTICAST, else the type of the longest local-table route holding the address, UNICAST
 * when there is none or (given an interface) when the route goes out another one. */
static __always_inline __u32 bf_addr_type(__u32 addr, __u32 ifindex)
{
	struct bf_local_key key = { .prefixlen = 32, .addr = bpf_htonl(addr) };
	struct bf_addrtype *route;

	if ((addr >> 24) == 0 || addr == 0xffffffff)
		return BF_RTN_BROADCAST;
	if ((addr >> 28) == 0xe)
		return BF_RTN_MULTICAST;
	route = bpf_map_lookup_elem(&bf_addrtype, &key);
	if (!route || (ifindex && route->ifindex != ifindex))
		return BF_RTN_UNICAST;
	return route->type;
}

/* Whether the address's type is one of `mask` (bit RTN_x), as xt_addrtype's match_type(). */
static __always_inline int bf_addr_type_in(__u32 addr, __u32 ifindex, __u32 mask)
{
	return (mask >> bf_addr_type(addr, ifindex)) & 1;
}
