"""FORWARD: the servers of both mirrors are routers to a far namespace. bpfilter runs on
both of its interfaces (a forwarded connection's answers come in on eth1), the kernel's
iptables-legacy on the other router; every frame must meet the same fate: delivered,
forwarded, answered (by the far host, or by a REJECT) or dropped."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfilter.codegen import Attach
from bpfilter.testbed import FAR_NET
from tests.conformance.harness import SETTINGS, MirrorPair, check_example, check_generated
from tests.conformance.rulesets import rulesets
from tests.packets import frames, interesting

GENERATED_RULESETS = 30
FRAMES_PER_RULESET = 16
FRAMES_PER_EXAMPLE = 80


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    from tests.conftest import need_kernel

    need_kernel()
    pair = MirrorPair(tmp_path_factory.mktemp("forward"), Attach.XDP, forward=True)
    yield pair
    pair.print_table()
    pair.close()


@st.composite
def routed_frames(draw, ruleset):
    """Frames to the server's own range (INPUT) or, mostly, on to the far range. Not from
    the far range: the kernel routes an ICMP error about such a frame there, bpfilter
    sends it back where the frame came from (README, known differences)."""
    far = ipaddress.IPv4Network(FAR_NET)
    iface, frame = draw(frames(interesting(ruleset), ("eth0",)).filter(
        lambda case: ipaddress.IPv4Address(case[1]["IP"].src) not in far))
    if draw(st.integers(0, 3)):
        frame["IP"].dst = str(far.network_address + draw(st.integers(1, 254)))
        del frame["IP"].chksum
        frame = frame.__class__(bytes(frame))
    return iface, frame


def test_router_example_conforms(router):
    check_example(router, "router.v4", routed_frames, FRAMES_PER_EXAMPLE)
    assert router.agreement["all cases"][0] >= FRAMES_PER_EXAMPLE


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_forward_rulesets_conform(router, data):
    check_generated(router, data, rulesets(hook="FORWARD"), routed_frames,
                    FRAMES_PER_RULESET)
