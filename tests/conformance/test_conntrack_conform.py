"""Connection states against the kernel's nf_conntrack: generated flows of TCP segments
(every flag combination iptables sees in practice), UDP datagrams, ICMP queries and ICMP
errors quoting the server's own answers, sent to bpfilter and to iptables-legacy on
mirror servers, whose stacks answer them (RST, ICMP errors, echo replies) and so move the
connections on. Each frame must meet the same fate on both. Sequence numbers here are
fixed, not the server's: test_tcp_windows.py follows each server's answers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpfilter.testbed import SERVER_ADDR
from tests.conformance.harness import count, listening_pair

RULESET = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate INVALID -j REJECT --reject-with icmp-admin-prohibited
-A INPUT -m conntrack --ctstate RELATED -j ACCEPT
-A INPUT -p tcp -m conntrack --ctstate ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p tcp -m conntrack --ctstate NEW -j REJECT --reject-with tcp-reset
-A INPUT -p udp -m state --state NEW -j ACCEPT
-A INPUT -p icmp -m state --state NEW -j ACCEPT
-A INPUT -p icmp -m state --state ESTABLISHED -j REJECT --reject-with icmp-host-prohibited
-A INPUT -j DROP
COMMIT
"""
FLOWS = count(150)
FLAGS = ["S", "S", "SA", "A", "A", "PA", "FA", "F", "R", "RA", "SF", "", "SR", "FPU"]
CLIENT = "192.0.2.77"
_ports = itertools.count(20000)  # a fresh client port per flow, across examples


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    from tests.conftest import need_kernel

    need_kernel()
    with listening_pair(tmp_path_factory.mktemp("conntrack-conformance"), RULESET) as pair:
        yield pair


@st.composite
def flows(draw) -> list[Ether]:
    """One connection's frames from the client, in order."""
    sport = next(_ports)
    kind = draw(st.sampled_from(["tcp", "tcp", "tcp", "udp", "icmp"]))
    ip = IP(src=CLIENT, dst=SERVER_ADDR)
    out: list[Ether] = []
    if kind == "icmp":
        for step in draw(st.lists(st.sampled_from(["request", "request", "reply", "error"]),
                                  min_size=1, max_size=4)):
            if step == "error":  # about the server's echo reply
                quoted = IP(src=SERVER_ADDR, dst=CLIENT) / ICMP(type=0, id=sport, seq=1)
                out.append(Ether() / ip / ICMP(type=3, code=1) / bytes(quoted)[:28])
            else:
                out.append(Ether() / ip / ICMP(type=8 if step == "request" else 0,
                                               id=sport, seq=len(out)))
        return out
    dport = draw(st.sampled_from([22, 8080]))
    header = TCP if kind == "tcp" else UDP
    steps = draw(st.lists(st.one_of(st.sampled_from(FLAGS), st.just("error")),
                          min_size=1, max_size=6))
    seq = 1000
    for step in steps:
        if step == "error":  # an ICMP error about the server's answer to this flow
            quoted = IP(src=SERVER_ADDR, dst=CLIENT) / header(sport=dport, dport=sport)
            out.append(Ether() / ip / ICMP(type=3, code=3) / bytes(quoted)[:28])
        elif kind == "udp":
            out.append(Ether() / ip / UDP(sport=sport, dport=dport) / b"x")
        else:
            out.append(Ether() / ip / TCP(sport=sport, dport=dport, flags=step, seq=seq,
                                          ack=5000 if "A" in step else 0))
            seq += ("S" in step) + ("F" in step)
    return out


@settings(max_examples=FLOWS, deadline=None, derandomize=True,
          phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
@given(flow=flows())
def test_connection_states_conform(mirror, flow):
    for number, frame in enumerate(flow):
        kernel, ours = mirror.compare(frame, {"conntrack"})
        assert ours == kernel, (
            f"frame {number + 1} of {[f.summary() for f in flow]}: kernel {kernel}, "
            f"bpfilter {ours}")
