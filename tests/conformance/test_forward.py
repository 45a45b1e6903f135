"""FORWARD: the servers of both mirrors are routers to a far namespace. bpfilter runs on
both of its interfaces (a forwarded connection's answers come in on eth1), the kernel's
iptables-legacy on the other router; every frame must meet the same fate: delivered,
forwarded, answered (by the far host, or by a REJECT) or dropped."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from bpfilter.frontend import parse_ruleset
from tests.conftest import EXAMPLES
from tests.conformance.harness import SETTINGS, check, check_example, check_generated, count
from tests.conformance.rulesets import rulesets
from tests.packets import routed_frames

GENERATED_RULESETS = count(14)
FRAMES_PER_RULESET = 16
FRAMES_PER_EXAMPLE = 80


def test_router_example_conforms(router):
    check_example(router, "router.v4", routed_frames, FRAMES_PER_EXAMPLE)
    assert router.agreement["all cases"][0] >= FRAMES_PER_EXAMPLE


def test_an_all_zero_echo_reply_is_established(router):
    """The far host answers a ping of id 0 and sequence 0 with an all-zero ICMP message
    (checksum 0x0000, the other zero of one's complement): the kernel's conntrack takes it
    as the ping's answer, and so must bpfilter's checksum check (found by the example's
    generated frames)."""
    text = (EXAMPLES / "router.v4").read_text()
    router.load(text)
    ping = IP(src="95.31.43.182", dst="203.0.113.254") / ICMP(type=8, id=0, seq=0)
    check(router, text, parse_ruleset(text, "router.v4"), [("eth0", Ether() / ping)])


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_forward_rulesets_conform(router, data):
    check_generated(router, data, rulesets(hook="FORWARD"), routed_frames,
                    FRAMES_PER_RULESET)
