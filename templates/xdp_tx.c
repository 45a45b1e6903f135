/* SPDX-License-Identifier: GPL-2.0 */
/* The packet generator: run with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on an
 * interface, every repetition transmits the frame out of it (no pktgen module needed).
 *
 * Live frames live in pages the kernel recycles without writing the frame into them
 * again, and a receiver that forwards rewrites those pages in place (MAC addresses, TTL,
 * checksum, and NAT the ports): later repetitions would leave with the far end's MAC and
 * be dropped by the receiver as another host's. So each repetition writes the frame's
 * headers back first. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Ethernet, IPv4 and the first 8 L4 bytes: what forwarding and NAT rewrite (ports) */
#define HEAD4 (14 + 20 + 8)
#define HEAD6 (14 + 40)

struct head {
	__u32 len; /* HEAD4 or HEAD6 */
	__u8 bytes[HEAD6];
	__u32 flows; /* IPv4 UDP: every repetition a new flow (new connections per second) */
	__u32 next;  /* the flow number of the next repetition */
};

#define FLOW_PORTS 64000

/* Flow n: source port 1024 + n % FLOW_PORTS, and n / FLOW_PORTS added to the source
 * address; the IPv4 checksum made anew, the UDP one left out (0: none, IPv4 allows it). */
static __always_inline int bpfilter_tx_flow(void *data, void *end, struct head *h)
{
	struct iphdr *ip = data + 14;
	struct udphdr *udp = data + 14 + 20;
	__u16 *words = (void *)ip;
	__u32 n = __sync_fetch_and_add(&h->next, 1), sum = 0;
	int i;

	if ((void *)(udp + 1) > end)
		return XDP_ABORTED;
	ip->saddr = bpf_htonl(bpf_ntohl(ip->saddr) + n / FLOW_PORTS);
	ip->check = 0;
	for (i = 0; i < 10; i++)
		sum += words[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	ip->check = ~sum & 0xffff;
	udp->source = bpf_htons(1024 + n % FLOW_PORTS);
	udp->check = 0;
	return XDP_TX;
}

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct head);
} bpfilter_tx_head SEC(".maps");

SEC("xdp")
int bpfilter_xdp_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct head *h = bpf_map_lookup_elem(&bpfilter_tx_head, &zero);

	if (!h)
		return XDP_ABORTED;
	if (h->len == HEAD6) {
		if (data + HEAD6 > end)
			return XDP_ABORTED;
		__builtin_memcpy(data, h->bytes, HEAD6);
	} else {
		if (data + HEAD4 > end)
			return XDP_ABORTED;
		__builtin_memcpy(data, h->bytes, HEAD4);
		if (h->flows)
			return bpfilter_tx_flow(data, end, h);
	}
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
