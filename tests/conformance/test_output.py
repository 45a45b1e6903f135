"""OUTPUT: the servers of both mirrors send packets themselves (a raw socket), the kernel's
iptables-legacy filtering one, bpfilter's egress program the other. Every packet must
meet the same fate: it reaches the client or not, and the same replies (a REJECT's)
come back into the server."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from bpfilter.codegen import Attach
from tests.conformance.harness import SETTINGS, MirrorPair, check_example, check_generated
from tests.conformance.rulesets import layered, rulesets
from tests.packets import LOCAL, frames, interesting

GENERATED_RULESETS = 25
LAYERED_RULESETS = 15
PACKETS_PER_RULESET = 16
PACKETS_PER_EXAMPLE = 60


@pytest.fixture(scope="module", params=list(Attach), ids=[a.value for a in Attach])
def sender(request, tmp_path_factory):
    """The ingress program's attach point matters too: it tracks the answers."""
    from tests.conftest import need_kernel

    need_kernel()
    pair = MirrorPair(tmp_path_factory.mktemp(f"output-{request.param.value}"),
                      request.param)
    yield pair
    pair.print_table()
    pair.close()


@st.composite
def sent_packets(draw, ruleset):
    """A test frame turned around: from one of the server's addresses to the outside."""
    _iface, frame = draw(frames(interesting(ruleset), ("eth0",)))
    packet = frame[IP]
    packet.src, packet.dst = packet.dst, packet.src
    if TCP in packet or UDP in packet:
        l4 = packet[TCP] if TCP in packet else packet[UDP]
        l4.sport, l4.dport = l4.dport, l4.sport
        del l4.chksum
    del packet.chksum
    assert ipaddress.IPv4Address(packet.src) in LOCAL
    return IP(bytes(packet))


@pytest.mark.parametrize("name", ["locked-down.v4", "marks.v4"])
def test_examples_conform(sender, name):
    check_example(sender, name, sent_packets, PACKETS_PER_EXAMPLE, sent=True)


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_output_rulesets_conform(sender, data):
    check_generated(sender, data, rulesets(hook="OUTPUT"), sent_packets,
                    PACKETS_PER_RULESET, sent=True)


@settings(max_examples=LAYERED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_raw_mangle_filter_rulesets_conform(sender, data):
    """raw OUTPUT, mangle OUTPUT, filter OUTPUT, mangle POSTROUTING."""
    check_generated(sender, data, layered(hook="OUTPUT"), sent_packets,
                    PACKETS_PER_RULESET, sent=True)
