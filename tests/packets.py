"""Hypothesis strategies for test frames, seeded with the values a ruleset mentions."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfilter import ir

LOCAL = ipaddress.IPv4Network("198.18.0.0/15")
_BAD_SOURCES = [ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3", "198.18.0.0/15")]


@dataclass
class Interesting:
    """Values around every boundary in a ruleset: where verdicts can flip."""

    addresses: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=lambda: {0, 1, 22, 53, 80, 443, 65535})
    ttls: set[int] = field(default_factory=lambda: {1, 2, 64, 255})
    lengths: set[int] = field(default_factory=set)
    icmp: set[tuple[int, int]] = field(default_factory=lambda: {(8, 0), (0, 0), (3, 3)})
    macs: set[str] = field(default_factory=set)


def _around(value: int, low: int, high: int) -> set[int]:
    return {v for v in (value - 1, value, value + 1) if low <= v <= high}


def interesting(ruleset: ir.Ruleset) -> Interesting:
    found = Interesting()

    def add_range(r: ir.Range, into: set[int], top: int) -> None:
        into |= _around(r.low, 0, top) | _around(r.high, 0, top)

    for _t, _c, rule in ruleset.rules():
        for m in rule.matches:
            if isinstance(m, ir.AddressMatch):
                net = m.network
                for a in (net.network_address, net.broadcast_address):
                    found.addresses |= {str(a + d) for d in (-1, 0, 1)
                                        if 0 <= int(a) + d < 2 ** 32}
            elif isinstance(m, ir.IpRangeMatch):
                for spec in (m.src, m.dst):
                    if spec:
                        found.addresses |= {str(spec.low - 1), str(spec.low),
                                            str(spec.high), str(spec.high + 1)}
            elif isinstance(m, (ir.TcpMatch, ir.UdpMatch)):
                for spec in (m.sport, m.dport):
                    if spec:
                        add_range(spec.ports, found.ports, 65535)
            elif isinstance(m, ir.MultiportMatch):
                for r in m.ports:
                    add_range(r, found.ports, 65535)
            elif isinstance(m, ir.TtlMatch):
                found.ttls |= _around(m.value, 1, 255)
            elif isinstance(m, ir.LengthMatch):
                add_range(m.length, found.lengths, 1500)
            elif isinstance(m, ir.IcmpMatch) and m.icmp_type != 255:
                found.icmp |= {(m.icmp_type, m.codes.low), (m.icmp_type, 0)}
            elif isinstance(m, ir.MacSourceMatch):
                found.macs.add(":".join(f"{b:02x}" for b in m.address))
    return found


def _usable_source(address: str) -> bool:
    a = ipaddress.IPv4Address(address)
    return not any(a in n for n in _BAD_SOURCES) and a != ipaddress.IPv4Address(
        "255.255.255.255")


@st.composite
def frames(draw, values: Interesting, interfaces: tuple[str, ...]):
    """(ingress interface name, frame bytes without destination MAC fixed up)."""
    iface = draw(st.sampled_from(interfaces))
    sources = sorted(a for a in values.addresses if _usable_source(a))
    random_source = st.ip_addresses(v=4).map(str).filter(_usable_source)
    src = draw(st.one_of(st.sampled_from(sources), random_source) if sources
               else random_source)
    random_local = st.integers(1, LOCAL.num_addresses - 2).map(
        lambda i: str(LOCAL.network_address + i))
    local = sorted(a for a in values.addresses
                   if ipaddress.IPv4Address(a) in LOCAL and a != str(LOCAL.network_address))
    dst = draw(st.one_of(st.sampled_from(local), random_local) if local else random_local)
    ttl = draw(st.sampled_from(sorted(values.ttls)))
    smac = draw(st.sampled_from(sorted(values.macs | {"02:00:00:00:00:01"})))
    ports = st.one_of(st.sampled_from(sorted(values.ports)), st.integers(0, 65535))
    proto = draw(st.sampled_from(["tcp", "tcp", "tcp", "udp", "udp", "icmp", "gre",
                                  "tcp-truncated"]))
    ip = IP(src=src, dst=dst, ttl=ttl, id=draw(st.integers(0, 65535)),
            tos=draw(st.sampled_from([0, 0x10, 0xb8])))
    if proto == "tcp":
        l4 = TCP(sport=draw(ports), dport=draw(ports), flags=draw(st.integers(0, 0x3f)),
                 seq=draw(st.integers(0, 2 ** 32 - 1)), ack=draw(st.integers(0, 2 ** 32 - 1)))
    elif proto == "tcp-truncated":
        ip.proto = 6
        l4 = Raw(bytes(TCP(sport=draw(ports), dport=draw(ports)))[:draw(st.integers(0, 19))])
    elif proto == "udp":
        l4 = UDP(sport=draw(ports), dport=draw(ports))
    elif proto == "icmp":
        icmp_type, code = draw(st.one_of(st.sampled_from(sorted(values.icmp)),
                                         st.tuples(st.integers(0, 20), st.integers(0, 4))))
        l4 = ICMP(type=icmp_type, code=code)
    else:
        ip.proto = 47
        l4 = Raw(b"\x00\x00\x08\x00")
    packet = ip / l4
    lengths = sorted(values.lengths | {len(packet)})
    target = draw(st.one_of(st.just(len(packet)), st.sampled_from(lengths)))
    if proto != "tcp-truncated" and target > len(packet):
        packet = packet / Raw(b"\x00" * min(target - len(packet), 1400))
    return iface, Ether(src=smac, dst="00:00:00:00:00:00") / packet
