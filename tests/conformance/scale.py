"""Rulesets of thousands of rules, and frames aimed at rules in every position.

A generated ruleset of random rules shadows itself after a few hundred: a broad rule early
takes every packet. These rules each carry a key of their own (a destination port, a
source address, an ICMP type), so a frame built from rule k's key reaches rule k however
deep it sits, and a near miss (the key's neighbour, the address just outside the prefix)
walks past it. Positions are chosen where bpfilter's internal sizes end: the classifier's
64-bit words and its 32-word scan window (2,048 entries), the 32-rule parts of chains that
stay code, the segments a chain is cut into, the folded runs' capacities, and the last
rule. Plain `random` with a seed: rulesets this size are drawn in milliseconds, and
hypothesis could not shrink them anyway.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

# The sizes past which something inside bpfilter changes: classifier words (64), its scan
# window (32 words), chain parts of code (32 rules), folded-run capacities (powers of two).
BOUNDARIES = sorted({b + d for b in (32, 64, 128, 256, 1024, 2048, 4096, 6144, 8192, 16384)
                     for d in (-2, -1, 0, 1, 2)})
# The server's local ranges (bpfilter/testbed/veth.py) and sources no rule names.
DST4, DST6 = ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8:1::/48")
STRANGER4, STRANGER6 = "100.64.7.7", "2001:db8:ff::7"


@dataclass(frozen=True)
class Key:
    """What makes a frame meet one rule: its protocol, and the one field only it names."""

    proto: str  # tcp, udp, icmp
    port: int = 0  # destination port (tcp, udp), or ICMP type << 8 | code
    src: str = ""  # a source network, when the key is an address
    dst: str = ""  # a destination network, when the key is an address
    flags: str = "S"  # the TCP flags the rule wants
    length: int = 0  # a payload the rule wants (-m length)


@dataclass(frozen=True)
class Large:
    text: str  # iptables-save (or ip6tables-save) text
    version: int
    positions: tuple[tuple[str, int], ...]  # (chain, rule index) of each key's rule
    keys: tuple[Key, ...]


class _Ports:
    """Destination ports, each given once, in shuffled order: a key's neighbours (port
    +- 1) belong to rules far away in the chain, or to none."""

    def __init__(self, rng: random.Random, count: int):
        self.free = list(range(1024, 1024 + 2 * count))
        rng.shuffle(self.free)

    def take(self) -> int:
        return self.free.pop()


def _target(rng: random.Random, proto: str, version: int) -> str:
    kind = rng.choice(["ACCEPT"] * 4 + ["DROP"] * 4 + ["REJECT", "REJECT", "count", "LOG"])
    if kind == "REJECT":
        if proto == "tcp" and rng.random() < 0.5:
            return "-j REJECT --reject-with tcp-reset"
        return ("-j REJECT --reject-with icmp-port-unreachable" if version == 4
                else "-j REJECT --reject-with icmp6-port-unreachable")
    if kind == "count":
        return ""
    if kind == "LOG":
        return '-j LOG --log-prefix "scale "'
    return f"-j {kind}"


def _host(rng: random.Random, version: int, block: int, index: int) -> str:
    """The index-th host of a block of sources: 10.<block>.x.y, 2001:db8:a<block>::x."""
    if version == 4:
        return str(ipaddress.IPv4Address((10 << 24) | (block << 16) | index))
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(f"2001:db8:a{block:x}::"))
                                     + index))


def _rule(rng: random.Random, ports: _Ports, version: int, index: int,
          mixed: bool) -> tuple[str, Key]:
    """One rule and its key. `mixed`: every kind; else runs of 60 address rules (which
    fold) with a few rules of other kinds between them, the shape that scales for chains
    that stay code."""
    roll = rng.random() if mixed else 0.95 if index % 64 < 60 else rng.random() * 0.72
    if roll < 0.30:
        port = ports.take()
        extra = rng.choice(["", "", "ct", "flags", "iface", "not iface"])
        line = {"iface": "-i eth0 ", "not iface": "! -i lan+ "}.get(extra, "")
        line += f"-p tcp -m tcp --dport {port} "
        line += {"flags": "--tcp-flags SYN,ACK SYN ",
                 "ct": "-m conntrack --ctstate NEW "}.get(extra, "")
        return line + _target(rng, "tcp", version), Key("tcp", port)
    if roll < 0.50:
        port = ports.take()
        return f"-p udp -m udp --dport {port} " + _target(rng, "udp", version), Key("udp", port)
    if roll < 0.58:
        low = ports.take()
        return (f"-p udp -m udp --dport {low}:{low + 2} " + _target(rng, "udp", version),
                Key("udp", low + 1))
    if roll < 0.62:
        port = ports.take()
        length = rng.choice([64, 100, 200])
        span = f"{length + 20}:{length + 60}" if version == 4 else f"{length + 40}:{length + 80}"
        return (f"-p udp -m udp --dport {port} -m length --length {span} "
                + _target(rng, "udp", version), Key("udp", port, length=length + 10))
    if roll < 0.66 and version == 4:
        icmp_type, code = rng.choice([(8, 0), (13, 0), (15, 0), (17, 0)])
        return (f"-p icmp -m icmp --icmp-type {icmp_type}/{code} "
                + _target(rng, "icmp", version), Key("icmp", icmp_type << 8 | code))
    if roll < 0.72:
        dst = ipaddress.ip_network((int(DST4.network_address if version == 4 else
                                        DST6.network_address) + index % 500 * 256,
                                    24 if version == 4 else 120), strict=False)
        return (f"-d {dst} -p tcp -m tcp --dport 22 " + _target(rng, "tcp", version),
                Key("tcp", 22, dst=str(dst)))
    # Address runs: several hosts or small networks in a row with one target fold into
    # one lookup (an entry of the classifier, or a folded run in code).
    length = rng.choice([32, 32, 32, 30, 28]) if version == 4 else \
        rng.choice([128, 128, 128, 126, 124])
    net = ipaddress.ip_network((_host(rng, version, 1, index * 16), length), strict=False)
    return f"-s {net} -p tcp " + _target_of_run(index, version), Key("tcp", 22, src=str(net))


def _target_of_run(index: int, version: int) -> str:
    """Neighbouring address rules share a target (so they fold), changing every 50."""
    reject = "icmp-port-unreachable" if version == 4 else "icmp6-port-unreachable"
    return ["-j DROP", "-j ACCEPT", f"-j REJECT --reject-with {reject}"][index // 50 % 3]


def generate(seed: int, size: int, version: int = 4, mixed: bool = True) -> Large:
    """About `size` rules: INPUT, with a jump to a user chain (a tenth of the rules) whose
    rules all match sources of one block, so frames reach it only through the jump."""
    rng = random.Random(seed)
    ports = _Ports(rng, size)
    sub = size // 10
    main = size - sub
    jump_at = rng.randrange(main // 3, 2 * main // 3)
    block = "172.16.0.0/12" if version == 4 else "2001:db8:b000::/36"
    positions, keys, lines = [], [], []
    for index in range(main):
        if index == jump_at:
            lines.append(f"-A INPUT -s {block} -j SUB")
            continue
        rule, key = _rule(rng, ports, version, index, mixed)
        lines.append(f"-A INPUT {rule}")
        positions.append(("INPUT", index))
        keys.append(key)
    for index in range(sub):
        src = (f"172.16.{index >> 8 & 255}.{index & 255}" if version == 4
               else str(ipaddress.IPv6Address("2001:db8:b000::") + index))
        if mixed:
            port, proto = ports.take(), rng.choice(["tcp", "udp"])
            rule = f"-p {proto} -m {proto} --dport {port} " + _target(rng, proto, version)
        else:  # one folded run after another
            port, proto, rule = 22, "tcp", "-p tcp " + _target_of_run(index, version)
        lines.append(f"-A SUB -s {src} {rule}")
        positions.append(("SUB", index))
        keys.append(Key(proto, port, src=src))
    policy = rng.choice(["ACCEPT", "DROP"])
    header = "# Generated by ip6tables-save\n" if version == 6 else ""
    text = (f"{header}*filter\n:INPUT {policy} [0:0]\n:FORWARD ACCEPT [0:0]\n"
            ":OUTPUT ACCEPT [0:0]\n:SUB - [0:0]\n" + "\n".join(lines) + "\nCOMMIT\n")
    return Large(text, version, tuple(positions), tuple(keys))


def aimed(large: Large, rng: random.Random, extra: int) -> list[int]:
    """Which keys to aim at: every boundary position of each chain, its first and last
    rules, and `extra` more at random."""
    chosen = set()
    by_chain: dict[str, list[int]] = {}
    for k, (chain, _index) in enumerate(large.positions):
        by_chain.setdefault(chain, []).append(k)
    for ks in by_chain.values():
        chosen |= {ks[b] for b in BOUNDARIES if b < len(ks)} | {ks[0], ks[-1]}
        chosen |= {ks[b] for b in range(0, len(ks), 2048)}  # each scan window's first
    chosen |= set(rng.sample(range(len(large.keys)), min(extra, len(large.keys))))
    return sorted(chosen)


def _address(network: str, rng: random.Random, inside: bool) -> str:
    net = ipaddress.ip_network(network)
    if inside:
        return str(net.network_address + rng.randrange(net.num_addresses))
    return str(net.broadcast_address + 1)  # the first address past the prefix


def frames(large: Large, key: Key, rng: random.Random) -> list[Packet]:
    """The frame the key's rule matches, then near misses: the port beside it, the
    address past its prefix, the other protocol."""
    out = [_frame(large.version, key, rng)]
    if key.src or key.dst:
        out.append(_frame(large.version, Key(key.proto, key.port,
                                             src=key.src and _address(key.src, rng, False),
                                             dst=key.dst and _address(key.dst, rng, False)),
                          rng))
    if key.proto in ("tcp", "udp"):
        out.append(_frame(large.version, Key(key.proto, key.port + rng.choice([-1, 1]),
                                             key.src, key.dst, key.flags), rng))
        out.append(_frame(large.version, Key("udp" if key.proto == "tcp" else "tcp",
                                             key.port, key.src, key.dst), rng))
    return out


def unmatched(version: int, rng: random.Random) -> list[Packet]:
    """Frames no rule's key names: the policy decides them (or a broad rule)."""
    return [_frame(version, Key(proto, port), rng)
            for proto, port in (("udp", 10), ("tcp", 22), ("tcp", 80), ("udp", 53))]


def _frame(version: int, key: Key, rng: random.Random) -> Packet:
    if key.src:
        src = _address(key.src, rng, True) if "/" in key.src else key.src
    else:
        src = STRANGER4 if version == 4 else STRANGER6
    if key.dst:
        dst = _address(key.dst, rng, True) if "/" in key.dst else key.dst
    else:
        dst = "198.18.0.1" if version == 4 else "2001:db8:1::1"
    ip = IP(src=src, dst=dst) if version == 4 else IPv6(src=src, dst=dst)
    sport = rng.randrange(10000, 60000)
    if key.proto == "tcp":
        l4 = TCP(sport=sport, dport=key.port, flags=key.flags)
    elif key.proto == "udp":
        l4 = UDP(sport=sport, dport=key.port)
    elif version == 4:
        l4 = ICMP(type=key.port >> 8, code=key.port & 255, id=sport)
    else:
        l4 = ICMPv6EchoRequest(id=sport)
    payload = Raw(b"\0" * key.length) if key.length else Raw(b"")
    return Ether() / ip / l4 / payload
