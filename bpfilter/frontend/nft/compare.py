"""One nft comparison (`selector op value`) as the IR matches it stands for: what nft
makes of each operator on each kind of field (a bitmask's `!=` compares the whole value,
`th` reads any transport header, a transport field is read where it is), and the values
each field takes.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace
from typing import Optional

from bpfilter import ir
from bpfilter.frontend.nft import names
from bpfilter.frontend.nft.words import Item, Word

# The fields whose values are bitmasks: `a,b` (or `a|b`) is one value of several bits.
_BITMASKS = ("tcp flags", "ct state", "ct status")

SUPPORTED = ("ip saddr|daddr|protocol|ttl|length|frag-off, ip6 saddr|daddr|hoplimit, "
             "tcp sport|dport|flags, udp sport|dport, th sport|dport, icmp type|code, "
             "icmpv6 type|code, "
             "meta l4proto|iifname|oifname|iif|oif|mark|length|protocol|nfproto, "
             "meta random & 2147483647 < N, numgen, "
             "ct state|status|mark|direction, ether saddr|type, fib saddr|daddr [. iif|oif] type, "
             "counter, limit [over], log, "
             "comment, meta mark set, ct mark set, notrack, accept, drop, reject, return, "
             "jump, goto")


# A connection tuple's fields (`ct original saddr`) -> ConntrackMatch's (`origsrc`).
TUPLE_FIELDS = {"saddr": "src", "daddr": "dst", "protocol": "", "proto-src": "srcport",
                 "proto-dst": "dstport"}


class Comparisons:
    """RuleReader's comparisons (rule.py): they read `self.v6` and report through
    `self.error`."""

    v6: bool
    family: Optional[ir.Family]
    words: list[Item]
    pos: int

    def _set_match(self, kind: str, values: list[list[Word]],
                   negate: bool) -> Optional[tuple[ir.Match, ...]]:
        """Sets the IR takes whole: ports (multiport), connection states."""
        if kind in ("tcp sport", "tcp dport", "udp sport", "udp dport", "th sport",
                    "th dport"):
            return self._ports(kind, [self._port_range(v[0]) for v in values], negate)
        if kind == "ct state":
            return (self._states([w for v in values for w in v], negate),)
        return None

    def _ports(self, kind: str, ports: list[ir.Range],
               negate: bool) -> tuple[ir.Match, ...]:
        """Ports in a list, of tcp or udp, or with th of any transport header."""
        proto, field_ = kind.split()
        match = ir.MultiportMatch("src" if field_ == "sport" else "dst", tuple(ports),
                                  negate, partial_header=True)
        return (match,) if proto == "th" else (ir.ProtocolMatch(names.PROTOCOLS[proto]),
                                               match)

    def _compare(self, selector: tuple[str, Word], op: str, mask: Optional[int],
                 words: list[Word]) -> tuple[ir.Match, ...]:
        kind, where = selector
        negate = op in ("!=", "!")
        first = words[0]
        listed = [w for w in words[1:] if w.value != "/"]
        if listed and kind not in _BITMASKS and "/" not in (w.value for w in words):
            raise self.error(listed[0], f"'{kind}' is not a bitmask: a list of values needs "
                             "braces", f"{kind} {{ a, b }}")
        if op == "!" and mask is not None:
            raise self.error(where, "cannot combine negation with binary expression",
                             f"{kind} & mask != value")
        if op == "!" and kind not in _BITMASKS:
            raise self.error(where, "negation can only be used with singleton bitmask values",
                             f"{kind} != value")
        if kind == "meta random":
            return (self._random(where, first, op, mask),)
        if mask is not None and kind not in ("meta mark", "ct mark", "ip frag-off",
                                             "tcp flags"):
            raise self.error(where, f"a mask on '{kind}' is not supported")
        if op in ("<", ">", "<=", ">=") and kind not in ("ip ttl", "ip length", "meta length",
                                                         "tcp sport", "tcp dport",
                                                         "udp sport", "udp dport",
                                                         "th sport", "th dport"):
            raise self.error(where, f"'{op}' on '{kind}' is not supported", "==, !=")
        if kind in ("ip saddr", "ip daddr"):
            return (self._address("src" if kind == "ip saddr" else "dst", first, negate),)
        if kind in ("ip protocol", "meta l4proto"):
            return (ir.ProtocolMatch(self._protocol(first), negate),)
        if kind in ("th sport", "th dport"):
            return self._ports(kind, [self._ordered(self._port_range(first), op, 65535)],
                               negate)
        if kind in ("tcp sport", "tcp dport", "udp sport", "udp dport"):
            proto, field_ = kind.split()
            spec = ir.PortSpec(self._ordered(self._port_range(first), op, 65535), negate)
            module = ir.TcpMatch if proto == "tcp" else ir.UdpMatch
            return (ir.ProtocolMatch(names.PROTOCOLS[proto]),
                    module(**{field_: spec}, partial_header=True))
        if kind == "tcp flags":
            return (ir.ProtocolMatch(6), ir.TcpMatch(flags=self._tcp_flags(words, op, mask),
                                                     partial_header=True))
        if kind == "icmp type":
            known = names.ICMP6_TYPES if self.v6 else names.ICMP_TYPES
            icmp_type = known.get(first.value)
            if icmp_type is None:
                icmp_type = self._int(first, "an ICMP type", known)
            return (ir.ProtocolMatch(58 if self.v6 else 1),
                    ir.IcmpMatch(icmp_type, negate=negate, partial_header=True,
                                 version=6 if self.v6 else 4))
        if kind == "icmp code":
            return self._icmp_code(where, first, negate)
        if kind in ("meta iifname", "meta oifname", "meta iif", "meta oif"):
            name = first.value.replace("*", "+") if first.value.endswith("*") else first.value
            if name.startswith("@") or not name:
                raise self.error(first, "an interface name expected")
            if not first.quoted and first.value in names.KEYWORDS:
                raise self.error(first, f"syntax error, unexpected {first.value} (a word of "
                                 "nft's own)", f'"{first.value}" in quotes')
            return (ir.InterfaceMatch("in" if "i" == kind.split()[1][0] else "out", name,
                                      negate),)
        if kind in ("meta mark", "ct mark"):
            return (ir.MarkMatch(self._int(first), 0xFFFFFFFF if mask is None else mask,
                                 negate, kind == "ct mark"),)
        if kind in ("meta length", "ip length"):
            return (ir.LengthMatch(self._ordered(self._range(first, 65535), op, 65535),
                                   negate),)
        if kind == "ip ttl":
            return (self._ttl(first, op),)
        if kind in ("meta protocol", "ether type", "meta nfproto"):
            return self._family_test(kind, first, op)
        if kind == "ip frag-off":
            if mask != 0x1FFF or self._int(first) != 0 or op not in ("!=", "=="):
                raise self.error(where, "only 'ip frag-off & 0x1fff != 0' (later fragments) "
                                 "and '== 0' are supported")
            return (ir.FragmentMatch(negate=op == "=="),)
        if kind == "ct state":
            return self._state_compare(words, op)
        if kind == "ct status":
            return (self._status(words, op),)
        if kind.startswith(("ct original ", "ct reply ")):
            return (self._tuple(kind, first, negate),)
        if kind == "ct direction":
            if first.value not in ("original", "reply"):
                raise self.error(first, "unknown direction", "original, reply")
            # A packet with no connection has no direction: != one is the other.
            other = {"original": "reply", "reply": "original"}[first.value]
            return (ir.ConntrackMatch((), direction=(other if negate else first.value).upper()),)
        if kind == "ether saddr":
            try:
                address = bytes(int(b, 16) for b in first.value.split(":"))
            except ValueError:
                address = b""
            if len(address) != 6:
                raise self.error(first, "a MAC address expected", "aa:bb:cc:dd:ee:ff")
            return (ir.MacSourceMatch(address, negate),)
        raise self.error(where, f"'{kind}' is not supported", SUPPORTED)

    def _family_test(self, kind: str, word: Word, op: str) -> tuple[ir.Match, ...]:
        """A test of the packet's family: a match in an inet table; in a table of one
        family it always holds (nothing to test), or never, which is refused."""
        if self.frames and kind == "meta nfproto":
            raise self.error(word, "in a netdev chain nfproto is netdev, never a family",
                             "meta protocol ip, meta protocol ip6")
        known = names.FAMILY_WORDS["meta protocol" if kind == "ether type" else kind]
        family = known.get(word.value)  # nft's names are lower case, and only that
        if family is None and self.frames and op in ("implicit", "==", "!="):
            return (ir.EtherTypeMatch((self._ethertype(word),), op == "!="),)
        if family is None or op not in ("implicit", "==", "!="):
            raise self.error(word, f"'{kind}' is compared with a family",
                             ", ".join(f"{kind} {w}" for w in known))
        negate = op == "!="
        if self.family is None:
            return (ir.FamilyMatch(family, negate),)
        if (family is self.family) == negate:
            raise self.error(word, "never true in a table of family "
                             f"{names.FAMILY_NAMES[self.family]}")
        return ()

    def _ethertype(self, word: Word) -> int:
        value = names.ETHERTYPES.get(word.value)
        if value is None:
            try:
                value = int(word.value, 0)
            except ValueError:
                value = -1
        if not 0x600 <= value <= 0xFFFF:
            raise self.error(word, "an EtherType expected", ", ".join(names.ETHERTYPES) +
                             ", or a number from 0x0600")
        return value

    def _tuple(self, kind: str, word: Word, negate: bool) -> ir.ConntrackMatch:
        _ct, direction, key = kind.split()
        if key == "protocol":
            return ir.ConntrackMatch((), protocol=ir.ProtocolMatch(self._protocol(word), negate))
        name = ("orig" if direction == "original" else "repl") + TUPLE_FIELDS[key]
        if key.startswith("proto-"):
            value = ir.PortSpec(self._port_range(word), negate)
        else:
            match = self._address("src", word, negate)
            if not isinstance(match, ir.AddressMatch):
                raise self.error(word, "an address or prefix expected")
            value = ir.ConntrackAddress(match.network, negate)
        return ir.ConntrackMatch((), **{name: value})

    def _address(self, direction: str, word: Word, negate: bool) -> ir.Match:
        text = word.value
        address = ipaddress.IPv6Address if self.v6 else ipaddress.IPv4Address
        network = ipaddress.IPv6Network if self.v6 else ipaddress.IPv4Network
        try:
            if "-" in text:
                low, high = (address(p) for p in text.split("-", 1))
                spec = ir.AddressRangeSpec(low, high, negate)
                return ir.IpRangeMatch(**{direction: spec})
            return ir.AddressMatch(direction, network(text, strict=False), negate)
        except ValueError:
            raise self.error(word, f"an IPv{6 if self.v6 else 4} address, prefix or range "
                             "expected", "2001:db8::1, 2001:db8::/32, 2001:db8::1-2001:db8::9"
                             if self.v6 else "192.0.2.1, 192.0.2.0/24, 192.0.2.1-192.0.2.9"
                             ) from None

    def _protocol(self, word: Word) -> int:
        if word.value in names.PROTOCOLS:
            return names.PROTOCOLS[word.value]
        number = self._int(word, "a protocol", names.PROTOCOLS)
        if not 0 <= number <= 255:
            raise self.error(word, "Protocol out of range", "0-255, or a protocol name")
        return number

    def _port_range(self, word: Word) -> ir.Range:
        return self._range(word, 65535, port=True)

    def _range(self, word: Word, top: int, port: bool = False) -> ir.Range:
        low, _, high = word.value.partition("-")

        def number(text: str) -> int:
            if port and not text.isdigit():
                try:
                    return socket.getservbyname(text)
                except OSError:
                    raise self.error(word, "unknown service name") from None
            return self._int(Word(text, word.line, word.column))

        low_value = number(low)
        high_value = number(high) if high else low_value
        if not 0 <= low_value <= high_value <= top:
            raise self.error(word, f"a value or range within 0-{top} expected")
        return ir.Range(low_value, high_value)

    def _ordered(self, value: ir.Range, op: str, top: int) -> ir.Range:
        if op in ("implicit", "==", "!="):
            return value
        if not value.single:
            raise self.error(self.words[self.pos - 1], f"'{op}' needs a single value")
        n = value.low
        bounds = {"<": (0, n - 1), "<=": (0, n), ">": (n + 1, top), ">=": (n, top)}[op]
        if bounds[0] > bounds[1]:
            raise self.error(self.words[self.pos - 1], "this comparison never holds")
        return ir.Range(*bounds)

    def _ttl(self, word: Word, op: str) -> ir.TtlMatch:
        value = self._int(word)
        if op in ("implicit", "=="):
            return ir.TtlMatch("eq", value)
        if op == "!=":
            return ir.TtlMatch("eq", value, True)
        if op in ("<", ">"):
            return ir.TtlMatch("lt" if op == "<" else "gt", value)
        return ir.TtlMatch("gt" if op == "<=" else "lt", value, True)

    def _state_compare(self, words: list[Word], op: str) -> tuple[ir.Match, ...]:
        """A packet's connection state is one bit of a mask. Bare `a,b` asks whether any
        of them is set and `! a,b` whether none is: one state in or out of the list.
        `==` and `!=` compare the whole mask, which one bit equals only for a list of
        one: `== a,b` never holds and `!= a,b` always does (as nft 1.0 compiles them)."""
        match = self._states(words, op == "!")
        if op in ("implicit", "!") or len(match.states) == 1:
            return (replace(match, negate=op in ("!", "!="))),
        if op == "==":
            return (ir.ConntrackMatch(ir.ConntrackMatch.TRACKING_STATES, negate=True),)
        return ()

    def _random(self, where: Word, bound: Word, op: str,
                mask: Optional[int]) -> ir.StatisticMatch:
        """`meta random & 2147483647 < N`: -m statistic --mode random as nft says it (31
        random bits below N of 2^31), the only form compiled."""
        value = self._int(bound)
        if mask != 0x7FFFFFFF or op not in ("<", ">=") or not 0 <= value <= 0x80000000:
            raise self.error(where, "meta random is compiled only as -m statistic's "
                             "'meta random & 2147483647 < N'",
                             "meta random & 2147483647 < N, numgen random mod N")
        return ir.StatisticMatch("random", value, negate=op == ">=")

    def _status(self, words: list[Word], op: str) -> ir.ConntrackMatch:
        """`ct status snat|dnat[,...]`: whether NAT translated the connection's source or
        destination (IPS_SRC_NAT, IPS_DST_NAT: --ctstate SNAT/DNAT). A packet without a
        connection fails any `ct status` test, so a negation is no --ctstate `!`: not
        compiled, as the other status bits."""
        for word in words:
            if word.value not in names.CT_STATUS_NAT:
                raise self.error(word, f"ct status {word.value} is not supported yet",
                                 "ct status snat, dnat (or both: snat,dnat)")
        if op not in ("implicit", "=="):
            raise self.error(words[0], "a negated ct status is not supported yet",
                             "ct status snat, dnat")
        if op == "==" and len(words) > 1:  # the whole mask equal to two bits: never here
            raise self.error(words[0], "'== snat,dnat' compares the whole status mask: "
                             "not supported", "ct status snat,dnat (either)")
        states = {names.CT_STATUS_NAT[w.value] for w in words}
        return ir.ConntrackMatch(tuple(s for s in ir.ConntrackMatch.STATES if s in states))

    def _states(self, words: list[Word], negate: bool) -> ir.ConntrackMatch:
        states = set()
        for word in words:
            if word.value not in names.CT_STATES:
                raise self.error(word, "unknown connection state", ", ".join(names.CT_STATES))
            states.add(names.CT_STATES[word.value])
        return ir.ConntrackMatch(tuple(s for s in ir.ConntrackMatch.STATES if s in states),
                                 negate)

    def _flag_bits(self, words: list[Word]) -> int:
        bits = 0
        for word in words:
            if word.value in names.TCP_FLAGS:
                bits |= names.TCP_FLAGS[word.value]
            else:
                bits |= self._int(word, "a TCP flag", names.TCP_FLAGS)
        return bits

    def _flags_or_int(self, kind: str, words: list[Word]) -> int:
        if kind == "tcp flags":
            return self._flag_bits(words)
        if len(words) != 1:
            raise self.error(words[1], "one mask value expected")
        return self._int(words[0])

    def _tcp_flags(self, words: list[Word], op: str, mask: Optional[int]) -> ir.TcpFlagsSpec:
        """nft's forms: `F / M` is (flags & M) == F; `& M == F` the same; `== F` and
        `!= F` compare all eight bits; a bare `F` asks whether any of F is set, `! F`
        whether none is (as nft 1.0 compiles them)."""
        if any(w.value == "/" for w in words):
            cut = next(i for i, w in enumerate(words) if w.value == "/")
            comp, mask = self._flag_bits(words[:cut]), self._flag_bits(words[cut + 1:])
            return ir.TcpFlagsSpec(mask, comp, op == "!=")
        value = self._flag_bits(words)
        if mask is not None:
            return ir.TcpFlagsSpec(mask, value, op == "!=")
        if op in ("==", "!="):
            return ir.TcpFlagsSpec(0xFF, value, op == "!=")
        if op == "implicit":  # any of them set: not (none of them set)
            return ir.TcpFlagsSpec(value, 0, True)
        return ir.TcpFlagsSpec(value, 0)  # ! F: none of them set

    def _int(self, word: Word, what: str = "a number", known=None) -> int:
        try:
            if not word.value.isascii():
                raise ValueError  # int() reads digits of any script; nft does not
            return int(word.value, 0)
        except ValueError:
            raise self.error(word, f"{what} expected",
                             ", ".join(known) if known else None) from None
