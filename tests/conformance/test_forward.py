"""FORWARD: the servers of both mirrors are routers to a far namespace. bpfilter runs on
both of its interfaces (a forwarded connection's answers come in on eth1), the kernel's
iptables-legacy on the other router; every frame must meet the same fate: delivered,
forwarded, answered (by the far host, or by a REJECT) or dropped."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conformance.harness import SETTINGS, check_example, check_generated
from tests.conformance.rulesets import rulesets
from tests.packets import routed_frames

GENERATED_RULESETS = 20
FRAMES_PER_RULESET = 16
FRAMES_PER_EXAMPLE = 80


def test_router_example_conforms(router):
    check_example(router, "router.v4", routed_frames, FRAMES_PER_EXAMPLE)
    assert router.agreement["all cases"][0] >= FRAMES_PER_EXAMPLE


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_forward_rulesets_conform(router, data):
    check_generated(router, data, rulesets(hook="FORWARD"), routed_frames,
                    FRAMES_PER_RULESET)
