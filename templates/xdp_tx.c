/* SPDX-License-Identifier: GPL-2.0 */
/* The packet generator: run with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on an
 * interface, every repetition transmits the frame out of it (no pktgen module needed).
 *
 * Live frames live in pages the kernel recycles without writing the frame into them
 * again, and a receiver that forwards rewrites those pages in place (MAC addresses, TTL,
 * checksum): later repetitions would leave with the far end's MAC and be dropped by the
 * receiver as another host's. So each repetition writes the frame's headers back first. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define HEAD4 (14 + 20) /* Ethernet and IPv4 headers: what forwarding rewrites */
#define HEAD6 (14 + 40)

struct head {
	__u32 len; /* HEAD4 or HEAD6 */
	__u8 bytes[HEAD6];
};

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
	}
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
