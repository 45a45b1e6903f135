"""IR -> iptables-save text, spelled as iptables-save 1.8 spells it (canonical order)."""

from __future__ import annotations

import re
from typing import Callable, Optional

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.frontend.iptables import names

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")


def quote(value: str) -> str:
    """iptables' xtables_save_string: bare when safe, else double-quoted with escapes."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + re.sub(r'(["\\\'])', r"\\\1", value) + '"'


def _neg(negate: bool) -> str:
    return "! " if negate else ""


def _range(r: ir.Range) -> str:
    return str(r.low) if r.single else f"{r.low}:{r.high}"


def _network(net) -> str:
    return f"{net.network_address}/{net.prefixlen}"


def _flags(value: int) -> str:
    if value == 0:
        return "NONE"
    return ",".join(name for name, bit in names.TCP_FLAGS.items() if value & bit)


def _ports(module: str, m) -> list[str]:
    parts = [f"-m {module}"]
    if m.sport is not None:
        parts.append(f"{_neg(m.sport.negate)}--sport {_range(m.sport.ports)}")
    if m.dport is not None:
        parts.append(f"{_neg(m.dport.negate)}--dport {_range(m.dport.ports)}")
    flags = getattr(m, "flags", None)
    if flags is not None:
        parts.append(f"{_neg(flags.negate)}--tcp-flags {_flags(flags.mask)} "
                     f"{_flags(flags.comp)}")
    return parts


def _icmp(m: ir.IcmpMatch) -> list[str]:
    if m.icmp_type == ir.IcmpMatch.ANY and m.version == 4:
        spec = "any"
    elif m.codes == ir.Range(0, 255):
        spec = str(m.icmp_type)
    else:
        spec = f"{m.icmp_type}/{m.codes.low}"
    if m.version == 6:
        return ["-m icmp6", f"{_neg(m.negate)}--icmpv6-type {spec}"]
    return ["-m icmp", f"{_neg(m.negate)}--icmp-type {spec}"]


def _iprange(m: ir.IpRangeMatch) -> list[str]:
    parts = ["-m iprange"]
    for option, spec in (("--src-range", m.src), ("--dst-range", m.dst)):
        if spec is not None:
            parts.append(f"{_neg(spec.negate)}{option} {spec.low}-{spec.high}")
    return parts


def _conntrack(m: ir.ConntrackMatch) -> list[str]:
    """In the order iptables-save prints them, whatever order they were given in."""
    if m.module == "state":
        return ["-m state", f"{_neg(m.negate)}--state " + ",".join(m.states)]
    parts = ["-m conntrack"]
    if m.states:
        parts.append(f"{_neg(m.negate)}--ctstate " + ",".join(m.states))
    if m.protocol is not None:
        parts.append(f"{_neg(m.protocol.negate)}--ctproto {m.protocol.protocol}")
    for name in ir.ConntrackMatch.ADDRESSES:
        address = getattr(m, name)
        if address is not None:
            net = address.network
            text = str(net.network_address) if net.prefixlen == 32 else str(net)
            parts.append(f"{_neg(address.negate)}--ct{name} {text}")
    for name in ir.ConntrackMatch.PORTS:
        spec = getattr(m, name)
        if spec is not None:
            parts.append(f"{_neg(spec.negate)}--ct{name} {_range(spec.ports)}")
    if m.direction:
        parts.append(f"--ctdir {m.direction}")
    return parts


def _limit(m: ir.LimitMatch) -> list[str]:
    parts = ["-m limit", f"--limit {m.count}/{m.unit}"]
    if m.burst != 5:
        parts.append(f"--limit-burst {m.burst}")
    return parts


def _statistic(m: ir.StatisticMatch) -> list[str]:
    if m.mode == "random":
        return ["-m statistic --mode random",
                f"{_neg(m.negate)}--probability {m.probability / m.ONE:.11f}"]
    return ["-m statistic --mode nth", f"{_neg(m.negate)}--every {m.every}",
            f"--packet {m.packet}"]


def _masked(value: int, mask: int) -> str:
    return f"0x{value:x}" if mask == 0xFFFFFFFF else f"0x{value:x}/0x{mask:x}"


def _connmark(t: ir.ConnmarkTarget) -> list[str]:
    if t.mode is ir.ConnmarkMode.SET:
        return ["-j CONNMARK", f"--set-xmark 0x{t.value:x}/0x{t.ctmask:x}"]
    return ["-j CONNMARK", f"--{t.mode.value}-mark --nfmask 0x{t.nfmask:x} "
            f"--ctmask 0x{t.ctmask:x}"]


_MULTIPORT_OPTION = {"src": "--sports", "dst": "--dports", "any": "--ports"}


def _addrtype(m: ir.AddrTypeMatch) -> list[str]:
    parts = ["-m addrtype"]
    for types, negate, option in ((m.src, m.src_negate, "--src-type"),
                                  (m.dst, m.dst_negate, "--dst-type")):
        if types:
            parts.append(f"{_neg(negate)}{option} {','.join(types)}")
    if m.limit:
        parts.append(f"--limit-iface-{m.limit}")
    return parts

_MATCHES: dict[type, Callable] = {
    ir.AddressMatch: lambda m: [f"{_neg(m.negate)}-{m.direction[0]} {_network(m.network)}"],
    ir.InterfaceMatch: lambda m: [f"{_neg(m.negate)}-{'i' if m.direction == 'in' else 'o'} "
                                  f"{m.name}"],
    ir.ProtocolMatch: lambda m: [f"{_neg(m.negate)}-p "
                                 f"{names.PROTOCOL_NAMES.get(m.protocol, m.protocol)}"],
    ir.FragmentMatch: lambda m: [f"{_neg(m.negate)}-f"],
    ir.TcpMatch: lambda m: _ports("tcp", m),
    ir.UdpMatch: lambda m: _ports("udp", m),
    ir.IcmpMatch: _icmp,
    ir.MultiportMatch: lambda m: ["-m multiport", f"{_neg(m.negate)}"
                                  f"{_MULTIPORT_OPTION[m.direction]} "
                                  + ",".join(_range(p) for p in m.ports)],
    ir.IpRangeMatch: _iprange,
    ir.CommentMatch: lambda m: ["-m comment", f"--comment {quote(m.text)}"],
    ir.LengthMatch: lambda m: ["-m length", f"{_neg(m.negate)}--length {_range(m.length)}"],
    ir.TtlMatch: lambda m: ["-m ttl", f"{_neg(m.negate)}--ttl-{m.op} {m.value}"],
    ir.MacSourceMatch: lambda m: ["-m mac", f"{_neg(m.negate)}--mac-source "
                                  + ":".join(f"{b:02x}" for b in m.address)],
    ir.LimitMatch: _limit,
    ir.StatisticMatch: _statistic,
    ir.ConntrackMatch: _conntrack,
    ir.AddrTypeMatch: _addrtype,
    ir.MarkMatch: lambda m: [f"-m {'connmark' if m.connection else 'mark'}",
                             f"{_neg(m.negate)}--mark {_masked(m.value, m.mask)}"],
    ir.RoutingHeaderMatch: lambda m: _routing_header(m),
    ir.RecentMatch: lambda m: _recent(m),
    ir.TosMatch: lambda m: ["-m tos", f"{_neg(m.negate)}--tos 0x{m.value:02x}/0x{m.mask:02x}"],
    ir.DscpMatch: lambda m: ["-m dscp", f"{_neg(m.negate)}--dscp 0x{m.dscp:02x}"],
    ir.EcnMatch: lambda m: _ecn(m),
    ir.EspMatch: lambda m: ["-m esp"] + (
        [] if (m.low, m.high) == (0, 0xFFFFFFFF) and not m.negate else
        [f"{_neg(m.negate)}--espspi "
         + (str(m.low) if m.low == m.high else f"{m.low}:{m.high}")]),
}


def _ecn(m: ir.EcnMatch) -> list[str]:
    words = ["-m ecn"]
    for flag, name in ((m.ece, "ece"), (m.cwr, "cwr")):
        if flag is not None:
            words.append(f"{_neg(not flag)}--ecn-tcp-{name}")
    if m.ect is not None:
        words.append(f"{_neg(m.ect_negate)}--ecn-ip-ect {m.ect}")
    return words


def _recent(m: ir.RecentMatch) -> list[str]:
    """libxt_recent's save (the mask printed by the rule's family, all ones by default)."""
    words = ["-m recent", f"{_neg(m.invert)}--{m.mode}"]
    words += [f"--seconds {m.seconds}"] if m.seconds else []
    words += [f"--hitcount {m.hitcount}"] if m.hitcount else []
    words += ["--rttl"] if m.rttl else []
    return words + [f"--name {m.name}", f"--mask {m.mask}",
                    "--rdest" if m.side == "dst" else "--rsource"]


def _routing_header(m: ir.RoutingHeaderMatch) -> list[str]:
    """libip6t_rt's save."""
    words = ["-m rt"]
    if m.rt_type is not None:
        words.append(f"{_neg(m.type_negate)}--rt-type {m.rt_type}")
    if m.segsleft != m.ANY_SEGSLEFT or m.segsleft_negate:
        segs = m.segsleft
        words.append(f"{_neg(m.segsleft_negate)}--rt-segsleft "
                     + (str(segs.low) if segs.single else f"{segs.low}:{segs.high}"))
    if m.length is not None:
        words.append(f"{_neg(m.length_negate)}--rt-len {m.length}")
    if m.reserved_zero:
        words.append("--rt-0-res")
    return words


def _nflog(t: ir.LogTarget) -> list[str]:
    """libxt_NFLOG's save."""
    parts = ["-j NFLOG"] + ([f"--nflog-prefix {quote(t.prefix)}"] if t.prefix else [])
    parts += [f"--nflog-group {t.group}"] if t.group else []
    parts += [f"--nflog-size {t.size}"] if t.size is not None else \
        [f"--nflog-range {t.range}"] if t.range else []
    return parts + ([f"--nflog-threshold {t.threshold}"] if t.threshold else [])


def _log(t: ir.LogTarget) -> list[str]:
    if t.nflog:
        return _nflog(t)
    parts = ["-j LOG"]
    if t.prefix:
        parts.append(f"--log-prefix {quote(t.prefix)}")
    if t.level != 4:
        parts.append(f"--log-level {t.level}")
    for flag, option in ((t.tcp_sequence, "--log-tcp-sequence"),
                         (t.tcp_options, "--log-tcp-options"),
                         (t.ip_options, "--log-ip-options"), (t.uid, "--log-uid")):
        if flag:
            parts.append(option)
    return parts


def _port_range(ports: Optional[tuple[int, int]]) -> str:
    return "" if ports is None else str(ports[0]) if ports[0] == ports[1] \
        else f"{ports[0]}-{ports[1]}"


def _nat_addresses(t) -> str:
    return "" if t.address is None else str(t.address) + (
        f"-{t.last_address}" if t.last_address is not None else "")


def _dnat(t: ir.DnatTarget) -> list[str]:
    ports = _port_range(t.ports)
    if t.port_base is not None:  # (a shift is always written as a range)
        ports = f"{t.ports[0]}-{t.ports[1]}/{t.port_base}"
    to = _nat_addresses(t) + (f":{ports}" if ports else "")
    if t.redirect:
        parts = ["-j REDIRECT"] + ([f"--to-ports {ports}"] if ports else [])
    else:
        parts = [f"-j DNAT --to-destination {to}"]
    return parts + [
        option for flag, option in ((t.random, "--random"), (t.persistent, "--persistent"))
        if flag]


def _snat(t: ir.SnatTarget) -> list[str]:
    ports = _port_range(t.ports)
    if t.masquerade:
        parts = ["-j MASQUERADE"] + ([f"--to-ports {ports}"] if ports else [])
    else:
        parts = [f"-j SNAT --to-source {_nat_addresses(t)}" + (f":{ports}" if ports else "")]
    return parts + [option for flag, option in ((t.random, "--random"),
                                                (t.random_fully, "--random-fully"),
                                                (t.persistent, "--persistent")) if flag]


_TARGETS: dict[type, Callable] = {
    ir.VerdictTarget: lambda t: [f"-j {t.verdict.value}"],
    ir.ReturnTarget: lambda t: ["-j RETURN"],
    ir.JumpTarget: lambda t: [f"-{'g' if t.goto else 'j'} {t.chain}"],
    ir.RejectTarget: lambda t: [f"-j REJECT --reject-with {t.with_.value}"],
    ir.LogTarget: _log,
    ir.MarkTarget: lambda t: [f"-j MARK --set-xmark 0x{t.value:x}/0x{t.mask:x}"],
    ir.ConnmarkTarget: _connmark,
    ir.ChecksumTarget: lambda t: ["-j CHECKSUM --checksum-fill"],
    ir.NotrackTarget: lambda t: ["-j NOTRACK" if t.spelling == "NOTRACK"
                                 else "-j CT --notrack"],
    ir.DnatTarget: _dnat,
    ir.SnatTarget: _snat,
}


# ip6tables' name for TTL: the hop limit.
_HOP_LIMIT = lambda m: ["-m hl", f"{_neg(m.negate)}--hl-{m.op} {m.value}"]  # noqa: E731

# The base options: iptables takes each at most once in a rule.
_BASE_OPTIONS = {ir.AddressMatch: lambda m: f"-{m.direction[0]}",
                 ir.InterfaceMatch: lambda m: "-i" if m.direction == "in" else "-o",
                 ir.ProtocolMatch: lambda m: "-p", ir.FragmentMatch: lambda m: "-f"}


def rule_text(chain: str, rule: ir.Rule, family: ir.Family = ir.Family.IPV4) -> str:
    """One rule as `-A CHAIN ...` (as ip6tables-save writes it for IPV6), without
    counters."""
    parts = [f"-A {chain}"]
    options = [_BASE_OPTIONS[type(m)](m) for m in rule.matches if type(m) in _BASE_OPTIONS]
    twice = next((o for o in options if options.count(o) > 1), None)
    if twice is not None:
        raise InputError(rule.origin.file, rule.origin.line, twice,
                         f"iptables takes {twice} once in a rule, and this rule needs it "
                         "twice (a '!=' set?)", column=rule.origin.column)
    if any(isinstance(m, ir.LimitMatch) and m.over for m in rule.matches):
        raise InputError(rule.origin.file, rule.origin.line, "limit rate over",
                         "iptables' limit has no 'over'", column=rule.origin.column)
    if isinstance(rule.target, ir.DnatTarget) and rule.target.redirect and \
            rule.target.persistent:
        raise InputError(rule.origin.file, rule.origin.line, "persistent",
                         "iptables' REDIRECT has no --persistent", column=rule.origin.column)
    if any(isinstance(m, ir.NumgenMatch) for m in rule.matches):
        raise InputError(rule.origin.file, rule.origin.line, "numgen",
                         "iptables has no numgen (-m statistic draws for each rule: "
                         "kube-proxy's ladder of probabilities is the iptables way)",
                         column=rule.origin.column)
    if any(isinstance(m, ir.MultiportMatch) for m in rule.matches) and "-p" not in options:
        raise InputError(rule.origin.file, rule.origin.line, "th",
                         "iptables reads ports of a protocol given with -p only",
                         column=rule.origin.column)
    for match in rule.matches:
        printer = _HOP_LIMIT if isinstance(match, ir.TtlMatch) and \
            family is ir.Family.IPV6 else _MATCHES[type(match)]
        parts.extend(printer(match))
    if rule.target is not None:
        parts.extend(_TARGETS[type(rule.target)](rule.target))
    return " ".join(parts)


def _counter_text(counters: Optional[ir.Counters]) -> str:
    counters = counters or ir.Counters()
    return f"[{counters.packets}:{counters.bytes}]"


def save(ruleset: ir.Ruleset, counters: bool = False,
         live: Optional[Callable[[str, str, int], ir.Counters]] = None) -> str:
    """The ruleset as iptables-save prints it; `counters` adds the `-c` rule prefixes.

    `live(table, chain, index)` supplies counters from a running ruleset (index -1 is the
    chain policy); without it the counters read from the input are printed.
    """
    lines = []
    families = {t.family for t in ruleset.tables}
    for table in ruleset.tables:
        # What the text is read back as: ip6tables' header before IPv6 tables, and where
        # both families share the text, iptables' before IPv4 ones (frontend's sections).
        if table.family in families and (table.family is ir.Family.IPV6 or len(families) > 1):
            tool = "ip6tables" if table.family is ir.Family.IPV6 else "iptables"
            lines.append(f"# {tool}-save text, written by bpfilter")
        families.discard(table.family)
        lines.append(f"*{table.name}")
        for chain in table.chains:
            chain_counters = live(table.key, chain.name, -1) if live else chain.counters
            policy = chain.policy.value if chain.policy else "-"
            lines.append(f":{chain.name} {policy} {_counter_text(chain_counters)}")
        for chain in table.chains:
            for index, rule in enumerate(chain.rules):
                text = rule_text(chain.name, rule, table.family)
                if counters:
                    rule_counters = live(table.key, chain.name, index) if live \
                        else rule.counters
                    text = f"{_counter_text(rule_counters)} {text}"
                lines.append(text)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"
