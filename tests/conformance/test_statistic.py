"""`-m statistic` against the kernel's xt_statistic, on mirror servers: nth mode frame by
frame (the same frames dropped, rejected and delivered, in order, and the same counters),
random mode by its proportions (each side's hits within 4.5 standard deviations of the
binomial's mean, and the two sides within 4.5 of each other: a chi-square-style bound, not
exact counts)."""

from __future__ import annotations

import math

from scapy.layers.inet import IP, UDP

from bpfilter.runtime import deploy, state
from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR, netns
from tests.conformance.harness import burst, compare_repeated
from tests.kernel_oracle import counter_snapshot

RULES = """*filter
:INPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --dport 9 -m statistic --mode nth --every 3 --packet 1 -j DROP
-A INPUT -p udp -m udp --dport 9 -m statistic --mode nth ! --every 4 --packet 0 -j REJECT
-A INPUT -p udp -m udp --dport 10 -m statistic --mode random --probability 0.25 -j DROP
-A INPUT -p udp -m udp --dport 10 -m statistic --mode random ! --probability 0.9 -j DROP
COMMIT
"""
DRAWS = 1500


def _udp(port: int) -> IP:
    return IP(src=CLIENT_ADDR, dst=SERVER_ADDR) / UDP(sport=4000, dport=port) / b"x"


def _counts(mirror) -> tuple[list[int], list[int]]:
    """Packets each INPUT rule took: the kernel's and bpfilter's."""
    text = netns.run("iptables-legacy-save", "-c", "-t", "filter",
                     netns=mirror.kernel.server).stdout
    kernel = counter_snapshot(text)
    keys = sorted(k for k in kernel if k[1] == "INPUT" and k[2] >= 0)
    with netns.entered(mirror.bpf.server):
        paths = state.Paths("eth0", state.netns_id())
        with deploy.LiveCounters(paths, state.read(paths)) as live:
            ours = [live("filter", *key[1:]).packets for key in keys]
    return [kernel[key] for key in keys], ours


def _z(hits: int, n: int, chance: float) -> float:
    return (hits - n * chance) / math.sqrt(n * chance * (1 - chance))


def test_nth_takes_the_same_frames_as_the_kernel(mirror):
    mirror.load(RULES)
    compare_repeated(mirror, _udp(9), 14, "statistic nth")
    kernel, ours = _counts(mirror)
    # frames 1, 4, 7, 10, 13 of 14; then all but 0, 4 and 8 of the other 9
    assert kernel[:2] == ours[:2] == [5, 6]


def test_random_draws_in_the_kernels_proportions(mirror):
    mirror.load(RULES)
    for bed in (mirror.kernel, mirror.bpf):
        burst(bed, _udp(10), DRAWS)
    kernel, ours = _counts(mirror)
    for side in (kernel, ours):
        first, second = side[2], side[3]
        assert abs(_z(first, DRAWS, 0.25)) < 4.5, (kernel, ours)
        assert abs(_z(second, DRAWS - first, 0.1)) < 4.5, (kernel, ours)
    # the two sides' proportions of the first rule, against each other
    pooled = (kernel[2] + ours[2]) / (2 * DRAWS)
    spread = math.sqrt(2 * pooled * (1 - pooled) / DRAWS)
    assert abs(kernel[2] - ours[2]) / DRAWS < 4.5 * spread, (kernel, ours)
