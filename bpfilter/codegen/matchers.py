"""One C generator per IR match type.

Each generator returns C statements that fall through when the match holds and
`goto <skip>` when it does not. A match the kernel cannot evaluate (a truncated header)
drops the packet there and then, as the kernel's hotdrop does, without counting the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from bpfilter import ir

HOTDROP = "return BF_DROP; /* the kernel's hotdrop: header too short to match */"


@dataclass
class MatchContext:
    """What generators share within one program: the skip label and allocated slots."""

    skip: str = ""
    if_patterns: list[ir.InterfaceMatch] = field(default_factory=list)
    # a slot of bf_limits per token bucket, per nth count and per numgen inc counter
    limits: list[Union[ir.LimitMatch, ir.StatisticMatch, ir.NumgenMatch]] = field(
        default_factory=list)
    numgens: list[Optional[str]] = field(default_factory=list)  # bf_numgen's slots
    recent_lists: list[str] = field(default_factory=list)  # -m recent's names, numbered
    recent_hits: int = 0  # the largest --hitcount
    conntrack: bool = False  # a rule reads the connection state
    nat: bool = False  # a rule translates addresses (NAT bindings)
    services: dict = field(default_factory=dict)  # the service runs met, by number
    family: Optional[ir.Family] = ir.Family.IPV4  # of the chain's packets (None: both)

    def require(self, expr: str, negate: bool = False) -> str:
        return f"if ({'' if negate else '!'}({expr})) goto {self.skip};"

    def limit(self, match: Union[ir.LimitMatch, ir.StatisticMatch, ir.NumgenMatch]) -> int:
        """The match's slot of bf_limits: its own, or the one its bucket name (a numgen
        counter: its draw) shares."""
        share = match.bucket if isinstance(match, ir.LimitMatch) else \
            match.draw if isinstance(match, ir.NumgenMatch) else None
        if share is not None:
            shared = next((i for i, m in enumerate(self.limits) if type(m) is type(match)
                           and (m.bucket if isinstance(m, ir.LimitMatch) else m.draw) == share),
                          None)
            if shared is not None:
                return shared
        self.limits.append(match)
        return len(self.limits) - 1

    def numgen(self, match: ir.NumgenMatch) -> int:
        """The match's slot of bf_numgen: one per draw (an nft rule's), one per match
        that shares none."""
        if match.draw is not None and match.draw in self.numgens:
            return self.numgens.index(match.draw)
        self.numgens.append(match.draw)
        return len(self.numgens) - 1

    def if_pattern(self, match: ir.InterfaceMatch) -> int:
        plain = ir.InterfaceMatch(match.direction, match.name)
        if plain not in self.if_patterns:
            if len(self.if_patterns) == 64:
                raise ValueError("more than 64 distinct interface names in one stage")
            self.if_patterns.append(plain)
        return self.if_patterns.index(plain)


def _in_range(value: str, r: ir.Range, top: int = 65535) -> str:
    if r.single:
        return f"{value} == {r.low}"
    parts = []
    if r.low > 0:
        parts.append(f"{value} >= {r.low}")
    if r.high < top:
        parts.append(f"{value} <= {r.high}")
    return " && ".join(parts) or "1"


def _in_network(value: str, network: ir.IPNetwork) -> str:
    """`value` names an address of struct bf_pkt's layout: four words, of which an IPv4
    address uses the first."""
    words = network.max_prefixlen // 32
    mask, net = int(network.netmask), int(network.network_address)
    tests = []
    for i in range(words):
        shift = 32 * (words - 1 - i)
        word_mask, word = (mask >> shift) & 0xFFFFFFFF, (net >> shift) & 0xFFFFFFFF
        if word_mask:
            tests.append(f"({value}[{i}] & 0x{word_mask:08x}) == 0x{word:08x}")
    return " && ".join(tests) or "1"


def _holds(expr: str, negate: bool) -> str:
    return f"!({expr})" if negate else f"({expr})"


def _address(m: ir.AddressMatch, ctx: MatchContext) -> list[str]:
    field_ = "p->src" if m.direction == "src" else "p->dst"
    return [ctx.require(_in_network(field_, m.network), m.negate)]


# Where a packet has no interface of that direction (before routing, or made by this host)
# the kernel compares the pattern with an empty name, which only a bare `+` matches.
_NO_INTERFACE = {"in": "BF_NO_IN", "out": "BF_NO_OUT"}


def _interface(m: ir.InterfaceMatch, ctx: MatchContext) -> list[str]:
    expr = f"(p->ifbits >> {ctx.if_pattern(m)}) & 1"
    if ir.InterfaceMatch(m.direction, m.name).matches(""):
        expr = f"(p->noif & {_NO_INTERFACE[m.direction]}) || ({expr})"
    return [ctx.require(expr, m.negate)]


def _protocol(m: ir.ProtocolMatch, ctx: MatchContext) -> list[str]:
    lines = []
    if ctx.family is not ir.Family.IPV4:
        # ip6_packet_match(): no transport header found is a hotdrop, or for a later
        # fragment no match.
        lines.append(f"if (p->l4_unknown) {{ if (p->frag_off) goto {ctx.skip}; {HOTDROP} }}")
    return lines + [ctx.require(f"p->proto == {m.protocol}", m.negate)]


def _fragment(m: ir.FragmentMatch, ctx: MatchContext) -> list[str]:
    return [ctx.require("p->frag_off != 0", m.negate)]


def _header(ctx: MatchContext, need: int, evil_tcp_offset: bool = False) -> list[str]:
    """Protocol matches see only whole first fragments with `need` header bytes."""
    lines = []
    if evil_tcp_offset:
        lines.append("if (p->frag_off == 1) " + HOTDROP)
    lines.append(f"if (p->frag_off) goto {ctx.skip};")
    lines.append(f"if (p->l4_len < {need}) " + HOTDROP)
    return lines


def _field(ctx: MatchContext, end: int) -> list[str]:
    """nftables reads a transport field of a whole first fragment that has it; a packet
    without it fails the match (NFT_BREAK)."""
    return [f"if (p->frag_off || p->l4_len < {end}) goto {ctx.skip};"]


# Where each field a partial-header match reads ends, from the transport header's start.
_FIELD_ENDS = {"p->sport": 2, "p->dport": 4, "p->th_flags": 14}


def _port_lines(m, ctx: MatchContext) -> list[str]:
    lines = []
    for spec, value in ((m.sport, "p->sport"), (m.dport, "p->dport")):
        if spec is not None:
            if m.partial_header:
                lines += _field(ctx, _FIELD_ENDS[value])
            lines.append(ctx.require(_in_range(value, spec.ports), spec.negate))
    return lines


def _tcp(m: ir.TcpMatch, ctx: MatchContext) -> list[str]:
    lines = ([] if m.partial_header else _header(ctx, 20, evil_tcp_offset=True)) + \
        _port_lines(m, ctx)
    if m.flags is not None:
        flags = "p->th_flags" if m.partial_header else "p->tcp_flags"
        if m.partial_header:
            lines += _field(ctx, _FIELD_ENDS[flags])
        lines.append(ctx.require(f"({flags} & 0x{m.flags.mask:02x}) == 0x{m.flags.comp:02x}",
                                 m.flags.negate))
    return lines


def _udp(m: ir.UdpMatch, ctx: MatchContext) -> list[str]:
    return ([] if m.partial_header else _header(ctx, 8)) + _port_lines(m, ctx)


def _icmp(m: ir.IcmpMatch, ctx: MatchContext) -> list[str]:
    if m.icmp_type == ir.IcmpMatch.ANY:
        expr = "1"
    else:
        codes = "" if m.codes == ir.Range(0, 255) else \
            " && " + _in_range("p->icmp_code", m.codes, top=255)
        expr = f"p->icmp_type == {m.icmp_type}{codes}"
    head = _field(ctx, 1 if m.codes == ir.Range(0, 255) else 2) if m.partial_header \
        else _header(ctx, 8)
    return head + [ctx.require(expr, m.negate)]


def _multiport(m: ir.MultiportMatch, ctx: MatchContext) -> list[str]:
    values = {"src": ["p->sport"], "dst": ["p->dport"], "any": ["p->sport", "p->dport"]}
    tests = [f"({_in_range(v, r)})" for r in m.ports for v in values[m.direction]]
    head = _field(ctx, _FIELD_ENDS[values[m.direction][-1]]) if m.partial_header \
        else _header(ctx, 4)
    return head + [ctx.require(" || ".join(tests), m.negate)]


def _words(address: ir.IPAddress) -> str:
    """An IPv6 address as the four host-order words struct bf_pkt holds."""
    return ", ".join(f"0x{(int(address) >> shift) & 0xFFFFFFFF:08x}"
                     for shift in (96, 64, 32, 0))


def _iprange(m: ir.IpRangeMatch, ctx: MatchContext) -> list[str]:
    lines = []
    for spec, v4, v6 in ((m.src, "p->saddr", "p->src"), (m.dst, "p->daddr", "p->dst")):
        if spec is None:
            continue
        if spec.low.version == 6:
            expr = (f"bf_addr_in({v6}, (const __u32[]){{{_words(spec.low)}}}, "
                    f"(const __u32[]){{{_words(spec.high)}}})")
        else:
            expr = f"{v4} >= 0x{int(spec.low):08x}u && {v4} <= 0x{int(spec.high):08x}u"
        lines.append(ctx.require(expr, spec.negate))
    return lines


def _length(m: ir.LengthMatch, ctx: MatchContext) -> list[str]:
    return [ctx.require(_in_range("p->len", m.length), m.negate)]


_TTL_OPS = {"eq": "==", "lt": "<", "gt": ">"}


def _ttl(m: ir.TtlMatch, ctx: MatchContext) -> list[str]:
    return [ctx.require(f"p->ttl {_TTL_OPS[m.op]} {m.value}", m.negate)]


def _mac(m: ir.MacSourceMatch, ctx: MatchContext) -> list[str]:
    expr = " && ".join(f"p->smac[{i}] == 0x{b:02x}" for i, b in enumerate(m.address))
    return [ctx.require(expr, m.negate)]


def _limit(m: ir.LimitMatch, ctx: MatchContext) -> list[str]:
    index = ctx.limit(m)
    cost = m.interval_ns
    return [ctx.require(f"bf_limit(p, {index}, {cost}ULL, {cost * m.burst}ULL)", m.over)]


def _statistic(m: ir.StatisticMatch, ctx: MatchContext) -> list[str]:
    if m.mode == "random":  # xt_statistic: get_random_u32() & 0x7FFFFFFF < probability
        return [ctx.require(f"(bpf_get_prandom_u32() & 0x7fffffff) < {m.probability}U",
                            m.negate)]
    # the kernel's count starts at every - packet and holds when it wraps to 0
    last = m.every - 1
    return [ctx.require(f"bf_nth(p, {ctx.limit(m)}, {last}U, {last - m.packet}U)",
                        m.negate)]


def _numgen(m: ir.NumgenMatch, ctx: MatchContext) -> list[str]:
    """Drawn once per packet for the IR rules of one nft rule (templates/numgen.h)."""
    draw = ctx.numgen(m)
    counter = ctx.limit(m) if m.mode == "inc" else 0
    fresh = int(m.fresh or m.draw is None)
    held = " || ".join(f"n == {r.low}U" if r.low == r.high else
                       f"(n >= {r.low}U && n <= {r.high}U)" for r in m.values) or "0"
    return ["{", f"\t__u32 n = bf_numgen(p, {draw}, {counter}, {m.modulus}U, {m.offset}U, "
            f"{fresh}, {int(m.mode == 'inc')});", "", "\t" + ctx.require(held, m.negate), "}"]


# enum bf_ct_state (templates/conntrack.h)
CT_BITS = {"INVALID": 1, "NEW": 2, "RELATED": 4, "ESTABLISHED": 8, "UNTRACKED": 16,
           "SNAT": 32, "DNAT": 64}


def ct_mask(states: tuple[str, ...]) -> int:
    return sum(CT_BITS[s] for s in states)


_CT_TUPLE = {"origsrc": "p->ct_orig[0]", "origdst": "p->ct_orig[1]",
             "replsrc": "p->ct_orig[1]", "repldst": "p->ct_orig[0]",  # no NAT: swapped
             "origsrcport": "p->ct_port[0]", "origdstport": "p->ct_port[1]",
             "replsrcport": "p->ct_port[1]", "repldstport": "p->ct_port[0]"}


def _conntrack(m: ir.ConntrackMatch, ctx: MatchContext) -> list[str]:
    """xt_conntrack: the state first; an INVALID or UNTRACKED packet has no connection,
    and then the match holds only if it had a state condition (which held)."""
    ctx.conntrack = True
    lines = []
    if m.states:
        lines.append(ctx.require(f"p->ct_state & {ct_mask(m.states)}", m.negate))
    if m.only_states:
        return lines
    others = []
    if m.direction is not None:
        others.append(f"p->ct_dir == {int(m.direction == 'REPLY')}")
    if m.protocol is not None:
        others.append(_holds(f"p->ct_proto == {m.protocol.protocol}", m.protocol.negate))
    for name in ir.ConntrackMatch.ADDRESSES:
        address = getattr(m, name)
        if address is not None:
            others.append(_holds(_in_network(_CT_TUPLE[name], address.network),
                                 address.negate))
    for name in ir.ConntrackMatch.PORTS:
        spec = getattr(m, name)
        if spec is not None:
            others.append(_holds(_in_range(_CT_TUPLE[name], spec.ports), spec.negate))
    has_connection = "(p->ct_state & BF_CT_CONN)"
    if m.states:
        return lines + [ctx.require(f"!{has_connection} || ({' && '.join(others)})")]
    return [ctx.require(f"{has_connection} && {' && '.join(others)}")]


def _mark(m: ir.MarkMatch, ctx: MatchContext) -> list[str]:
    field_ = "p->ct_mark" if m.connection else "p->mark"
    expr = f"({field_} & 0x{m.mask:x}) == 0x{m.value:x}"
    if not m.connection:
        return [ctx.require(expr, m.negate)]
    ctx.conntrack = True
    # No connection, no match, negated or not (xt_connmark).
    return [ctx.require(f"(p->ct_state & BF_CT_CONN) && {_holds(expr, m.negate)}")]


_LIMIT_INTERFACE = {None: "0", "in": "p->ifindex", "out": "p->oifindex"}


def _addrtype(m: ir.AddrTypeMatch, ctx: MatchContext) -> list[str]:
    """xt_addrtype (IPv4): the source's types, then the destination's."""
    if ctx.family is not ir.Family.IPV4:
        raise ValueError("address types are compiled for IPv4 chains only")
    device = _LIMIT_INTERFACE[m.limit]
    return [ctx.require(f"bf_addr_type_in(p->{field}, {device}, 0x{m.mask(types):x})",
                        negate)
            for types, negate, field in ((m.src, m.src_negate, "saddr"),
                                         (m.dst, m.dst_negate, "daddr")) if types]


def _comment(m: ir.CommentMatch, ctx: MatchContext) -> list[str]:
    return []


def _family(m: ir.FamilyMatch, ctx: MatchContext) -> list[str]:
    return [ctx.require(f"p->family == {6 if m.family is ir.Family.IPV6 else 4}", m.negate)]


def _tos(m: ir.TosMatch, ctx: MatchContext) -> list[str]:
    return [ctx.require(f"(p->tos & 0x{m.mask:02x}) == 0x{m.value:02x}", m.negate)]


def _dscp(m: ir.DscpMatch, ctx: MatchContext) -> list[str]:
    return [ctx.require(f"(p->tos >> 2) == 0x{m.dscp:02x}", m.negate)]


def _ecn(m: ir.EcnMatch, ctx: MatchContext) -> list[str]:
    """xt_ecn: the IP codepoint first, then TCP's flags from a whole 20-byte header."""
    lines = [] if m.ect is None else [ctx.require(f"(p->tos & 3) == {m.ect}", m.ect_negate)]
    if m.ece is not None or m.cwr is not None:
        lines.append(f"if (p->frag_off || p->l4_len < 20) goto {ctx.skip};")
    for flag, bit in ((m.ece, 0x40), (m.cwr, 0x80)):
        if flag is not None:
            lines.append(ctx.require(f"p->tcp_flags & 0x{bit:02x}", not flag))
    return lines


def _esp(m: ir.EspMatch, ctx: MatchContext) -> list[str]:
    """xt_esp: a later fragment does not match, a header shorter than 8 bytes drops."""
    spi = "((__u32)p->sport << 16 | p->dport)"
    return [f"if (p->frag_off) goto {ctx.skip};", f"if (p->l4_len < 8) {HOTDROP}",
            ctx.require(f"{spi} >= {m.low}U && {spi} <= {m.high}U", m.negate)]


_RECENT_MODES = {"set": 0, "rcheck": 1, "update": 2, "remove": 3}  # enum bf_recent_how


def _recent(m: ir.RecentMatch, ctx: MatchContext) -> list[str]:
    """templates/recent.h; lists are numbered by name across the ruleset (both families
    share a name, as the kernel's lists)."""
    if m.name not in ctx.recent_lists:
        ctx.recent_lists.append(m.name)
    ctx.recent_hits = max(ctx.recent_hits, m.hitcount)
    how = (ctx.recent_lists.index(m.name) << 32 | m.hitcount << 16 | _RECENT_MODES[m.mode]
           | 4 * m.invert | 8 * m.rttl | 16 * (m.side == "dst"))
    mask = int(m.mask) if m.mask.version == 4 else \
        128 - (~int(m.mask) & (2 ** 128 - 1)).bit_length()
    return ["{", f"\tint r = bf_recent(p, 0x{how:x}ULL, {m.seconds}U, 0x{mask:x}U);", "",
            f"\tif (r < 0) {HOTDROP}", "\t" + ctx.require("r"), "}"]


def _routing_header(m: ir.RoutingHeaderMatch, ctx: MatchContext) -> list[str]:
    """ip6t_rt: no routing header (ipv6_find_hdr()'s -ENOENT, a later fragment's too) or
    one the packet cuts: no match; a header chain cut before one: hotdrop."""
    lines = [f"if (!(p->ip6_flags & BF_IP6_RT)) {{ if (p->l4_unknown && !p->frag_off) "
             f"{HOTDROP} goto {ctx.skip}; }}",
             ctx.require("p->ip6_flags & BF_IP6_RT_WHOLE")]
    if m.segsleft != m.ANY_SEGSLEFT or m.segsleft_negate:
        lines.append(ctx.require(_in_range("(__u32)p->rt_segs", m.segsleft, top=0xFFFFFFFF),
                                 m.segsleft_negate))
    if m.length is not None:
        lines.append(ctx.require(f"((__u32)p->rt_len + 1) * 8 == {m.length}U", m.length_negate))
    if m.rt_type is not None:
        lines.append(ctx.require(f"p->rt_type == {m.rt_type}U", m.type_negate))
    if m.reserved_zero:
        lines.append(ctx.require("p->ip6_flags & BF_IP6_RT_RES0"))
    return lines


def _ethertype(m: ir.EtherTypeMatch, ctx: MatchContext) -> list[str]:
    expr = " || ".join(f"p->ethertype == 0x{t:04x}" for t in m.ethertypes)
    return [ctx.require(expr, m.negate)]


GENERATORS: dict[type, Callable[..., list[str]]] = {
    ir.AddressMatch: _address,
    ir.InterfaceMatch: _interface,
    ir.ProtocolMatch: _protocol,
    ir.FragmentMatch: _fragment,
    ir.TcpMatch: _tcp,
    ir.UdpMatch: _udp,
    ir.IcmpMatch: _icmp,
    ir.MultiportMatch: _multiport,
    ir.IpRangeMatch: _iprange,
    ir.LengthMatch: _length,
    ir.TtlMatch: _ttl,
    ir.MacSourceMatch: _mac,
    ir.LimitMatch: _limit,
    ir.StatisticMatch: _statistic,
    ir.NumgenMatch: _numgen,
    ir.CommentMatch: _comment,
    ir.ConntrackMatch: _conntrack,
    ir.MarkMatch: _mark,
    ir.FamilyMatch: _family,
    ir.EtherTypeMatch: _ethertype,
    ir.AddrTypeMatch: _addrtype,
    ir.RoutingHeaderMatch: _routing_header,
    ir.RecentMatch: _recent,
    ir.TosMatch: _tos,
    ir.DscpMatch: _dscp,
    ir.EcnMatch: _ecn,
    ir.EspMatch: _esp,
}


def match_lines(match: ir.Match, ctx: MatchContext) -> list[str]:
    return GENERATORS[type(match)](match, ctx)
