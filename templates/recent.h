/* SPDX-License-Identifier: GPL-2.0 */
/* xt_recent (`-m recent`): named lists of addresses, each with the times it was last seen
 * and the TTL it was set with (ufw's `limit` rules, SSH brute-force guards). One LRU map
 * holds every list of the ruleset (room for LIST_SIZE addresses per list, as the
 * kernel's ip_list_tot; the kernel drops a full list's least recently seen address, the
 * map its least recently used one). Each address keeps the last BF_RECENT_STAMPS
 * sightings, a power of two at least every rule's --hitcount, as the kernel keeps
 * roundup_pow_of_two(hitcount) of them: the same answers, since only the newest count.
 * Shared by the ingress and egress programs; a new program starts with empty lists. */
#pragma once

#include "bpfilter.h"

#if BF_RECENT_LISTS

/* How a rule asks (bf_recent()'s `how`): the mode in bits 0-1, then flags. */
enum bf_recent_how { BF_RECENT_SET = 0, BF_RECENT_CHECK = 1, BF_RECENT_UPDATE = 2,
		     BF_RECENT_REMOVE = 3, BF_RECENT_INVERT = 4, BF_RECENT_TTL = 8,
		     BF_RECENT_DEST = 16 };

struct bf_recent_key {
	__u32 list;
	__u32 family;
	__u32 addr[4]; /* host order, masked */
};

/* No lock (an LRU map cannot hold one): each sighting takes its own slot by an atomic
 * count, so two CPUs at once lose nothing but the order of two equal stamps. */
struct bf_recent_entry {
	__u32 seen;   /* sightings so far: the next goes to slot seen % BF_RECENT_STAMPS */
	__u8 ttl;
	__u8 pad[3];
	__u64 stamps[BF_RECENT_STAMPS]; /* bpf_ktime_get_coarse_ns() */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BF_RECENT_LISTS * 200);
	__type(key, struct bf_recent_key);
	__type(value, struct bf_recent_entry);
} bf_recent_lists SEC(".maps");

/* A zeroed entry (never written): a new address's before its first sighting. */
struct bf_recent_blank {
	__u8 bytes[sizeof(struct bf_recent_entry)];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bf_recent_blank);
} bf_recent_blank SEC(".maps");

/* The word i of an IPv6 prefix mask of `bits`. */
static __always_inline __u32 bf_recent_mask6(__u32 bits, __u32 i)
{
	if (bits >= 32 * (i + 1))
		return 0xffffffff;
	if (bits <= 32 * i)
		return 0;
	return 0xffffffff << (32 - (bits - 32 * i));
}

/* recent_entry_update(): a sighting, into the ring of the newest. */
static __always_inline void bf_recent_seen(struct bf_recent_entry *e, __u64 now, __u8 ttl)
{
	__u32 slot = __sync_fetch_and_add(&e->seen, 1) & (BF_RECENT_STAMPS - 1);

	e->stamps[slot] = now;
	e->ttl = ttl;
}

/* recent_mt(): 1 when the rule's answer is yes, 0 no, -1 the kernel's hotdrop (no room
 * for a new address). `how`: list << 32 | hitcount << 16 | enum bf_recent_how; `mask`:
 * the IPv4 mask (host order), or the IPv6 prefix length. Global: verified once. */
__noinline int bf_recent(struct bf_pkt *p, __u64 how, __u32 seconds, __u32 mask)
{
	struct bf_recent_key key = {};
	struct bf_recent_entry *e;
	__u32 mode = how & 3, hits = (how >> 16) & 0xffff, zero = 0, i, n, h = 0, found = 0;
	int ret = !!(how & BF_RECENT_INVERT);
	const __u32 *addr;
	void *blank;
	__u64 now = bpf_ktime_get_coarse_ns(); /* a tick's precision, as jiffies */
	__u8 ttl;

	if (!p)
		return -1;
	addr = how & BF_RECENT_DEST ? p->dst : p->src;
	key.list = how >> 32;
	key.family = p->family;
	if (p->family == 6) {
		for (i = 0; i < 4; i++)
			key.addr[i] = addr[i] & bf_recent_mask6(mask, i);
	} else {
		key.addr[0] = addr[0] & mask;
	}
	/* The TTL as the packet came: FORWARD and POSTROUTING see a forwarded one's less one. */
	ttl = p->ttl + ((p->hook == BF_HOOK_FORWARD || p->hook == BF_HOOK_POSTROUTING) &&
			!(p->noif & BF_NO_IN));
	e = bpf_map_lookup_elem(&bf_recent_lists, &key);
	/* --rttl: an address set with another TTL is not the packet's (0 is any) */
	if (e && (how & BF_RECENT_TTL) && e->ttl && ttl && e->ttl != ttl)
		e = NULL;
	if (!e) {
		if (mode != BF_RECENT_SET)
			return ret;
		blank = bpf_map_lookup_elem(&bf_recent_blank, &zero);
		if (!blank)
			return -1;
		bpf_map_update_elem(&bf_recent_lists, &key, blank, BPF_NOEXIST);
		e = bpf_map_lookup_elem(&bf_recent_lists, &key);
		if (!e)
			return -1;
		bf_recent_seen(e, now, ttl);
		return !ret;
	}
	if (mode == BF_RECENT_SET) {
		ret = !ret;
	} else if (mode == BF_RECENT_REMOVE) {
		bpf_map_delete_elem(&bf_recent_lists, &key);
		return !ret;
	} else {
		n = e->seen;
		for (i = 0; i < BF_RECENT_STAMPS; i++) {
			if (i >= n)
				break;
			if (seconds && now - e->stamps[i] > (__u64)seconds * 1000000000ULL)
				continue;
			if (!hits || ++h >= hits) {
				found = 1;
				break;
			}
		}
		if (found)
			ret = !ret;
	}
	if (mode == BF_RECENT_SET || (mode == BF_RECENT_UPDATE && ret))
		bf_recent_seen(e, now, ttl);
	return ret;
}

#endif
