"""IR -> nftables text (`nft -f` input, block form, family ip), for `translate --to nft`.

Spelled so that nft 1.0 reads it back and parser.py reads it to the same rules. What nft
cannot say is an error naming the rule, never a silent change.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.frontend.nft import names

# x_tables' chains in nft: the type each table's base chains are.
_XTABLES_TYPES = {"nat": "nat"}
_MANGLE_OUTPUT = ("mangle", "OUTPUT")  # the kernel reroutes after it: a route chain


def _untranslatable(rule: ir.Rule, why: str) -> InputError:
    origin = rule.origin
    return InputError(origin.file, origin.line, "rule", f"cannot be said in nft: {why}",
                      column=origin.column)


def _ne(negate: bool) -> str:
    return "!= " if negate else ""


def _string(text: str) -> str:
    return json.dumps(text)


def _range(r: ir.Range) -> str:
    return str(r.low) if r.single else f"{r.low}-{r.high}"


def _network(net: ir.IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _protocol(number: int) -> str:
    return names.PROTOCOL_NAMES.get(number, str(number))


def _flags(bits: int) -> str:
    return "|".join(n for n, b in names.TCP_FLAGS.items() if bits & b) if bits else "0x0"


def _mark_value(value: int) -> str:
    return f"0x{value:08x}"


def _ports(proto: str, m) -> list[str]:
    parts = []
    for name in ("sport", "dport"):
        spec = getattr(m, name)
        if spec is not None:
            parts.append(f"{proto} {name} {_ne(spec.negate)}{_range(spec.ports)}")
    return parts


def _tcp(m: ir.TcpMatch, rule: ir.Rule) -> list[str]:
    parts = _ports("tcp", m)
    if m.flags is not None:
        op = "!=" if m.flags.negate else "=="
        parts.append(f"tcp flags & ({_flags(m.flags.mask)}) {op} {_flags(m.flags.comp)}")
    return parts


def _icmp(m: ir.IcmpMatch, rule: ir.Rule) -> list[str]:
    v6 = m.version == 6
    if m.icmp_type == ir.IcmpMatch.ANY and not v6:
        return [f"ip protocol {_ne(m.negate)}icmp"]
    key = "icmpv6" if v6 else "icmp"
    kind = (names.ICMP6_TYPE_NAMES if v6 else names.ICMP_TYPE_NAMES).get(m.icmp_type,
                                                                      str(m.icmp_type))
    if m.codes == ir.Range(0, 255):
        return [f"{key} type {_ne(m.negate)}{kind}"]
    if m.negate:
        raise _untranslatable(rule, "nft has no negation of an ICMP type and code together")
    return [f"{key} type {kind}", f"{key} code {_range(m.codes)}"]


def _l4_name(rule: ir.Rule) -> str:
    """tcp or udp, else th: the ports' place in any transport header."""
    protocol = next((m.protocol for m in rule.matches
                     if isinstance(m, ir.ProtocolMatch) and not m.negate), None)
    return _protocol(protocol) if protocol in (6, 17) else "th"


def _multiport(m: ir.MultiportMatch, rule: ir.Rule) -> list[str]:
    proto = _l4_name(rule)
    ports = "{ " + ", ".join(_range(r) for r in m.ports) + " }"
    fields = {"src": ("sport",), "dst": ("dport",), "any": ("sport", "dport")}[m.direction]
    if m.negate or len(fields) == 1:
        # Neither port in the list: both `!=`.
        return [f"{proto} {f} {_ne(m.negate)}{ports}" for f in fields]
    # Either port in the list: pairs (sport in it, any dport), then (sport outside it,
    # dport in it), which never overlap.
    inside = [(r.low, r.high) for r in sorted(m.ports, key=lambda r: r.low)]
    outside, low = [], 0
    for start, end in inside:
        if start > low:
            outside.append(ir.Range(low, start - 1))
        low = max(low, end + 1)
    if low <= 65535:
        outside.append(ir.Range(low, 65535))
    pairs = [f"{_range(r)} . 0-65535" for r in m.ports] + \
        [f"{_range(o)} . {_range(r)}" for o in outside for r in m.ports]
    return [f"{proto} sport . {proto} dport {{ " + ", ".join(pairs) + " }"]


def _interface(m: ir.InterfaceMatch, rule: ir.Rule) -> list[str]:
    if m.name == "+":  # every interface, and none (nft refuses an all-wildcard name)
        if m.negate:
            raise _untranslatable(rule, "'! -i +' never matches; nft has no spelling for it")
        return []
    key = "iifname" if m.direction == "in" else "oifname"
    return [f"{key} {_ne(m.negate)}" + _string(m.name[:-1] + "*" if m.is_prefix else m.name)]


def _iprange(m: ir.IpRangeMatch, rule: ir.Rule) -> list[str]:
    return [f"ip {field} {_ne(spec.negate)}{spec.low}-{spec.high}"
            for field, spec in (("saddr", m.src), ("daddr", m.dst)) if spec is not None]


def _ttl(m: ir.TtlMatch, rule: ir.Rule) -> list[str]:
    op = {("eq", False): "", ("eq", True): "!= ", ("lt", False): "< ", ("lt", True): ">= ",
          ("gt", False): "> ", ("gt", True): "<= "}[(m.op, m.negate)]
    return [f"ip ttl {op}{m.value}"]


def _conntrack(m: ir.ConntrackMatch, rule: ir.Rule) -> list[str]:
    parts = []
    nat = [s for s in m.states if s in ir.ConntrackMatch.NAT_STATES]
    if nat and (len(nat) < len(m.states) or m.negate):
        raise _untranslatable(rule, "nft tests NAT as `ct status snat|dnat`, apart from "
                              "ct state: --ctstate SNAT and DNAT translate alone, unnegated")
    if nat:
        parts.append("ct status " + ",".join(s.lower() for s in nat))
    elif m.states:
        # `!= a,b` would compare the whole mask (always true): a set says "none of".
        states = [s.lower() for s in m.states]
        listed = states[0] if len(states) == 1 else (
            "{ " + ", ".join(states) + " }" if m.negate else ",".join(states))
        parts.append(f"ct state {_ne(m.negate)}{listed}")
    if m.direction is not None:
        parts.append(f"ct direction {m.direction.lower()}")
    if m.protocol is not None:
        parts.append(f"ct original protocol {_ne(m.protocol.negate)}"
                     f"{_protocol(m.protocol.protocol)}")
    for name in ir.ConntrackMatch.ADDRESSES:
        spec = getattr(m, name)
        if spec is not None:
            way = "original" if name.startswith("orig") else "reply"
            field = {"src": "saddr", "dst": "daddr"}[name[4:]]
            family = "ip6" if spec.network.version == 6 else "ip"
            parts.append(f"ct {way} {family} {field} {_ne(spec.negate)}"
                         f"{_network(spec.network)}")
    for name in ir.ConntrackMatch.PORTS:
        spec = getattr(m, name)
        if spec is not None:
            if not any(isinstance(o, ir.ConntrackMatch) and o.protocol is not None
                       and not o.protocol.negate for o in rule.matches):
                raise _untranslatable(rule, "nft reads a connection's ports only after its "
                                      "protocol (--ctproto, not negated)")
            way = "original" if name.startswith("orig") else "reply"
            field = "proto-src" if "src" in name else "proto-dst"
            parts.append(f"ct {way} {field} {_ne(spec.negate)}{_range(spec.ports)}")
    return parts


def _statistic(m: ir.StatisticMatch, rule: ir.Rule) -> list[str]:
    """As iptables-translate says it: 31 random bits below the probability (of 2^31), and
    nth as numgen's shared counter, which starts where xt_statistic's does."""
    if m.mode == "random":
        return [f"meta random & 2147483647 {'>=' if m.negate else '<'} {m.probability}"]
    return [f"numgen inc mod {m.every} {_ne(m.negate)}{m.packet}"]


def _numgen(m: ir.NumgenMatch, rule: ir.Rule) -> list[str]:
    if m.draw is not None:
        raise _untranslatable(rule, "a numgen verdict map draws once for all its elements, "
                              "which one rule per element cannot say")
    values = [f"{r.low}" if r.low == r.high else f"{r.low}-{r.high}" for r in m.values]
    if not values:
        raise _untranslatable(rule, "a numgen comparison that never holds")
    listed = values[0] if len(values) == 1 else "{ " + ", ".join(values) + " }"
    offset = f" offset {m.offset}" if m.offset else ""
    return [f"numgen {m.mode} mod {m.modulus}{offset} {_ne(m.negate)}{listed}"]


def _addrtype(m: ir.AddrTypeMatch, rule: ir.Rule) -> list[str]:
    parts = []
    for types, negate, field in ((m.src, m.src_negate, "saddr"),
                                 (m.dst, m.dst_negate, "daddr")):
        if not types:
            continue
        unknown = [t for t in types if t.lower() not in names.FIB_TYPES]
        if unknown:
            raise _untranslatable(rule, f"nft's fib has no address type {unknown[0]}")
        listed = [t.lower() for t in types]
        value = listed[0] if len(listed) == 1 else "{ " + ", ".join(listed) + " }"
        device = f" . {'iif' if m.limit == 'in' else 'oif'}" if m.limit else ""
        parts.append(f"fib {field}{device} type {_ne(negate)}{value}")
    return parts


def _mark(m: ir.MarkMatch, rule: ir.Rule) -> list[str]:
    key = "ct mark" if m.connection else "meta mark"
    if m.mask == 0xFFFFFFFF:
        return [f"{key} {_ne(m.negate)}{_mark_value(m.value)}"]
    op = "!=" if m.negate else "=="
    return [f"{key} & {_mark_value(m.mask)} {op} {_mark_value(m.value)}"]


_MATCHES: dict[type, Callable[..., list[str]]] = {
    ir.AddressMatch: lambda m, r: [f"ip {'saddr' if m.direction == 'src' else 'daddr'} "
                                   f"{_ne(m.negate)}{_network(m.network)}"],
    ir.InterfaceMatch: _interface,
    ir.ProtocolMatch: lambda m, r: [f"ip protocol {_ne(m.negate)}{_protocol(m.protocol)}"],
    ir.FragmentMatch: lambda m, r: [f"ip frag-off & 0x1fff {'==' if m.negate else '!='} 0"],
    ir.TcpMatch: _tcp,
    ir.UdpMatch: lambda m, r: _ports("udp", m),
    ir.IcmpMatch: _icmp,
    ir.MultiportMatch: _multiport,
    ir.IpRangeMatch: _iprange,
    ir.CommentMatch: lambda m, r: [],  # printed last, where nft wants it
    ir.LengthMatch: lambda m, r: [f"meta length {_ne(m.negate)}{_range(m.length)}"],
    ir.TtlMatch: _ttl,
    ir.MacSourceMatch: lambda m, r: ["ether saddr " + _ne(m.negate) +
                                     ":".join(f"{b:02x}" for b in m.address)],
    ir.LimitMatch: lambda m, r: [f"limit rate {'over ' if m.over else ''}"
                                 f"{m.count}/{names.LIMIT_UNIT_NAMES[m.unit]} "
                                 f"burst {m.burst} packets"],
    ir.StatisticMatch: _statistic,
    ir.NumgenMatch: _numgen,
    ir.ConntrackMatch: _conntrack,
    ir.AddrTypeMatch: _addrtype,
    ir.MarkMatch: _mark,
    ir.FamilyMatch: lambda m, r: [f"meta nfproto {_ne(m.negate)}"
                                  f"{names.NFPROTO_NAMES[m.family]}"],
    # Both IP EtherTypes: what a netdev rule reading IP headers implies (nft adds it).
    ir.EtherTypeMatch: lambda m, r: [] if m.ethertypes == _IP_ETHERTYPES else [
        f"ether type {_ne(m.negate)}{names.ETHERTYPE_NAMES.get(t, f'0x{t:04x}')}"
        for t in m.ethertypes],
}
_IP_ETHERTYPES = (ir.ETHERTYPE_IP, ir.ETHERTYPE_IPV6)


def _set_mark(key: str, value: int, mask: int) -> str:
    """(key & ~mask) ^ value, the shortest way nft says it."""
    if mask == 0xFFFFFFFF:
        return f"{key} set {_mark_value(value)}"
    keep = ~mask & 0xFFFFFFFF
    return f"{key} set {key} & {_mark_value(keep)} ^ {_mark_value(value)}"


def _target(target: Optional[ir.Target], rule: ir.Rule) -> list[str]:
    if target is None:
        return []
    if isinstance(target, ir.VerdictTarget):
        return [target.verdict.value.lower()]
    if isinstance(target, ir.ReturnTarget):
        return ["return"]
    if isinstance(target, ir.JumpTarget):
        return [f"{'goto' if target.goto else 'jump'} {target.chain}"]
    if isinstance(target, ir.RejectTarget):
        if target.with_ is ir.RejectWith.TCP_RESET:
            return ["reject with tcp reset"]
        if target.with_ in names.REJECTX_NAMES:
            return [f"reject with icmpx type {names.REJECTX_NAMES[target.with_]}"]
        if target.with_.family is ir.Family.IPV6:
            return [f"reject with icmpv6 type {names.REJECT6_NAMES[target.with_]}"]
        return [f"reject with icmp type {names.REJECT_NAMES[target.with_]}"]
    if isinstance(target, ir.LogTarget):
        if target.nflog:
            raise _untranslatable(rule, "bpfilter reads no nft `log group` yet (NFLOG)")
        words = ["log"]
        if target.prefix:
            words.append(f"prefix {_string(target.prefix)}")
        if target.level != 4:
            words.append(f"level {names.LOG_LEVEL_NAMES[target.level]}")
        return [" ".join(words)]
    if isinstance(target, ir.MarkTarget):
        return [_set_mark("meta mark", target.value, target.mask)]
    if isinstance(target, ir.ConnmarkTarget):
        if target.mode is ir.ConnmarkMode.SET:
            return [_set_mark("ct mark", target.value, target.ctmask)]
        if (target.ctmask, target.nfmask) != (0xFFFFFFFF, 0xFFFFFFFF):
            raise _untranslatable(rule, "nft cannot combine a packet's and a connection's "
                                 "mark under masks")
        return ["ct mark set meta mark" if target.mode is ir.ConnmarkMode.SAVE
                else "meta mark set ct mark"]
    if isinstance(target, ir.NotrackTarget):
        return ["notrack"]
    if isinstance(target, ir.DnatTarget) and target.port_base is not None:
        raise _untranslatable(rule, "nft's dnat has no port shift (DNAT's PORT-PORT/BASE)")
    if isinstance(target, ir.NAT_TARGETS):
        return [_nat(target)]
    if isinstance(target, ir.ChecksumTarget):
        raise _untranslatable(rule, "nft has no checksum statement (CHECKSUM --checksum-fill "
                              "is a no-op in bpfilter: leave the rule out)")
    raise _untranslatable(rule, f"no nft statement for {type(target).__name__}")


def _nat(target) -> str:
    if isinstance(target, ir.DnatTarget):
        words = "redirect" if target.redirect else "dnat to"
        ports = target.ports
        flags = (("random", target.random), ("persistent", target.persistent))
    else:
        words = "masquerade" if target.masquerade else "snat to"
        ports = target.ports
        flags = (("random", target.random), ("fully-random", target.random_fully),
                 ("persistent", target.persistent))
    to = (str(target.address) if target.address else "") + (
        f"-{target.last_address}" if target.last_address else "") + (
        "" if not ports else f":{ports[0]}" if ports[0] == ports[1]
        else f":{ports[0]}-{ports[1]}")
    if words in ("masquerade", "redirect") and to:
        words += " to"
    words += f" {to}" if to else ""
    flags = ",".join(name for name, on in flags if on)
    return words + (f" {flags}" if flags else "")


# What an ip6 table says instead (the transport protocol past IPv6's extension headers is
# meta l4proto; the TTL is the hop limit).
_IP6_WORDS = (("ip protocol", "meta l4proto"), ("ip saddr", "ip6 saddr"),
              ("ip daddr", "ip6 daddr"), ("ip ttl", "ip6 hoplimit"))


def rule_text(rule: ir.Rule, counters: Optional[ir.Counters] = None,
              family: Optional[ir.Family] = ir.Family.IPV4, netdev: bool = False) -> str:
    """One rule in nft's words, for a table of `family` (None: inet or netdev, where the
    rule's family test tells which family's words its expressions take)."""
    inet = family is None
    if inet:
        test = rule.find(ir.FamilyMatch)
        family = test.family if test is not None and not test.negate else ir.Family.IPV4
    parts: list[str] = []
    for match in rule.matches:
        if isinstance(match, ir.RoutingHeaderMatch):
            raise _untranslatable(rule, "bpfilter reads no nft `rt` expressions yet (-m rt)")
        if isinstance(match, ir.RecentMatch):
            raise _untranslatable(rule, "bpfilter reads no nft dynamic sets yet (-m recent)")
        if isinstance(match, (ir.TosMatch, ir.DscpMatch, ir.EcnMatch, ir.EspMatch)):
            raise _untranslatable(rule, "bpfilter reads no nft `ip dscp`, `ip ecn` or `esp` "
                                  "expressions yet")
        words = _MATCHES[type(match)](match, rule)
        if inet:  # `ip protocol` would make the rule IPv4's
            words = [w.replace("ip protocol", "meta l4proto") for w in words]
        if netdev:  # there nfproto is netdev's: the EtherType tells the family
            words = [w.replace("meta nfproto ipv4", "meta protocol ip").replace(
                "meta nfproto ipv6", "meta protocol ip6") for w in words]
        if family is ir.Family.IPV6:
            if isinstance(match, ir.FragmentMatch):
                raise _untranslatable(rule, "IPv6 fragments are an extension header")
            for old, new in _IP6_WORDS:
                words = [w.replace(old, new) for w in words]
        parts += words
    parts.append("counter" if counters is None else
                 f"counter packets {counters.packets} bytes {counters.bytes}")
    parts += _target(rule.target, rule)
    comment = rule.find(ir.CommentMatch)
    if comment is not None:
        parts.append(f"comment {_string(comment.text)}")
    return " ".join(parts)


def _chain_type(table: ir.Table, chain: ir.Chain) -> str:
    if table.xtables and (table.name, chain.name) == _MANGLE_OUTPUT:
        return "route"
    if chain.nat:
        return "nat"
    return _XTABLES_TYPES.get(table.name, "filter") if table.xtables else "filter"


def save_nft(ruleset: ir.Ruleset,
             live: Optional[Callable[[str, str, int], ir.Counters]] = None) -> str:
    """The ruleset in nft; `live(table, chain, index)` adds counters to the rules."""
    lines = []
    for table in ruleset.tables:
        family = "netdev" if table.netdev else names.FAMILY_NAMES[table.family]
        lines.append(f"table {family} {table.name} {{")
        for chain in table.chains:
            lines.append(f"\tchain {chain.name} {{")
            if chain.builtin and chain.hook is not None:
                device = "" if chain.device is None else f" device {_string(chain.device)}"
                lines.append(f"\t\ttype {_chain_type(table, chain)} hook "
                             f"{names.HOOK_NAMES[chain.hook]}{device} priority "
                             f"{chain.priority}; policy {chain.policy.value.lower()};")
            lines += ["\t\t" + rule_text(rule, live and live(table.key, chain.name, i),
                                         table.family, table.netdev)
                      for i, rule in enumerate(chain.rules)]
            lines.append("\t}")
        lines.append("}")
    return "\n".join(lines) + "\n"
