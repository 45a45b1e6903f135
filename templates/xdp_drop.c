/* SPDX-License-Identifier: GPL-2.0 */
/* The ceiling for bench/: an XDP program that drops everything, doing nothing else. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int bpfilter_xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
