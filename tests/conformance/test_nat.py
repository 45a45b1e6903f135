"""NAT against the kernel's: generated nat PREROUTING rulesets (port forwards to the far
namespace and to the router itself, REDIRECTs, with FORWARD filtering by connection state) and
POSTROUTING ones (SNAT and MASQUERADE out to the far namespace, with and without DNAT
before them) on mirror routers, and flows through them: a SYN (and, when it is answered,
the handshake's ACK with data), UDP datagrams, pings. What the client gets back must be
the same on both sides, field by field: addresses and ports (translated back), TCP flags,
ICMP type and code, the packet an ICMP error quotes, and every checksum valid; and what the
far end saw as the source (its UDP echo's answer, its TCP listener's peer)."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether

from bpfilter import build
from bpfilter.codegen import program
from bpfilter.runtime import conntable, state
from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR, netns
from tests.conftest import EXAMPLES
from tests.conformance.harness import FAR_LISTENER, SETTINGS, count
from tests.conformance.nat_flows import (ACCEPT_PORT, ECHO_PORT, FarPeers, describe, flow,
                                         snat_flow, sports)
from bpfilter.testbed.veth import ROUTER_LINK

GENERATED_RULESETS = count(10)
FLOWS_PER_RULESET = 12
# Where DNAT sends: two far hosts (one listens on port 80), the router's own address
# (listening on 22), and an address of the router's local range nothing listens on.
TARGETS = (FAR_LISTENER, "203.0.113.3", SERVER_ADDR, "198.18.0.9")
PORTS = (22, 53, 80, 8080, 8081)
DESTINATIONS = (SERVER_ADDR, "198.18.0.7", FAR_LISTENER)



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
    if port and draw(st.booleans()):  # a range: the packet's own port, or the lowest free
        port = f"{port}-{port + 1}"
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


flows = st.tuples(st.sampled_from(["syn", "syn", "udp", "ping"]),
                  st.sampled_from(DESTINATIONS), st.sampled_from(PORTS))


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_dnat_rulesets_conform(nat_router, data):
    text = data.draw(nat_rulesets(), label="ruleset")
    nat_router.load(text)
    for kind, dst, port in data.draw(st.lists(flows, min_size=FLOWS_PER_RULESET,
                                              max_size=FLOWS_PER_RULESET), label="flows"):
        sport = next(sports)
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
        sport = next(sports)
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
        sport = next(sports)
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
        sport = next(sports)
        kernel = flow(nat_router.kernel, kind, dst, port, sport)
        assert kernel and kernel[0] and all(reply[0] == dst for reply in kernel[0])
        ours = flow(nat_router.bpf, kind, dst, port, sport)
        assert ours == kernel, f"{kind} to {dst}:{port}: kernel {kernel}, bpfilter {ours}"


def test_a_dnat_port_range_keeps_the_port_or_takes_the_lowest_free(nat_router, far_peers):
    """DNAT to a port range: the packet's own port when it is in the range and free; when
    another connection's reply tuple holds it (the same client port to another address
    DNATed to the same place), the next; outside the range, the lowest free."""
    text = (NAT_HEAD + "".join(
        f"-A PREROUTING -d {dst}/32 -p udp -j DNAT --to-destination {FAR_LISTENER}:7-8\n"
        for dst in ("198.18.0.7", "198.18.0.8")) + "COMMIT\n" + FILTER_OPEN)
    nat_router.load(text)
    sport = next(sports)
    for dst, port in (("198.18.0.7", 7), ("198.18.0.8", 7), ("198.18.0.7", 53)):
        kernel = snat_flow(nat_router.kernel, far_peers, "udp", dst, port, sport)
        ours = snat_flow(nat_router.bpf, far_peers, "udp", dst, port, sport)
        assert ours == kernel, f"udp to {dst}:{port}: kernel {kernel}, bpfilter {ours}"


# Clients behind the router (the client namespace answers for every address of its range)
# and the far ranges a connection's address is chosen in.
RANGE_CLIENTS = [f"100.64.0.{host}" for host in range(2, 10)]
FAR_RANGE = "203.0.113.16-203.0.113.31"
SNAT_RANGE = "198.18.0.50-198.18.0.57"


def _range_choices(pair, peers: FarPeers, text: str, flows) -> tuple[list, list]:
    """`text` loaded; each (client, destination, port, client port) a TCP connection; per
    side, where the far listener saw each one come from and to."""
    pair.load(text)
    seen: tuple[list, list] = ([], [])
    for client, dst, port, sport in flows:
        for bed, where in zip((pair.kernel, pair.bpf), seen):
            replies = flow(bed, "syn", dst, port, sport, src=client)
            where.append(peers.accepted(bed) if any("SA" in r for r in replies[0]) else
                         replies)
    return seen


def _dnat_ranges(pair, peers: FarPeers) -> tuple[list, list]:
    text = (NAT_HEAD + "".join(
        f"-A PREROUTING -d {dst}/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
        f"{FAR_RANGE}:{ACCEPT_PORT}{flag}\n"
        for dst, flag in (("198.18.0.7", ""), ("198.18.0.8", " --persistent")))
        + "COMMIT\n" + FILTER_OPEN)
    return _range_choices(pair, peers, text, [
        (client, dst, 8080, next(sports)) for client in RANGE_CLIENTS
        for dst in ("198.18.0.7", "198.18.0.8")])


def test_a_dnat_address_range_chooses_as_the_kernel(nat_router, far_peers):
    """DNAT to 16 far addresses: each client's connection lands on the one the kernel's
    hash of (client, destination) picks, or of the client alone with --persistent; what
    the far listener accepted (peer and the address it came to) is the same, connection
    by connection."""
    kernel, ours = _dnat_ranges(nat_router, far_peers)
    assert len({accepted[1][0] for accepted in kernel}) > 2, f"one or two targets: {kernel}"
    assert ours == kernel


def test_a_wrong_range_hash_is_seen(nat_router, far_peers, monkeypatch):
    """The same flows with the hash seeded without the destination (a mutation of
    bf_nat_pick): some connection lands elsewhere than the kernel's, and the comparison
    above says so."""
    headers = program.runtime_headers()
    seed = "(persistent ? 0 : bpf_htonl(dst))"
    assert seed in headers["nat.h"]
    headers["nat.h"] = headers["nat.h"].replace(seed, "0")
    monkeypatch.setattr(build, "runtime_headers", lambda: headers)
    kernel, ours = _dnat_ranges(nat_router, far_peers)
    assert ours != kernel


def test_snat_address_ranges_choose_as_the_kernel(nat_router, far_peers):
    """SNAT to 8 addresses: each client's source as the kernel's hash picks it; the same
    client port to a second far address keeps the source its first connection got while
    that one lives (find_appropriate_src), whatever the hash would pick for the second;
    --persistent hashes the client alone."""
    for flag in ("", " --persistent"):
        text = (NAT_HEAD + f"-A POSTROUTING -o eth1 -p tcp -j SNAT --to-source {SNAT_RANGE}"
                f"{flag}\nCOMMIT\n" + FILTER_OPEN)
        kernel, ours = _range_choices(nat_router, far_peers, text, [
            (client, dst, ACCEPT_PORT, sport) for client, sport in zip(RANGE_CLIENTS, sports)
            for dst in (FAR_LISTENER, "203.0.113.5")])
        assert len({accepted[0][0] for accepted in kernel}) > 2, f"few sources: {kernel}"
        assert all(kernel[i][0] == kernel[i + 1][0] for i in range(0, len(kernel), 2))
        assert ours == kernel, flag


def test_a_dnat_port_shift_maps_ports_as_the_kernel(nat_router, far_peers):
    """DNAT's `p-q/base`: port p + (the packet's - base) modulo the range's size, a port
    below base wrapping as the kernel's 16-bit offset; the far listener takes one of the
    two, the other answers RST, connection by connection as the kernel's."""
    text = (NAT_HEAD + "-A PREROUTING -d 198.18.0.7/32 -p tcp -m tcp --dport 4990:5010 -j "
            f"DNAT --to-destination {FAR_LISTENER}:{ACCEPT_PORT}-{ACCEPT_PORT + 1}/5000\n"
            "COMMIT\n" + FILTER_OPEN)
    kernel, ours = _range_choices(nat_router, far_peers, text, [
        (CLIENT_ADDR, "198.18.0.7", port, next(sports)) for port in (4999, 5000, 5001, 5002)])
    assert [seen[1][1] if isinstance(seen, tuple) else "RST" for seen in kernel] == [
        "RST", ACCEPT_PORT, "RST", ACCEPT_PORT]
    assert ours == kernel


def _fragmented(bed, dst: str, port: int, sport: int) -> tuple:
    """A 3,000-byte datagram from the client in three fragments; the answers (the far
    echo's says whom it saw) as the client sees them."""
    datagram = IP(src=CLIENT_ADDR, dst=dst, id=sport) / UDP(sport=sport, dport=port) / (
        b"x" * 3000)
    frames = [bytes(Ether(src=bed.client_mac, dst=bed.server_mac) / f)
              for f in fragment(datagram, fragsize=1200)]
    for frame in frames[:-1]:
        bed.sock.send(frame)
    return tuple(sorted(describe(r) for r in bed.send(frames[-1])))


def test_later_fragments_get_the_first_ones_translation(nat_router, far_peers):
    """The kernel reassembles before NAT; bpfilter rewrites the first fragment before the
    kernel's reassembly, so the later ones get the address it got (at PREROUTING for
    DNAT's destination, at egress for MASQUERADE's source after the kernel cut the
    datagram again): the far echo answers a fragmented datagram as the kernel's does."""
    nat_router.load(NAT_HEAD + f"-A PREROUTING -d 198.18.0.7/32 -p udp -j DNAT "
                    f"--to-destination {FAR_LISTENER}:{ECHO_PORT}\n"
                    "-A POSTROUTING -o eth1 -s 100.64.0.0/24 -j MASQUERADE\nCOMMIT\n"
                    + FILTER_OPEN)
    for dst in ("198.18.0.7", FAR_LISTENER):
        sport = next(sports)
        kernel = _fragmented(nat_router.kernel, dst, ECHO_PORT, sport)
        assert kernel, "the kernel's router answers"
        ours = _fragmented(nat_router.bpf, dst, ECHO_PORT, sport)
        assert ours == kernel, f"to {dst}: kernel {kernel}, bpfilter {ours}"


# SNAT: sources the router can stand for (its own range, its eth1 address, another of its
# range), the ports the far end listens on (UDP 7 answers with the peer it saw, TCP 8443
# accepts), and port ranges for the new source.
SNAT_SOURCES = ("198.18.0.50", ROUTER_LINK, "198.18.0.51")
SNAT_RANGES = ((2000, 2999), (40000, 40099), (30000, 30000))
SNAT_DNAT = ("198.18.0.7", 8080)  # a forward to the far listener, to combine DNAT and SNAT




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
        sport = next(sports)
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
    sport = next(sports)
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
    sport = next(sports)
    for bed in (nat_router.kernel, nat_router.bpf):
        udp = snat_flow(bed, far_peers, "udp", FAR_LISTENER, ECHO_PORT, sport)
        assert udp[0][0][6] == (ROUTER_LINK, "the client's"), udp
        assert flow(bed, "ping", FAR_LISTENER, 0, sport)[0], "the answer comes back"


def test_two_clients_pinging_with_one_identifier_both_get_answers(nat_router, far_peers):
    """Windows pings with identifier 1: two hosts behind a MASQUERADE router pinging the
    same far host at once hold the same tuple after the source is rewritten, and nf_nat
    gives the second another identifier (an ICMP query's "port"), translated back in the
    echo replies. Before, the second's binding took the first's replies away."""
    nat_router.load(NAT_HEAD + "-A POSTROUTING -o eth1 -j MASQUERADE\nCOMMIT\n"
                    + FILTER_OPEN)
    ident = next(sports)
    clients = (CLIENT_ADDR, "100.64.0.3")
    seen = [[flow(bed, "ping", FAR_LISTENER, 0, ident, src=client)
             for _round in range(2) for client in clients]
            for bed in (nat_router.kernel, nat_router.bpf)]
    assert seen[0] == seen[1], seen
    assert all(step[0] for step in seen[1]), "every ping is answered"
    with netns.entered(nat_router.bpf.server):
        listed = list(conntable.connections(state.Paths("eth0", state.netns_id())))
    given = {c.src: c.snat for c in listed if c.proto == "icmp"}
    assert given[CLIENT_ADDR] == f"{ROUTER_LINK}:{ident}", given  # its own identifier
    assert given["100.64.0.3"].startswith(ROUTER_LINK + ":") and \
        given["100.64.0.3"] != given[CLIENT_ADDR], given


def test_input_snat_gives_the_hosts_socket_the_new_source(nat_router):
    """nat INPUT's SNAT (after filter INPUT): the router's own listener accepts the client
    under the SNAT address, and the client gets the answers (SYN/ACK, a ping's reply, a
    closed port's error quoting what it sent) from the router's address to its own, as
    the kernel's LOCAL_OUT translation gives them back; a flow no SNAT covers is left
    alone."""
    nat_router.load(NAT_HEAD + "-A INPUT -p tcp -m tcp --dport 2222 -j SNAT --to-source "
                    "100.64.0.77\n-A INPUT -p icmp -j SNAT --to-source 100.64.0.78\n"
                    "-A INPUT -p udp -j SNAT --to-source 100.64.0.79:3000-3999\n"
                    "COMMIT\n" + FILTER_OPEN)
    listeners = {}
    try:
        for bed in (nat_router.kernel, nat_router.bpf):
            with netns.entered(bed.server):
                listeners[bed.server] = socket.create_server((SERVER_ADDR, 2222))
            listeners[bed.server].settimeout(0.5)
        for kind, port in (("syn", 2222), ("ping", 0), ("udp", 9), ("syn", 22)):
            sport = next(sports)
            seen = []
            for bed in (nat_router.kernel, nat_router.bpf):
                replies = flow(bed, kind, SERVER_ADDR, port, sport)
                peer = None
                if kind == "syn" and port == 2222:
                    conn, peer = listeners[bed.server].accept()
                    conn.close()
                seen.append((replies, peer))
            assert seen[0][0][0], f"the kernel's router answers {kind} {port}"
            if port == 2222:
                assert seen[0][1] == ("100.64.0.77", sport)
            assert seen[1] == seen[0], f"{kind} to {port}: kernel {seen[0]}, bpfilter {seen[1]}"
    finally:
        for listener in listeners.values():
            listener.close()


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
        sport = next(sports)
        kernel = snat_flow(nat_router.kernel, far_peers, kind, dst, port, sport)
        ours = snat_flow(nat_router.bpf, far_peers, kind, dst, port, sport)
        assert ours == kernel, f"{kind} to {dst}:{port}: kernel {kernel}, bpfilter {ours}"
        assert bool(kernel[0]) == (dst != FAR_LISTENER or kind == "udp"), kernel
