"""nft's numgen against the kernel's, on mirror servers: `numgen inc` frame by frame (the
counter every CPU shares, from 1), and `numgen random` in a verdict map by its
proportions: one draw per packet for the whole map (a rule per element drawing anew
would let a quarter of the packets fall through the map to the policy). Each side's
count within 4.5 standard deviations of the binomial's mean, and of the other side's."""

from __future__ import annotations

import math

from scapy.layers.inet import IP, UDP

from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR
from tests.conformance.harness import burst, compare_repeated

RULES = """table ip t {
	chain input {
		type filter hook input priority 0; policy accept;
		udp dport 9 numgen inc mod 3 vmap { 0 : drop, 1 : accept, 2 : jump odd }
		udp dport 10 numgen random mod 2 vmap { 0 : accept, 1 : drop }
		udp dport 11 numgen random mod 4 offset 5 { 5, 7 } drop
		udp dport 11 accept
	}
	chain odd {
		udp dport 9 reject
	}
}
"""
DRAWS = 1500


def _udp(port: int) -> IP:
    return IP(src=CLIENT_ADDR, dst=SERVER_ADDR) / UDP(sport=4000, dport=port) / b"x"


def _delivered(bed, port: int) -> int:
    """How many of DRAWS datagrams to `port` the server's stack took."""
    before = bed.delivered()
    burst(bed, _udp(port), DRAWS)
    return bed.delivered() - before


def test_numgen_inc_takes_the_same_frames_as_the_kernel(mirror):
    mirror.load(RULES)
    compare_repeated(mirror, _udp(9), 9, "numgen inc")


def test_numgen_random_draws_once_per_packet_as_the_kernel(mirror):
    mirror.load(RULES)
    sides = [[_delivered(bed, port) for port in (10, 11)]
             for bed in (mirror.kernel, mirror.bpf)]
    for kept_map, kept_set in sides:
        for kept in (kept_map, kept_set):  # each half: 0 or 1, and 5 or 7 of 5-8, drop
            assert abs(kept - DRAWS / 2) / math.sqrt(DRAWS / 4) < 4.5, sides
    spread = math.sqrt(2 * 0.25 / DRAWS)
    assert abs(sides[0][0] - sides[1][0]) / DRAWS < 4.5 * spread, sides
