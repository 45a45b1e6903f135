"""DNAT against the kernel's: generated nat PREROUTING rulesets (port forwards to the far
namespace and to the router itself, with FORWARD filtering by connection state) on mirror
routers, and flows through them: a SYN (and, when it is answered, the handshake's ACK with
data), UDP datagrams, pings. What the client gets back must be the same on both sides,
field by field: addresses and ports (translated back), TCP flags, ICMP type and code, the
packet an ICMP error quotes, and every checksum valid."""

from __future__ import annotations

import itertools
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from bpfilter.codegen import Attach
from bpfilter.runtime import conntable, state
from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR, netns
from tests.conftest import EXAMPLES
from tests.conformance.harness import (FAR_LISTENER, SETTINGS, MirrorPair, count,
                                       listening_pair)

GENERATED_RULESETS = count(10)
FLOWS_PER_RULESET = 12
# Where DNAT sends: two far hosts (one listens on port 80), the router's own address
# (listening on 22), and an address of the router's local range nothing listens on.
TARGETS = (FAR_LISTENER, "203.0.113.3", SERVER_ADDR, "198.18.0.9")
PORTS = (22, 53, 80, 8080, 8081)
DESTINATIONS = (SERVER_ADDR, "198.18.0.7", FAR_LISTENER)


@pytest.fixture(scope="module", params=[Attach.XDP, Attach.TC], ids=["xdp", "tc"])
def nat_router(request, tmp_path_factory) -> Iterator[MirrorPair]:
    """Mirror routers, bpfilter at XDP (direct writes, checksums by hand) or at TC ingress
    (the kernel's helpers) on both interfaces; TC egress translates replies either way."""
    from tests.conftest import need_kernel

    need_kernel()
    with listening_pair(tmp_path_factory.mktemp(f"nat-{request.param.value}"), forward=True,
                        attach=request.param) as pair:
        yield pair


@st.composite
def dnat_rule(draw) -> str:
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", None]))
    parts = ["-A PREROUTING"]
    if draw(st.booleans()):
        parts.append(f"-d {draw(st.sampled_from(DESTINATIONS))}/32")
    if draw(st.booleans()):
        parts.append("-i eth0")
    if proto:
        parts.append(f"-p {proto}")
        if proto != "icmp" and draw(st.booleans()):
            parts.append(f"-m {proto} --dport {draw(st.sampled_from(PORTS))}")
    to = draw(st.sampled_from(TARGETS))
    if proto in ("tcp", "udp") and draw(st.booleans()):
        to += f":{draw(st.sampled_from(PORTS))}"
    return " ".join(parts + ["-j DNAT --to-destination", to])


@st.composite
def nat_rulesets(draw) -> str:
    rules = draw(st.lists(dnat_rule(), min_size=1, max_size=5))
    if draw(st.booleans()):  # an exception ahead of them
        rules.insert(0, f"-A PREROUTING -p tcp -m tcp --dport {draw(st.sampled_from(PORTS))} "
                        "-j ACCEPT")
    forward = []
    policy = draw(st.sampled_from(["ACCEPT", "DROP"]))
    if policy == "DROP":
        forward = ["-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                   f"-A FORWARD -d {draw(st.sampled_from(TARGETS[:2]))}/32 -j ACCEPT"]
        if draw(st.booleans()):
            forward.append("-A FORWARD -p icmp -j ACCEPT")
    return ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n" + "".join(r + "\n" for r in rules) + "COMMIT\n"
            f"*filter\n:INPUT ACCEPT [0:0]\n:FORWARD {policy} [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + "".join(r + "\n" for r in forward) + "COMMIT\n")


def _valid(packet: Packet) -> bool:
    """Every checksum of the packet as it should be (a UDP datagram may have none)."""
    received = IP(bytes(packet))
    fresh = received.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if layer in fresh and not (layer is UDP and fresh[UDP].chksum == 0):
            fresh[layer].chksum = None
    return bytes(IP(bytes(fresh))) == bytes(received)


def describe(reply: Packet) -> tuple:
    """What the client sees of a reply, without what differs by chance (sequence numbers,
    IP ids, TTLs of other hosts' packets)."""
    fields: list = [reply.src, reply.dst, reply.proto, _valid(reply)]
    if TCP in reply:
        fields += [reply[TCP].sport, reply[TCP].dport, str(reply[TCP].flags)]
    elif UDP in reply:
        fields += [reply[UDP].sport, reply[UDP].dport, bytes(reply[UDP].payload)]
    elif ICMP in reply:
        fields += [reply[ICMP].type, reply[ICMP].code]
        if IPerror in reply:
            quoted = reply[IPerror]
            fields += [quoted.src, quoted.dst, quoted.proto]
            for layer in (TCPerror, UDPerror):
                if layer in reply:
                    fields += [reply[layer].sport, reply[layer].dport]
    return tuple(fields)


def _send(bed, packet: Packet) -> list[Packet]:
    return bed.send(bytes(Ether(src=bed.client_mac, dst=bed.server_mac) / packet))


def flow(bed, kind: str, dst: str, port: int, sport: int) -> list[tuple]:
    """One flow from the client; what came back, in order of the flow's steps."""
    base = IP(src=CLIENT_ADDR, dst=dst)
    if kind == "ping":
        return [tuple(sorted(describe(r) for r in _send(bed, base / ICMP(id=sport, seq=1))))]
    if kind == "udp":
        return [tuple(sorted(describe(r) for r in _send(
            bed, base / UDP(sport=sport, dport=port) / b"hello")))]
    replies = _send(bed, base / TCP(sport=sport, dport=port, flags="S", seq=1000))
    seen = [tuple(sorted(describe(r) for r in replies))]
    answer = next((r for r in replies if TCP in r and r[TCP].flags == "SA"), None)
    if answer is not None:
        ack = TCP(sport=sport, dport=port, flags="A", seq=1001, ack=answer[TCP].seq + 1)
        seen.append(tuple(sorted(describe(r) for r in _send(bed, base / ack / b"data"))))
        _send(bed, base / TCP(sport=sport, dport=port, flags="R", seq=1005))
    return seen


flows = st.tuples(st.sampled_from(["syn", "syn", "udp", "ping"]),
                  st.sampled_from(DESTINATIONS), st.sampled_from(PORTS))
_sports = itertools.count(20000)


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_dnat_rulesets_conform(nat_router, data):
    text = data.draw(nat_rulesets(), label="ruleset")
    nat_router.load(text)
    for kind, dst, port in data.draw(st.lists(flows, min_size=FLOWS_PER_RULESET,
                                              max_size=FLOWS_PER_RULESET), label="flows"):
        sport = next(_sports)
        kernel = flow(nat_router.kernel, kind, dst, port, sport)
        ours = flow(nat_router.bpf, kind, dst, port, sport)
        nat_router.agreement["dnat flows"][0] += 1
        nat_router.agreement["dnat flows"][1] += kernel == ours
        assert ours == kernel, (f"{kind} to {dst}:{port} from port {sport}: kernel {kernel}, "
                                f"bpfilter {ours}\nruleset:\n{text}")


def test_an_address_only_dnat_translates_replies_and_errors(nat_router):
    """The cases found by hand: a RST that ends the connection still goes back
    translated (tracked at eth1's ingress, then again at eth0's egress), and an ICMP error
    about a DNATed datagram quotes what the client sent."""
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n"
            f"-A PREROUTING -d {SERVER_ADDR}/32 -p tcp -m tcp --dport 8081 "
            "-j DNAT --to-destination 203.0.113.2\n"
            f"-A PREROUTING -d {SERVER_ADDR}/32 -p udp -j DNAT --to-destination "
            "203.0.113.3:5353\nCOMMIT\n"
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "COMMIT\n")
    nat_router.load(text)
    for kind, port in (("syn", 8081), ("udp", 53)):
        sport = next(_sports)
        kernel = flow(nat_router.kernel, kind, SERVER_ADDR, port, sport)
        assert kernel and kernel[0], "the kernel answers both"
        assert all(reply[0] == SERVER_ADDR for reply in kernel[0])
        assert flow(nat_router.bpf, kind, SERVER_ADDR, port, sport) == kernel
    # `bpfilter conntrack` shows the binding as conntrack -L shows the reply tuple
    with netns.entered(nat_router.bpf.server):
        listed = list(conntable.connections(state.Paths("eth0", state.netns_id())))
    assert [(c.src, c.dst, c.dport, c.dnat) for c in listed if c.sport == sport] == \
        [(CLIENT_ADDR, SERVER_ADDR, 53, "203.0.113.3:5353")]


def test_the_port_forward_example_conforms(nat_router):
    """examples/port-forward.v4: forwards to a far host (listening and not), to the
    router's own SSH (the reply leaves from the host itself), and what no forward covers,
    through a stateful FORWARD and a DROP INPUT."""
    nat_router.load((EXAMPLES / "port-forward.v4").read_text())
    for kind, port in (("syn", 8080), ("syn", 2222), ("udp", 5353), ("syn", 22),
                       ("syn", 80), ("udp", 53), ("ping", 0), ("syn", 8081)):
        sport = next(_sports)
        kernel = flow(nat_router.kernel, kind, SERVER_ADDR, port, sport)
        ours = flow(nat_router.bpf, kind, SERVER_ADDR, port, sport)
        assert ours == kernel, f"{kind} to port {port}: kernel {kernel}, bpfilter {ours}"
