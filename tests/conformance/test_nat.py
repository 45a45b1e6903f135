"""NAT against the kernel's: generated nat PREROUTING rulesets (port forwards to the far
namespace and to the router itself, REDIRECTs, with FORWARD filtering by connection state) and
POSTROUTING ones (SNAT and MASQUERADE out to the far namespace, with and without DNAT
before them) on mirror routers, and flows through them: a SYN (and, when it is answered,
the handshake's ACK with data), UDP datagrams, pings. What the client gets back must be
the same on both sides, field by field: addresses and ports (translated back), TCP flags,
ICMP type and code, the packet an ICMP error quotes, and every checksum valid; and what the
far end saw as the source (its UDP echo's answer, its TCP listener's peer)."""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
import sys
from typing import Iterator, Optional

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
from bpfilter.testbed.veth import ROUTER_LINK

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
    to = draw(st.sampled_from(TARGETS + ("REDIRECT",)))
    port = draw(st.sampled_from(PORTS)) if proto in ("tcp", "udp") and draw(st.booleans()) \
        else None
    if to == "REDIRECT":  # to the router's eth0 address, SERVER_ADDR
        return " ".join(parts + ["-j REDIRECT"] + ([f"--to-ports {port}"] if port else []))
    return " ".join(parts + ["-j DNAT --to-destination", to + (f":{port}" if port else "")])


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
                   f"-A FORWARD -d {draw(st.sampled_from(TARGETS[:2]))}/32 -j ACCEPT"
                   if draw(st.booleans()) else  # Docker's way: what DNAT sent on
                   "-A FORWARD -m conntrack --ctstate DNAT -j ACCEPT"]
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


def flow(bed, kind: str, dst: str, port: int, sport: int, src: str = CLIENT_ADDR
         ) -> list[tuple]:
    """One flow from the client (or another address behind it); what came back, in order
    of the flow's steps."""
    base = IP(src=src, dst=dst)
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


def test_redirect_sends_to_the_address_of_the_interface_it_came_in_by(nat_router):
    """REDIRECT: the router's own eth0 address (SERVER_ADDR, its primary) whatever the
    destination was: a port the router listens on answers as the old destination, a
    closed one resets as it, a datagram's ICMP error quotes what the client sent; and a
    flow to the far listener that no REDIRECT covers is forwarded as before."""
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n"
            "-A PREROUTING -p tcp -m tcp --dport 2222 -j REDIRECT --to-ports 22\n"
            f"-A PREROUTING -d {FAR_LISTENER}/32 -p tcp -m tcp --dport 8080 -j REDIRECT\n"
            "-A PREROUTING -p udp -j REDIRECT\nCOMMIT\n"
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "COMMIT\n")
    nat_router.load(text)
    for kind, dst, port in (("syn", "198.18.0.7", 2222), ("syn", FAR_LISTENER, 2222),
                            ("syn", FAR_LISTENER, 8080), ("udp", FAR_LISTENER, 53),
                            ("syn", FAR_LISTENER, 80)):
        sport = next(_sports)
        kernel = flow(nat_router.kernel, kind, dst, port, sport)
        assert kernel and kernel[0] and all(reply[0] == dst for reply in kernel[0])
        ours = flow(nat_router.bpf, kind, dst, port, sport)
        assert ours == kernel, f"{kind} to {dst}:{port}: kernel {kernel}, bpfilter {ours}"


# SNAT: sources the router can stand for (its own range, its eth1 address, another of its
# range), the ports the far end listens on (UDP 7 answers with the peer it saw, TCP 8443
# accepts), and port ranges for the new source.
SNAT_SOURCES = ("198.18.0.50", ROUTER_LINK, "198.18.0.51")
ECHO_PORT, ACCEPT_PORT = 7, 8443
SNAT_RANGES = ((2000, 2999), (40000, 40099), (30000, 30000))
SNAT_DNAT = ("198.18.0.7", 8080)  # a forward to the far listener, to combine DNAT and SNAT


# The far end's echo, a process of its own in the far namespace: a thread of the test's
# would answer after the frame's grace, waiting for the interpreter lock.
_ECHO = f"""
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{FAR_LISTENER}", {ECHO_PORT}))
print("ready", flush=True)
while True:
    data, (address, port) = sock.recvfrom(2048)
    sock.sendto(f"{{address}}:{{port}}".encode(), (address, port))
"""


class FarPeers:
    """In each far namespace, a UDP echo that answers with the address and port it saw
    and a TCP listener whose accepted peers are read back."""

    def __init__(self, pair: MirrorPair):
        self.echoes, self.tcp = [], {}
        try:
            for bed in (pair.kernel, pair.bpf):
                echo = subprocess.Popen(["ip", "netns", "exec", bed.far, sys.executable,
                                         "-c", _ECHO], stdout=subprocess.PIPE, text=True)
                self.echoes.append(echo)
                assert echo.stdout.readline().strip() == "ready"
                with netns.entered(bed.far):
                    self.tcp[bed.far] = socket.create_server(("0.0.0.0", ACCEPT_PORT))
                self.tcp[bed.far].settimeout(0.5)
        except BaseException:
            self.close()
            raise

    def peer(self, bed) -> Optional[tuple[str, int]]:
        try:
            conn, address = self.tcp[bed.far].accept()
        except OSError:  # timed out: nothing connected
            return None
        conn.close()
        return address

    def close(self) -> None:
        for echo in self.echoes:
            echo.kill()
            echo.wait()
        for sock in self.tcp.values():
            sock.close()


@pytest.fixture(scope="module")
def far_peers(nat_router) -> Iterator[FarPeers]:
    peers = FarPeers(nat_router)
    try:
        yield peers
    finally:
        peers.close()


@st.composite
def snat_rule(draw) -> str:
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", None]))
    parts = ["-A POSTROUTING"]
    if draw(st.booleans()):
        parts.append("-o eth1")
    if draw(st.booleans()):
        parts.append(f"-s {CLIENT_ADDR}/32")
    if proto:
        parts.append(f"-p {proto}")
        if proto != "icmp" and draw(st.booleans()):
            parts.append(f"-m {proto} --dport {draw(st.sampled_from([ECHO_PORT, ACCEPT_PORT]))}")
    ports = draw(st.sampled_from((None,) + SNAT_RANGES)) if proto in ("tcp", "udp") else None
    span = "" if ports is None else str(ports[0]) if ports[0] == ports[1] \
        else f"{ports[0]}-{ports[1]}"
    if draw(st.booleans()):
        parts.append("-j MASQUERADE" + (f" --to-ports {span}" if span else ""))
    else:
        parts.append(f"-j SNAT --to-source {draw(st.sampled_from(SNAT_SOURCES))}"
                     + (f":{span}" if span else ""))
    if draw(st.integers(0, 4)) == 0:
        parts.append("--random")
    return " ".join(parts)


@st.composite
def snat_rulesets(draw) -> str:
    rules = draw(st.lists(snat_rule(), min_size=1, max_size=4))
    if draw(st.booleans()):  # an exception ahead of them
        rules.insert(0, f"-A POSTROUTING -p udp -m udp --dport {ECHO_PORT} -j ACCEPT")
    if draw(st.booleans()):  # through a user chain
        rules = [r.replace("-A POSTROUTING", "-A OUT") for r in rules]
        rules = ["-A POSTROUTING -j OUT"] + rules
    prerouting = []
    if draw(st.booleans()):
        prerouting.append(f"-A PREROUTING -d {SNAT_DNAT[0]}/32 -p tcp -m tcp --dport "
                          f"{SNAT_DNAT[1]} -j DNAT --to-destination {FAR_LISTENER}:{ACCEPT_PORT}")
    chains = ":OUT - [0:0]\n" if any(r.startswith("-A OUT") for r in rules) else ""
    return ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n" + chains
            + "".join(r + "\n" for r in prerouting + rules) + "COMMIT\n"
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "COMMIT\n")


def _port_seen(port: int, sport: int) -> object:
    """A source port as the far end saw it: the client's own, or another (the kernel
    picks a new one at random: test_snat_port_ranges checks where)."""
    return "the client's" if port == sport else "another"


def snat_flow(bed, peers: FarPeers, kind: str, dst: str, port: int, sport: int,
              src: str = CLIENT_ADDR, ports=_port_seen) -> list:
    """A flow as `flow`, the far end's answers about the source it saw made comparable
    (`ports` says what of a port is compared), and for TCP the peer its listener
    accepted."""
    def seen(field):
        found = re.fullmatch(rb"([\d.]+):(\d+)", field) if isinstance(field, bytes) else None
        return (found[1].decode(), ports(int(found[2]), sport)) if found else field

    steps = [tuple(tuple(seen(f) for f in reply) for reply in step)
             for step in flow(bed, kind, dst, port, sport, src)]
    if kind == "syn":
        peer = peers.peer(bed) if any("SA" in reply for reply in steps[0]) else None
        steps.append(peer and (peer[0], ports(peer[1], sport)))
    return steps


snat_flows = st.sampled_from([("syn", FAR_LISTENER, ACCEPT_PORT), ("udp", FAR_LISTENER, ECHO_PORT),
                              ("ping", FAR_LISTENER, 0), ("syn", SNAT_DNAT[0], SNAT_DNAT[1]),
                              ("syn", "203.0.113.3", ACCEPT_PORT),
                              ("udp", "203.0.113.3", ECHO_PORT)])  # an ICMP error back


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_snat_rulesets_conform(nat_router, far_peers, data):
    text = data.draw(snat_rulesets(), label="ruleset")
    nat_router.load(text)
    for kind, dst, port in data.draw(st.lists(snat_flows, min_size=FLOWS_PER_RULESET,
                                              max_size=FLOWS_PER_RULESET), label="flows"):
        sport = next(_sports)
        kernel = snat_flow(nat_router.kernel, far_peers, kind, dst, port, sport)
        ours = snat_flow(nat_router.bpf, far_peers, kind, dst, port, sport)
        nat_router.agreement["snat flows"][0] += 1
        nat_router.agreement["snat flows"][1] += kernel == ours
        # (the share of flows the far end answered: the "agree" column of this row)
        nat_router.agreement["snat flows answered"][0] += 1
        nat_router.agreement["snat flows answered"][1] += bool(kernel[0])
        assert ours == kernel, (f"{kind} to {dst}:{port} from port {sport}: kernel {kernel}, "
                                f"bpfilter {ours}\nruleset:\n{text}")


NAT_HEAD = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n")
FILTER_OPEN = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def test_snat_ports_and_masquerade_as_the_kernel_picks_them(nat_router, far_peers):
    """A range the client's port is outside of: a port of the range. Two clients behind
    the router with the same port, to the same far end under one address: the second
    gets another port (the first keeps its own). MASQUERADE: eth1's address. `bpfilter
    conntrack` shows the new source as conntrack -L's reply tuple does."""
    nat_router.load(NAT_HEAD + "-A POSTROUTING -o eth1 -p udp -j SNAT --to-source "
                    "198.18.0.50:2000-2999\n-A POSTROUTING -o eth1 -p tcp -j SNAT "
                    "--to-source 198.18.0.50\nCOMMIT\n" + FILTER_OPEN)
    in_range = lambda port, sport: 2000 <= port <= 2999  # noqa: E731
    sport = next(_sports)
    for bed in (nat_router.kernel, nat_router.bpf):
        udp = snat_flow(bed, far_peers, "udp", FAR_LISTENER, ECHO_PORT, sport, ports=in_range)
        assert udp[0][0][6] == ("198.18.0.50", True), udp
        first = snat_flow(bed, far_peers, "syn", FAR_LISTENER, ACCEPT_PORT, sport)
        second = snat_flow(bed, far_peers, "syn", FAR_LISTENER, ACCEPT_PORT, sport,
                           src="100.64.0.3")
        assert (first[-1], second[-1]) == (("198.18.0.50", "the client's"),
                                           ("198.18.0.50", "another")), (bed, first, second)
    with netns.entered(nat_router.bpf.server):
        listed = list(conntable.connections(state.Paths("eth0", state.netns_id())))
    bound = {(c.src, c.proto): c.snat for c in listed if c.sport == sport}
    assert bound[(CLIENT_ADDR, "tcp")] == f"198.18.0.50:{sport}"
    assert bound[("100.64.0.3", "tcp")] not in (None, f"198.18.0.50:{sport}")
    assert 2000 <= int(bound[(CLIENT_ADDR, "udp")].split(":")[1]) <= 2999

    nat_router.load(NAT_HEAD + "-A POSTROUTING -o eth1 -j MASQUERADE\nCOMMIT\n"
                    + FILTER_OPEN)
    sport = next(_sports)
    for bed in (nat_router.kernel, nat_router.bpf):
        udp = snat_flow(bed, far_peers, "udp", FAR_LISTENER, ECHO_PORT, sport)
        assert udp[0][0][6] == (ROUTER_LINK, "the client's"), udp
        assert flow(bed, "ping", FAR_LISTENER, 0, sport)[0], "the answer comes back"


def test_the_hosts_own_connections_are_snatted_at_egress(nat_router, far_peers):
    """The router's own datagram to the far echo leaves under the SNAT address (chosen
    and written in its egress program) and the answer reaches its socket (the reply
    tuple's destination rewritten at eth1's ingress)."""
    nat_router.load(NAT_HEAD + "-A POSTROUTING -o eth1 -p udp -j SNAT --to-source "
                    "198.18.0.50\nCOMMIT\n" + FILTER_OPEN)
    answers = []
    for bed in (nat_router.kernel, nat_router.bpf):
        with netns.entered(bed.server):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(1.0)
            sock.bind((ROUTER_LINK, 0))
            sock.sendto(b"who", (FAR_LISTENER, ECHO_PORT))
            answers.append(sock.recv(100).decode().replace(str(sock.getsockname()[1]),
                                                           "its port"))
    assert answers == ["198.18.0.50:its port"] * 2, answers


# Destinations the router's own packets are DNATed from at OUTPUT: one its default route
# sends out eth0 (towards the client), one in the far range (out eth1, as the new one).
OUTPUT_DNAT = ("192.0.2.99", "203.0.113.99")


def _own_exchange(bed, peers: FarPeers, dst: str) -> tuple:
    """The router's own datagram to dst:53 and TCP connection to dst:9999: the answer its
    socket got and from whom, the peer its TCP socket sees, and the peer the far end
    accepted (ports by kind: the router's own ephemeral ones differ by chance)."""
    with netns.entered(bed.server):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with udp, tcp:
        udp.settimeout(1.0)
        tcp.settimeout(1.0)
        udp.sendto(b"who", (dst, 53))
        try:
            answer, sender = udp.recvfrom(100)
            mine = str(udp.getsockname()[1])
            answer = answer.decode().replace(mine, "its port")
        except OSError as exc:
            answer, sender = type(exc).__name__, None
        try:
            tcp.connect((dst, 9999))
            connected = tcp.getpeername()
        except OSError as exc:
            connected = type(exc).__name__
        accepted = peers.peer(bed)
    return answer, sender, connected, accepted and accepted[0]


def test_the_hosts_own_connections_are_dnatted_at_output(nat_router, far_peers):
    """OUTPUT's DNAT: the router's own datagram and TCP connection, to an address routed
    out eth0 and to one routed out eth1, reach the far end's echo and listener (rerouted:
    the packet is sent on from eth0's egress to eth1); the answers reach the sockets as
    from the old destination (their source rewritten back at INPUT's end, in eth1's
    ingress program). With MASQUERADE too, the far end sees eth1's address."""
    for masquerade in ("", "-A POSTROUTING -o eth1 -j MASQUERADE\n"):
        rules = "".join(
            f"-A OUTPUT -d {dst}/32 -p udp -m udp --dport 53 -j DNAT --to-destination "
            f"{FAR_LISTENER}:{ECHO_PORT}\n"
            f"-A OUTPUT -d {dst}/32 -p tcp -m tcp --dport 9999 -j DNAT --to-destination "
            f"{FAR_LISTENER}:{ACCEPT_PORT}\n" for dst in OUTPUT_DNAT)
        nat_router.load(NAT_HEAD + rules + masquerade + "COMMIT\n" + FILTER_OPEN)
        for dst in OUTPUT_DNAT:
            kernel = _own_exchange(nat_router.kernel, far_peers, dst)
            assert kernel[1] == (dst, 53) and kernel[2] == (dst, 9999), kernel
            ours = _own_exchange(nat_router.bpf, far_peers, dst)
            assert ours == kernel, f"to {dst} {masquerade}: kernel {kernel}, bpfilter {ours}"


def test_ctstate_dnat_and_snat_hold_as_the_kernels(nat_router, far_peers):
    """--ctstate DNAT holds from the first packet (DNAT ran before FORWARD) and for the
    replies; SNAT for the packets after the first (POSTROUTING chose it): FORWARD lets
    through only what they hold for, so a connection works only if both are right."""
    nat_router.load(NAT_HEAD + f"-A PREROUTING -d {SNAT_DNAT[0]}/32 -p tcp -m tcp --dport "
                    f"{SNAT_DNAT[1]} -j DNAT --to-destination {FAR_LISTENER}:{ACCEPT_PORT}\n"
                    "-A POSTROUTING -o eth1 -p udp -j MASQUERADE\nCOMMIT\n"
                    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                    "-A FORWARD -m conntrack --ctstate DNAT -j ACCEPT\n"
                    "-A FORWARD -m conntrack --ctstate SNAT -j ACCEPT\n"
                    "-A FORWARD -i eth0 -p udp -m conntrack --ctstate NEW -j ACCEPT\nCOMMIT\n")
    for kind, dst, port in (("syn", *SNAT_DNAT), ("syn", FAR_LISTENER, ACCEPT_PORT),
                            ("udp", FAR_LISTENER, ECHO_PORT)):
        sport = next(_sports)
        kernel = snat_flow(nat_router.kernel, far_peers, kind, dst, port, sport)
        ours = snat_flow(nat_router.bpf, far_peers, kind, dst, port, sport)
        assert ours == kernel, f"{kind} to {dst}:{port}: kernel {kernel}, bpfilter {ours}"
        assert bool(kernel[0]) == (dst != FAR_LISTENER or kind == "udp"), kernel
