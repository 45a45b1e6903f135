"""Hypothesis strategies for whole rulesets both iptables-legacy-restore and bpfilter
accept, built as IR and printed with the canonical printer, so both load the same text.

Rates are per hour: a token bucket that refilled during a test would make the two sides
disagree by timing alone (each has its own bucket), not by semantics.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hypothesis import strategies as st

from bpfilter import ir
from tests.packets import ESP_SPIS

# The replies an IPv4 ruleset can ask REJECT for.
IPV4_REJECTS = ir.RejectWith.of_family(ir.Family.IPV4)

NETS = ["192.0.2.0/24", "192.0.2.53/32", "198.51.100.0/24", "10.0.0.0/8", "0.0.0.0/1",
        "203.0.113.0/25"]
DST_NETS = ["198.18.0.0/16", "198.18.0.1/32", "198.19.0.0/16"]


@dataclass(frozen=True)
class Family:
    """What generated rules of one address family draw from."""

    family: ir.Family
    nets: tuple[str, ...]  # sources (destinations at OUTPUT)
    dst_nets: tuple[str, ...]  # within the testbed server's local range
    icmp: int  # the ICMP protocol's number
    icmp_types: tuple[tuple[int, int, int], ...]  # (type, lowest code, highest code)
    rejects: tuple[ir.RejectWith, ...]
    range_starts: tuple[str, ...]  # -m iprange
    lengths: tuple[int, ...]  # -m length


V4 = Family(ir.Family.IPV4, tuple(NETS), tuple(DST_NETS), 1,
            ((8, 0, 255), (0, 0, 255), (3, 3, 3), (3, 0, 255), (255, 0, 255), (11, 0, 255)),
            tuple(IPV4_REJECTS), ("192.0.2.10", "192.0.2.53", "198.51.100.1"),
            (20, 28, 40, 60, 100, 1000, 1500))
# The testbed's server owns 2001:db8:1::/48 (tests/packets.py: LOCAL6).
V6 = Family(ir.Family.IPV6, ("2001:db8:abcd::/48", "2001:db8:abcd::53/128", "2001:db8::/32",
                             "2001:db8:ff::/64", "::/1", "2001:db8:abcd:8000::/49"),
            ("2001:db8:1::/64", "2001:db8:1::1/128", "2001:db8:1:8000::/49"), 58,
            ((128, 0, 255), (129, 0, 255), (1, 4, 4), (1, 0, 255), (255, 0, 255),
             (135, 0, 255), (3, 0, 255)),
            tuple(ir.RejectWith.of_family(ir.Family.IPV6)),
            ("2001:db8:abcd::10", "2001:db8:abcd::53", "2001:db8:ff::1"),
            (40, 48, 60, 80, 100, 1000, 1500))
PORTS = [0, 1, 22, 53, 80, 443, 1024, 8080, 65535]
MACS = [b"\x02\x00\x00\x00\x00\x66", b"\x02\x00\x00\x00\x00\x01"]
IFACES = ["eth0", "eth+", "lan0", "wan+", "+"]
OUT_IFACES = ["eth1", "eth0", "eth+", "lan0", "+"]
TCP, UDP, ICMP, ESP = 6, 17, 1, 50


def _range(draw, values: list[int], top: int) -> ir.Range:
    a, b = sorted((draw(st.sampled_from(values)), draw(st.sampled_from(values))))
    return ir.Range(min(a, top), min(b, top))


@st.composite
def _ports(draw):
    return ir.PortSpec(_range(draw, PORTS, 65535), draw(st.booleans()))


@st.composite
def _conntrack(draw, negate: bool, fam: Family = V4) -> ir.ConntrackMatch:
    """States, and with -m conntrack sometimes a direction or a tuple address too."""
    module = draw(st.sampled_from(["conntrack", "conntrack", "state"]))
    states = draw(st.lists(st.sampled_from(ir.ConntrackMatch.STATES[:4]),
                           min_size=1 if module == "state" else 0, max_size=2, unique=True))
    direction, addresses = None, {}
    if module == "conntrack":
        direction = draw(st.none() | st.sampled_from(["ORIGINAL", "REPLY"]))
        if draw(st.booleans()) or not (states or direction):
            name = draw(st.sampled_from(ir.ConntrackMatch.ADDRESSES))
            addresses[name] = ir.ConntrackAddress(
                ipaddress.ip_network(draw(st.sampled_from(fam.nets + fam.dst_nets))),
                draw(st.booleans()))
        if draw(st.integers(0, 3)) == 0:
            addresses["protocol"] = ir.ProtocolMatch(
                draw(st.sampled_from([TCP, UDP, fam.icmp])), draw(st.booleans()))
        if draw(st.integers(0, 2)) == 0:
            addresses[draw(st.sampled_from(ir.ConntrackMatch.PORTS))] = draw(_ports())
    return ir.ConntrackMatch(tuple(s for s in ir.ConntrackMatch.STATES if s in states),
                             negate and bool(states), module, direction, **addresses)


# Interface limits of -m addrtype the kernel takes at a hook (and at the hooks the
# generators run the same rules at: PREROUTING with INPUT, POSTROUTING with OUTPUT).
_ADDRTYPE_LIMITS = {"INPUT": (None, "in"), "OUTPUT": (None, "out"),
                    "FORWARD": (None, "in", "out")}


@st.composite
def _routing_header(draw) -> ir.RoutingHeaderMatch:
    """-m rt with what frames6's routing headers carry: types 0, 2, 4, few segments."""
    given = {}
    if draw(st.booleans()):
        given.update(rt_type=draw(st.sampled_from([0, 0, 2, 4])), type_negate=draw(st.booleans()))
    if draw(st.booleans()):
        given.update(segsleft=_range(draw, [0, 1, 2, 3], 0xFFFFFFFF),
                     segsleft_negate=draw(st.booleans()))
    if draw(st.integers(0, 2)) == 0:
        given.update(length=draw(st.sampled_from([8, 24, 40])),
                     length_negate=draw(st.booleans()))
    if given.get("rt_type") == 0 and not given["type_negate"]:
        given.update(reserved_zero=draw(st.booleans()))
    return ir.RoutingHeaderMatch(**given)


@st.composite
def _addrtype(draw, hook: str, negate: bool) -> ir.AddrTypeMatch:
    """The source's or the destination's types (nft's fib reads one address; those nft
    can name)."""
    found = draw(st.lists(st.sampled_from(["UNICAST", "LOCAL", "BROADCAST", "MULTICAST",
                                           "UNSPEC", "BLACKHOLE"]),
                          min_size=1, max_size=3, unique=True))
    types = tuple(t for t in ir.AddrTypeMatch.TYPES if t in found)
    limit = draw(st.sampled_from(_ADDRTYPE_LIMITS[hook]))
    if draw(st.booleans()):
        return ir.AddrTypeMatch(src=types, src_negate=negate, limit=limit)
    return ir.AddrTypeMatch(dst=types, dst_negate=negate, limit=limit)


@st.composite
def _matches(draw, hook: str = "INPUT", fam: Family = V4) -> tuple[ir.Match, ...]:
    """For a chain `hook` reaches: `-o` means something at FORWARD and OUTPUT; OUTPUT has
    no input interface (iptables refuses `-i` and `--mac-source` there) and sends from
    the host's addresses."""
    found: list[ir.Match] = []
    outbound = hook == "OUTPUT"
    sources, destinations = (fam.dst_nets, fam.nets) if outbound else (fam.nets, fam.dst_nets)
    proto = draw(st.sampled_from([None, TCP, TCP, UDP, UDP, fam.icmp, 47, ESP]))
    proto_negated = proto is not None and draw(st.integers(0, 5)) == 0
    if draw(st.booleans()):
        found.append(ir.AddressMatch("src", ipaddress.ip_network(
            draw(st.sampled_from(sources))), draw(st.booleans())))
    if draw(st.integers(0, 3)) == 0:
        found.append(ir.AddressMatch("dst", ipaddress.ip_network(
            draw(st.sampled_from(destinations))), draw(st.booleans())))
    if not outbound and draw(st.integers(0, 3)) == 0:
        found.append(ir.InterfaceMatch("in", draw(st.sampled_from(IFACES)),
                                       draw(st.booleans())))
    if hook != "INPUT" and draw(st.integers(0, 2)) == 0:
        found.append(ir.InterfaceMatch("out", draw(st.sampled_from(OUT_IFACES)),
                                       draw(st.booleans())))
    if proto is not None:
        found.append(ir.ProtocolMatch(proto, proto_negated))
    if proto in (TCP, UDP) and not proto_negated:
        kind = draw(st.sampled_from(["ports", "multiport", "none"]))
        if kind == "ports":
            sport = draw(st.none() | _ports())
            dport = draw(st.none() | _ports())
            if proto == TCP:
                flags = None
                if draw(st.booleans()):
                    mask = draw(st.integers(1, 0x3F))
                    flags = ir.TcpFlagsSpec(mask, draw(st.integers(0, 0x3F)) & mask,
                                            draw(st.booleans()))
                found.append(ir.TcpMatch(sport, dport, flags))
            else:
                found.append(ir.UdpMatch(sport, dport))
        elif kind == "multiport":
            ports = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=4, unique=True))
            found.append(ir.MultiportMatch(draw(st.sampled_from(["src", "dst", "any"])),
                                           tuple(ir.Range(p, p) for p in ports),
                                           draw(st.booleans())))
    if proto == ESP and not proto_negated and draw(st.booleans()):
        low, high = (draw(st.sampled_from(ESP_SPIS)) for _ in range(2))
        found.append(ir.EspMatch(low, high, draw(st.booleans())))
    if proto == fam.icmp and not proto_negated and draw(st.booleans()):
        icmp_type, low, high = draw(st.sampled_from(fam.icmp_types))
        found.append(ir.IcmpMatch(icmp_type, ir.Range(low, high), draw(st.booleans()),
                                  version=4 if fam is V4 else 6))
    extras = draw(st.lists(st.sampled_from(["iprange", "length", "ttl", "comment", "limit",
                                            "conntrack", "tos", "dscp", "ecn"]
                                           + ([] if outbound else ["mac"])
                                           + (["addrtype"] if fam is V4 else ["rt"])),
                           max_size=2, unique=True))
    for extra in extras:
        negate = draw(st.booleans())
        if extra == "iprange":
            low = ipaddress.ip_address(draw(st.sampled_from(fam.range_starts)))
            found.append(ir.IpRangeMatch(src=ir.AddressRangeSpec(
                low, low + draw(st.sampled_from([0, 5, 100])), negate)))
        elif extra == "length":
            found.append(ir.LengthMatch(_range(draw, list(fam.lengths), 65535), negate))
        elif extra == "ttl":
            op = draw(st.sampled_from(["eq", "lt", "gt"]))
            found.append(ir.TtlMatch(op, draw(st.sampled_from([1, 2, 64, 128])),
                                     negate and op == "eq"))
        elif extra == "mac":
            found.append(ir.MacSourceMatch(draw(st.sampled_from(MACS)), negate))
        elif extra == "comment":
            found.append(ir.CommentMatch("generated rule"))
        elif extra == "conntrack":
            found.append(draw(_conntrack(negate, fam)))
        elif extra == "addrtype":
            found.append(draw(_addrtype(hook, negate)))
        elif extra == "rt":
            found.append(draw(_routing_header()))
        elif extra == "tos":
            value, mask = draw(st.sampled_from([(0x10, 0x3f), (0xb8, 0xff), (0x00, 0xfc),
                                                (0x03, 0x03)]))
            found.append(ir.TosMatch(value, mask, negate))
        elif extra == "dscp":
            found.append(ir.DscpMatch(draw(st.sampled_from([0, 0x04, 0x2e])), negate))
        elif extra == "ecn":  # TCP's flags only in a rule of -p tcp, as the kernel wants
            flag = st.sampled_from([None, True, False]) if proto == TCP and \
                not proto_negated else st.none()
            ece, cwr = draw(flag), draw(flag)
            ect = draw(st.sampled_from([0, 2, 3] + ([None] if (ece, cwr) != (None, None)
                                                    else [])))
            found.append(ir.EcnMatch(ece, cwr, ect, negate and ect is not None))
        elif hook != "FORWARD":
            # Not at FORWARD: the router runs the ruleset on both interfaces, each with
            # buckets of its own, where the kernel has one (README, known differences).
            found.append(ir.LimitMatch(draw(st.integers(1, 3)), "hour",
                                       burst=draw(st.integers(1, 3))))
    return tuple(found)


@st.composite
def _target(draw, matches, callees: list[str], builtin: bool, fam: Family = V4):
    proto = next((m for m in matches if isinstance(m, ir.ProtocolMatch)), None)
    choices = ["ACCEPT", "DROP", "REJECT", "LOG", "none", "RETURN"]
    if callees:
        choices += ["jump", "goto"]
    kind = draw(st.sampled_from(choices))
    if kind in ("ACCEPT", "DROP"):
        return ir.VerdictTarget(ir.Verdict(kind))
    if kind == "REJECT":
        options = list(fam.rejects)
        if proto is None or proto.protocol != TCP or proto.negate:
            options.remove(ir.RejectWith.TCP_RESET)
        return ir.RejectTarget(draw(st.sampled_from(options)))
    if kind == "LOG":
        return ir.LogTarget(prefix="conformance ")
    if kind == "RETURN":
        return ir.ReturnTarget()
    if kind in ("jump", "goto"):
        return ir.JumpTarget(draw(st.sampled_from(callees)), goto=kind == "goto")
    return None


@st.composite
def rulesets(draw, most: int = 10, hook: str = "INPUT", fam: Family = V4) -> ir.Ruleset:
    """INPUT (or FORWARD, or OUTPUT) with 1 to `most` rules, and up to two user chains of
    up to `most` / 2; the other built-in chains empty. `fam`: an iptables or an ip6tables
    ruleset."""
    origin = ir.Origin("<generated>", 0)
    names = [f"U{i}" for i in range(draw(st.integers(0, 2)))]
    chains = []
    for position, name in enumerate(names):  # U0 may call U1, never the reverse: no loops
        rules = []
        for _ in range(draw(st.integers(1, max(1, most // 2)))):
            matches = draw(_matches(hook, fam))
            rules.append(ir.Rule(matches, draw(_target(matches, names[position + 1:], False,
                                                       fam)), origin))
        chains.append(ir.Chain(name, tuple(rules)))
    rules = []
    for _ in range(draw(st.integers(1, most))):
        matches = draw(_matches(hook, fam))
        rules.append(ir.Rule(matches, draw(_target(matches, names, True, fam)), origin))
    filled = ir.Chain(hook, tuple(rules), draw(st.sampled_from(list(ir.Verdict))))
    builtins = [filled if name == hook else ir.Chain(name, (), ir.Verdict.ACCEPT)
                for name in ("INPUT", "FORWARD", "OUTPUT")]
    return ir.Ruleset(fam.family, (ir.Table("filter", tuple(builtins + chains),
                                            family=fam.family),))


# Marks are built bit by bit (0x1, 0x2, 0x10) and read back whole or in part, so that the
# order and the masks of MARK, CONNMARK and `-m mark` all show in the verdicts.
MARKS = [0x0, 0x1, 0x2, 0x3, 0x10, 0x11, 0x13]
MARK_MASKS = [0xFFFFFFFF, 0x3, 0x13, 0x10]
# The built-in chains a packet walks, table by table, in the kernel's order: one the host
# receives, one it sends.
PATHS = {
    "INPUT": (("raw", "PREROUTING"), ("mangle", "PREROUTING"), ("mangle", "INPUT"),
              ("filter", "INPUT")),
    "OUTPUT": (("raw", "OUTPUT"), ("mangle", "OUTPUT"), ("filter", "OUTPUT"),
               ("mangle", "POSTROUTING")),
}


@st.composite
def _mark_match(draw) -> ir.MarkMatch:
    mask = draw(st.sampled_from(MARK_MASKS))
    return ir.MarkMatch(draw(st.sampled_from(MARKS)) & mask, mask, draw(st.booleans()),
                        connection=draw(st.integers(0, 2)) == 0)


@st.composite
def _layer_target(draw, table: str, matches):
    """What a rule of `table` does: mostly marks and connection marks (read by later
    rules), NOTRACK in raw, the usual targets in filter (REJECT only there, as the kernel
    requires)."""
    if table == "filter" and draw(st.booleans()):
        return draw(_target(matches, [], True))
    kind = draw(st.sampled_from(["MARK"] * 3 + ["CONNMARK"] * 2 + ["ACCEPT", "DROP", "none"]
                                + (["NOTRACK"] * 2 if table == "raw" else [])))
    if kind == "MARK":
        value, mask = draw(st.sampled_from([(0x1, 0x1), (0x2, 0x2), (0x10, 0x10),
                                            (0x0, 0xFFFFFFFE), (0x1, 0xFFFFFFFF),
                                            (0x3, 0x0)]))
        return ir.MarkTarget(value, mask)
    if kind == "CONNMARK":
        mode = draw(st.sampled_from(list(ir.ConnmarkMode)))
        if mode is ir.ConnmarkMode.SET:
            return ir.ConnmarkTarget(mode, draw(st.sampled_from(MARKS)),
                                     draw(st.sampled_from(MARK_MASKS)))
        mask = draw(st.sampled_from(MARK_MASKS))
        return ir.ConnmarkTarget(mode, ctmask=mask, nfmask=mask)
    if kind == "NOTRACK":
        return ir.NotrackTarget(draw(st.sampled_from(["NOTRACK", "CT"])))
    if kind == "none":
        return None
    if kind == "DROP" and not any(isinstance(m, ir.ProtocolMatch) for m in matches):
        return ir.MarkTarget(0x2, 0x2)  # a DROP of most packets would leave little to see
    return ir.VerdictTarget(ir.Verdict(kind))


# A filter chain that tells a packet's final mark by how it is refused: one ICMP error per
# mark value (and delivered for any other).
_READOUT = tuple(ir.Rule((ir.MarkMatch(mark),), ir.RejectTarget(with_), ir.Origin("<readout>", 0))
                 for mark, with_ in zip(MARKS, [w for w in IPV4_REJECTS
                                                if w is not ir.RejectWith.TCP_RESET]))


@st.composite
def layered(draw, hook: str = "INPUT", most: int = 4, readout: bool = False) -> ir.Ruleset:
    """Rules in every table a packet meets on its way to INPUT (or out of OUTPUT): marks
    set in one table and read in a later one, connection marks kept across packets,
    NOTRACK read back as UNTRACKED. With `readout` the filter chain only reports each
    packet's mark (see _READOUT), so that every MARK and CONNMARK shows in the outcome."""
    origin = ir.Origin("<generated>", 0)
    chains: dict[str, list[ir.Chain]] = {"raw": [], "mangle": [], "filter": []}
    for table, name in PATHS[hook]:
        if readout and table == "filter":
            chains[table].append(ir.Chain(name, _READOUT, ir.Verdict.ACCEPT))
            continue
        rules = []
        for _ in range(draw(st.integers(0 if table != "filter" else 1, most))):
            # Often no match but the mark's: a mark set for most packets, read later.
            matches = draw(_matches(hook)) if draw(st.integers(0, 2 if readout else 1)) == 0 \
                else ()
            if draw(st.integers(0, 2)):
                matches += (draw(_mark_match()),)
            rules.append(ir.Rule(matches, draw(_layer_target(table, matches)), origin))
        policy = (draw(st.sampled_from(list(ir.Verdict))) if table == "filter"
                  else ir.Verdict.ACCEPT if readout
                  else draw(st.sampled_from([ir.Verdict.ACCEPT] * 9 + [ir.Verdict.DROP])))
        chains[table].append(ir.Chain(name, tuple(rules), policy))
    tables = []
    for table, _name in PATHS[hook]:
        if table not in (t.name for t in tables):
            tables.append(ir.Table(table, tuple(chains[table])))
    return ir.Ruleset(ir.Family.IPV4, tuple(tables))


def kinds(ruleset: ir.Ruleset) -> set[str]:
    """The match and target kinds a ruleset uses, for the agreement table."""
    names = {ir.AddressMatch: "-s/-d", ir.InterfaceMatch: "-i", ir.ProtocolMatch: "-p",
             ir.FragmentMatch: "-f",
             ir.TcpMatch: "tcp", ir.UdpMatch: "udp", ir.IcmpMatch: "icmp",
             ir.MultiportMatch: "multiport", ir.IpRangeMatch: "iprange",
             ir.LengthMatch: "length", ir.TtlMatch: "ttl", ir.MacSourceMatch: "mac",
             ir.CommentMatch: "comment", ir.LimitMatch: "limit",
             ir.ConntrackMatch: "conntrack", ir.MarkMatch: "mark", ir.FamilyMatch: "family",
             ir.EtherTypeMatch: "ether type", ir.AddrTypeMatch: "addrtype",
             ir.RoutingHeaderMatch: "rt", ir.RecentMatch: "recent", ir.TosMatch: "tos",
             ir.DscpMatch: "dscp", ir.EcnMatch: "ecn", ir.EspMatch: "esp",
             ir.VerdictTarget: "ACCEPT/DROP", ir.RejectTarget: "REJECT",
             ir.LogTarget: "LOG", ir.ReturnTarget: "RETURN", ir.MarkTarget: "MARK",
             ir.ConnmarkTarget: "CONNMARK", ir.NotrackTarget: "NOTRACK"}
    found = set()
    for table, _c, rule in ruleset.rules():
        found |= {"connmark" if getattr(m, "connection", False) else names[type(m)]
                  for m in rule.matches}
        if table.name != "filter":
            found.add(f"{table.name} table")
        if isinstance(rule.target, ir.JumpTarget):
            found.add("-g" if rule.target.goto else "-j chain")
        elif rule.target is not None:
            found.add(names[type(rule.target)])
    return found


# Where a large ACL's sources (and destinations, in the server's range) start, and the
# prefix lengths of its hosts and networks, per family.
_ACL_BASES = {ir.Family.IPV4: ("192.0.2.0", "198.18.0.0", [32, 32, 32, 30, 28, 24],
                               ir.RejectWith.HOST_PROHIBITED),
              ir.Family.IPV6: ("2001:db8:abcd::", "2001:db8:1::", [128, 128, 128, 126, 124,
                                                                   120],
                               ir.RejectWith.ICMP6_ADM_PROHIBITED)}


@st.composite
def large_acls(draw, fam: Family = V4) -> ir.Ruleset:
    """Long -s lists as real ACLs are: mostly hosts, some networks, some overlapping, in
    blocks with different targets and extra matches, so folding, and cutting runs where
    prefixes overlap, are exercised against the kernel."""
    origin = ir.Origin("<generated>", 0)
    src_base, dst_base, lengths, reject = _ACL_BASES[fam.family]
    rules = []
    for _block in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from([ir.VerdictTarget(ir.Verdict.DROP),
                                       ir.VerdictTarget(ir.Verdict.ACCEPT),
                                       ir.RejectTarget(reject)]))
        rest = draw(st.sampled_from([(), (ir.ProtocolMatch(TCP),),
                                     (ir.ProtocolMatch(UDP), ir.UdpMatch(
                                         dport=ir.PortSpec(ir.Range(53, 53))))]))
        direction = draw(st.sampled_from(["src", "src", "dst"]))
        base = ipaddress.ip_address(src_base if direction == "src" else dst_base)
        for _ in range(draw(st.integers(8, 300))):
            length = draw(st.sampled_from(lengths))
            offset = draw(st.integers(0, 255)) if direction == "src" else \
                draw(st.integers(0, 1023))
            net = ipaddress.ip_network((int(base) + offset, length), strict=False)
            rules.append(ir.Rule((ir.AddressMatch(direction, net),) + rest, target, origin))
    policy = draw(st.sampled_from(list(ir.Verdict)))
    chains = (ir.Chain("INPUT", tuple(rules), policy), ir.Chain("FORWARD", (), ir.Verdict.ACCEPT),
              ir.Chain("OUTPUT", (), ir.Verdict.ACCEPT))
    return ir.Ruleset(fam.family, (ir.Table("filter", chains, family=fam.family),))
