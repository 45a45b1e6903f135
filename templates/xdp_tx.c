/* SPDX-License-Identifier: GPL-2.0 */
/* The packet generator: run with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on an
 * interface, every repetition transmits the frame out of it (no pktgen module needed). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bpfilter_xdp_tx(struct xdp_md *ctx)
{
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
