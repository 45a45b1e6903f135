"""Reads one nftables rule's words into IR rules.

An nft rule is a row of expressions and statements evaluated left to right: relational
expressions (`tcp dport 22`, `ip saddr { a, b }`) must hold, then statements run (`counter`,
`log`, `meta mark set`, a verdict). The IR's rule is matches and one target, so:
- a set on the right of `==` is a choice: one IR rule per element (elements of an nft set
  never overlap, so at most one of them matches and effects run at most once); `!=` a set
  is every `!=` at once; a verdict map is one rule per element with its verdict;
- `tcp dport`, `udp sport` and `icmp type` imply their protocol, as in nft;
- several statements become a chain of their own (parser.py).
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.frontend.nft import names
from bpfilter.frontend.nft.compare import TUPLE_FIELDS, SUPPORTED, Comparisons
from bpfilter.frontend.nft.words import Item, SetLiteral, Word, error_at

if TYPE_CHECKING:
    from bpfilter.frontend.nft.parser import NftReader


@dataclass
class NamedSet:
    name: str
    is_map: bool
    word: Word
    elements: list[tuple[Item, ...]] = field(default_factory=list)
    auto_merge: bool = False  # overlapping elements merged (else nft refuses them)

    def set_type(self, words: list[Item], reader: "NftReader") -> None:
        """The key type is read from the elements themselves; the type is only checked
        for being one the reader can tell apart."""
        for word in words:
            if isinstance(word, Word) and word.value not in KEY_TYPES and \
                    word.value not in (".", ":", "verdict"):
                raise reader.error(word, "set type not supported",
                                   ", ".join(KEY_TYPES) + " (and concatenations)")

    def add(self, words: list[Item], reader: "NftReader") -> None:
        for word in words:
            if not isinstance(word, SetLiteral):
                raise reader.error(word, "elements expected in braces", "{ a, b }")
            self.elements.extend(word.elements)


KEY_TYPES = ("ipv4_addr", "ipv6_addr", "inet_service", "inet_proto", "ifname", "mark",
             "icmp_type", "icmpv6_type", "ct_state", "ether_addr")

VERDICT_WORDS = ("accept", "drop", "return", "jump", "goto", "reject", "continue", "queue")
_OPS = ("==", "!=", "<", ">", "<=", ">=")
_WORD_OPS = {"eq": "==", "ne": "!=", "lt": "<", "gt": ">", "le": "<=", "ge": ">="}

# The selectors a rule can test: nft's words for them, after an optional `meta`.
SELECTORS = {
    ("ip", "saddr"), ("ip", "daddr"), ("ip", "protocol"), ("ip", "ttl"), ("ip", "length"),
    ("ip", "frag-off"), ("tcp", "sport"), ("tcp", "dport"), ("tcp", "flags"),
    ("udp", "sport"), ("udp", "dport"), ("icmp", "type"), ("icmp", "code"),
    ("meta", "l4proto"), ("meta", "iifname"), ("meta", "oifname"), ("meta", "iif"),
    ("meta", "oif"), ("meta", "mark"), ("meta", "length"), ("meta", "random"),
    ("ct", "state"), ("ct", "status"), ("ct", "mark"),
    ("ct", "direction"), ("ether", "saddr"), ("ether", "type"), ("meta", "protocol"),
    ("meta", "nfproto"),
    ("th", "sport"), ("th", "dport"),
}
# IPv6's names for the fields the IR shares with IPv4 (the hop limit is the TTL; the
# transport protocol is meta l4proto in both, past IPv6's extension headers).
_V6_SELECTORS = {("ip6", "saddr"): "ip saddr", ("ip6", "daddr"): "ip daddr",
                 ("ip6", "hoplimit"): "ip ttl", ("icmpv6", "type"): "icmp type",
                 ("icmpv6", "code"): "icmp code"}
# Meta keys nft reads without `meta` (l4proto, length, protocol need it).
_META_SHORT = ("iifname", "oifname", "iif", "oif", "mark")


@dataclass(frozen=True)
class _Choice:
    """One way a rule's expression can hold: matches, and a verdict when it came from a
    verdict map."""

    matches: tuple[ir.Match, ...]
    target: Optional[ir.Target] = None


class RuleReader(Comparisons):
    def __init__(self, words: list[Item], source: str, sets: dict[str, NamedSet],
                 table: str, family: Optional[ir.Family] = ir.Family.IPV4,
                 frames: bool = False):
        self.words = words
        self.family = family  # the table's; None for an inet table (both)
        self.frames = frames  # a netdev table's rules: frames of every protocol
        # The family of the addresses and ICMP types being read: the table's, or in an
        # inet table the one the expression names (ip, ip6, icmp, icmpv6).
        self.v6 = family is ir.Family.IPV6
        # What the expressions imply in an inet table (`ip saddr` needs an IPv4 packet).
        self.implied: list[ir.Match] = []
        self.pos = 0
        self.source = source
        self.sets = sets
        self.table = table
        self.groups: list[list[_Choice]] = []  # AND of ORs
        self.statements: list[ir.Target] = []
        self.counters: Optional[ir.Counters] = None
        self.comment: Optional[str] = None
        self.first_statement: Optional[Word] = None
        self.verdict_map = False
        # A set of concatenations (`ip saddr . tcp dport { ... }`) may hold elements that
        # overlap: a packet can match several of its rules.
        self.may_overlap = False
        self.tcp_reset: Optional[Word] = None  # `reject with tcp reset`, where it is
        self.nat_port: Optional[Word] = None  # `dnat to ...:PORT`, where the port is

    # ----------------------------------------------------------------- words

    def error(self, word: Item, why: str, supported: Optional[str] = None) -> InputError:
        return error_at(self.source, word, why, supported)

    def peek(self, ahead: int = 0) -> Optional[Item]:
        at = self.pos + ahead
        return self.words[at] if at < len(self.words) else None

    def peek_value(self, ahead: int = 0) -> Optional[str]:
        word = self.peek(ahead)
        return word.value if isinstance(word, Word) else None

    def next(self, what: str) -> Item:
        word = self.peek()
        if word is None:
            raise self.error(self.words[-1], f"{what} expected after this")
        self.pos += 1
        return word

    def next_word(self, what: str) -> Word:
        word = self.next(what)
        if not isinstance(word, Word):
            raise self.error(word, f"{what} expected, not a set")
        return word

    def comma_list(self, what: str) -> list[Word]:
        """`a,b,c` or `a | b | c` (the grammar gives commas and bars as words)."""
        words = [self.next_word(what)]
        while self.peek_value() in (",", "|"):
            self.pos += 1
            words.append(self.next_word(what))
        return words

    # ----------------------------------------------------------------- the rule

    def read(self, origin: ir.Origin) -> tuple[list[ir.Rule], Optional[list[ir.Rule]]]:
        """The IR rules for this nft rule, and with several statements, those statements
        as the rules of the chain they go to (the rules then have no target yet)."""
        while self.peek() is not None:
            self._item()
        matches_tail = (ir.CommentMatch(self.comment),) if self.comment is not None else ()
        single = self.statements[0] if len(self.statements) == 1 else None
        rules = []
        for combination in itertools.product(*self.groups):
            matches = _with_family(tuple(self.implied), _merge(
                tuple(m for choice in combination for m in choice.matches)))
            if self.tcp_reset is not None:
                matches = self._tcp_dependency(matches)
            if self.nat_port is not None and not any(
                    isinstance(m, ir.ProtocolMatch) and not m.negate and m.protocol in (6, 17)
                    for m in matches):
                raise self.error(self.nat_port, "transport protocol mapping is only valid "
                                 "after transport protocol match",
                                 "tcp or udp expressions before the port of dnat, snat, "
                                 "masquerade, redirect")
            target = next((c.target for c in combination if c.target is not None), single)
            if not rules:  # numgen draws anew where the walk meets this nft rule first
                matches = tuple(replace(m, fresh=True) if isinstance(m, ir.NumgenMatch)
                                else m for m in matches)
            rules.append(ir.Rule(matches + matches_tail, target, origin, self.counters))
        if len(rules) == 1:  # nothing to share a number with
            rules[0] = replace(rules[0], matches=tuple(
                replace(m, draw=None, fresh=False) if isinstance(m, ir.NumgenMatch) else m
                for m in rules[0].matches))
        if len(self.statements) <= 1:
            return rules, None
        return rules, [ir.Rule((), s, origin) for s in self.statements]

    def _tcp_dependency(self, matches: tuple[ir.Match, ...]) -> tuple[ir.Match, ...]:
        """`reject with tcp reset` holds for TCP only: nft adds the protocol test where the
        rule has none, and refuses the rule where it names another protocol."""
        protocols = [m for m in matches if isinstance(m, ir.ProtocolMatch)]
        if any(not m.negate and m.protocol != 6 or m.negate and m.protocol == 6
               for m in protocols):
            raise self.error(self.tcp_reset, "you cannot use tcp reset with this protocol",
                             "tcp reset after a tcp expression, or icmp replies")
        if any(not m.negate for m in protocols):
            return matches
        return matches + (ir.ProtocolMatch(6),)

    def _item(self) -> None:
        word = self.next("an expression or statement")
        if isinstance(word, SetLiteral):
            raise self.error(word, "a set needs an expression on its left",
                             "ip saddr { ... }, tcp dport { ... }")
        value = word.value
        ends = (ir.VerdictTarget, ir.RejectTarget, ir.ReturnTarget, ir.JumpTarget)
        if value != "comment" and any(isinstance(s, ends) for s in self.statements):
            raise self.error(word, "nothing can follow a verdict")
        if value == "counter":
            self._counter()
        elif value == "comment":
            text = self.next_word("a comment string")
            if self.comment is not None:
                raise self.error(word, "a rule has one comment")
            if not text.quoted and text.value in names.KEYWORDS:
                raise self.error(text, f"syntax error, unexpected {text.value} (a word of "
                                 "nft's own)", f'comment "{text.value}"')
            self.comment = text.value
        elif value == "limit":
            self._expression_slot(word)
            self.groups.append([_Choice((self._limit(),))])
        elif value in VERDICT_WORDS:
            self._statement(word, self._verdict(word))
        elif value == "log":
            self._statement(word, self._log())
        elif value == "notrack":
            self._statement(word, ir.NotrackTarget())
        elif value in ("dnat", "snat", "masquerade", "redirect"):
            self._statement(word, self._nat(word))
        elif self._is_mark_set(word):
            self._statement(word, self._mark_set(word))
        elif value == "vmap":
            raise self.error(word, "a verdict map needs an expression on its left")
        elif value == "fib":
            self._expression_slot(word)
            self.groups.append([_Choice((self._fib(word),))])
        elif value == "numgen":
            self._expression_slot(word)
            self.groups.append(self._numgen(word))
        else:
            self._expression_slot(word)
            self.pos -= 1
            self.groups.append(self._relation())

    def _statement(self, word: Word, target: ir.Target) -> None:
        if self.verdict_map:
            raise self.error(word, "a verdict map ends the rule")
        if self.first_statement is None:
            self.first_statement = word
        self.statements.append(target)

    def _expression_slot(self, word: Word) -> None:
        if self.statements or self.verdict_map:
            raise self.error(word, "a match after a statement is not supported",
                             "matches first, then statements")

    # ----------------------------------------------------------------- statements

    def _counter(self) -> None:
        if self.peek_value() == "packets":
            self.pos += 1
            packets = self._int(self.next_word("a packet count"))
            if self.next_word("bytes").value != "bytes":
                raise self.error(self.words[self.pos - 1], "expected 'bytes'")
            self.counters = ir.Counters(packets, self._int(self.next_word("a byte count")))
        else:
            self.counters = self.counters or ir.Counters()

    def _nat(self, word: Word) -> ir.Target:
        """`dnat|snat [ip] to [ADDRESS][:PORT] [FLAGS]`, `masquerade [to :PORT] [FLAGS]`
        and `redirect [to [:]PORT] [FLAGS]`: an address or an address range (FIRST-LAST),
        a port or a port range."""
        kind = word.value
        ports_only = kind in ("masquerade", "redirect")
        if self.family is not ir.Family.IPV4:
            raise self.error(word, f"IPv6 NAT (and {kind} in inet tables) is not compiled "
                             "yet", f"{kind} in ip tables")
        form = {"masquerade": "masquerade [to :PORT[-PORT]]",
                "redirect": "redirect [to :PORT[-PORT]]"}.get(
                    kind, f"{kind} to ADDRESS[-ADDRESS][:PORT[-PORT]]")
        address = last = span = None
        if not ports_only or self.peek_value() == "to":
            to = self.next_word("'to'")
            if to.value == "ip" and not ports_only:
                to = self.next_word("'to'")
            if to.value != "to":
                raise self.error(to, "expected 'to'", form)
            address, last, span = self._nat_to(kind, form)
        flags = set()
        if self.peek_value() in ("random", "persistent", "fully-random"):
            words = self.comma_list("a flag")
            flags = {w.value for w in words}
            allowed = {"random", "persistent"} | (
                {"fully-random"} if kind not in ("dnat", "redirect") else set())
            if not flags <= allowed:
                raise self.error(words[0], f"{kind} takes the flags " + ", ".join(sorted(
                    allowed)))
        if kind in ("dnat", "redirect"):
            return ir.DnatTarget(address, span, "random" in flags, "persistent" in flags,
                                 redirect=kind == "redirect", last_address=last)
        return ir.SnatTarget(address, span, "random" in flags, "fully-random" in flags,
                             "persistent" in flags, masquerade=kind == "masquerade",
                             last_address=last)

    def _nat_to(self, kind: str, form: str):
        spec = self.next_word("an address")
        text = spec.value
        if self.peek_value() is not None and self.peek_value().startswith(":"):
            text += self.next_word("a port").value
        if kind == "redirect" and ":" not in text:
            text = ":" + text  # `redirect to 8080`: a port without its colon
        address_text, _, port_text = text.partition(":")
        if "/" in text or address_text == "map":
            raise self.error(spec, "prefixes and maps in NAT statements are not compiled "
                             "yet", form)
        if kind in ("masquerade", "redirect") and address_text:
            raise self.error(spec, f"{kind} takes ports only", form)
        address = last = span = None
        if address_text:
            try:
                address, last = (ipaddress.IPv4Address(end)
                                 for end in (address_text.split("-", 1) * 2)[:2])
            except ValueError:
                raise self.error(spec, f"'{address_text}' is not an IPv4 address or "
                                 "range") from None
            if last < address:
                raise self.error(spec, "range has zero or negative size (as nft says)",
                                 "FIRST-LAST with FIRST <= LAST")
            last = None if last == address else last
        if port_text:
            low, _, high = port_text.partition("-")
            ports = [int(t) if t.isdigit() else 0 for t in (low, high or low)]
            if not all(1 <= port <= 65535 for port in ports):
                raise self.error(spec, f"'{port_text}' is not a port", "1-65535")
            if ports[0] > ports[1]:
                raise self.error(spec, "invalid port range (min > max)")
            span = (ports[0], ports[1])
            self.nat_port = spec
        return address, last, span

    def _limit(self) -> ir.LimitMatch:
        rate = self.next_word("rate")
        if rate.value != "rate":
            raise self.error(rate, "expected 'rate'", "limit rate N/second")
        over = self.peek_value() == "over"
        if over:
            self.pos += 1
        spec = self.next_word("a rate")
        text = spec.value
        if "/" not in text and self.peek_value() is not None and \
                self.peek_value().startswith("/"):
            text += self.next_word("a unit").value
        count, _, unit = text.partition("/")
        if unit not in names.LIMIT_UNITS or not count.isdigit() or int(count) == 0:
            raise self.error(spec, "rate expected as N/unit (packets)",
                             "N/second, N/minute, N/hour, N/day")
        burst = 5
        if self.peek_value() == "burst":
            self.pos += 1
            burst = self._int(self.next_word("a burst size"))
            packets = self.next_word("packets")
            if packets.value != "packets":
                raise self.error(packets, "byte bursts are not supported", "burst N packets")
        return ir.LimitMatch(int(count), names.LIMIT_UNITS[unit], burst,
                             bucket=f"{self.source}:{rate.line}:{rate.column}", over=over)

    def _verdict(self, word: Word) -> ir.Target:
        value = word.value
        if value in ("accept", "drop"):
            return ir.VerdictTarget(ir.Verdict(value.upper()))
        if value == "return":
            return ir.ReturnTarget()
        if value in ("jump", "goto"):
            return ir.JumpTarget(self.next_word("a chain name").value, value == "goto")
        if value == "reject":
            return self._reject()
        raise self.error(word, f"verdict '{value}' is not supported",
                         "accept, drop, reject, return, jump, goto")

    def _reject(self) -> ir.RejectTarget:
        if self.peek_value() != "with":
            if self.family is None:  # nft's default in an inet table
                return ir.RejectTarget(ir.RejectWith.ICMPX_PORT_UNREACHABLE)
            return ir.RejectTarget(ir.RejectWith.ICMP6_PORT_UNREACHABLE if self.v6
                                   else ir.RejectWith.PORT_UNREACHABLE)
        self.pos += 1
        kind = self.next_word("icmp or tcp")
        if kind.value == "tcp":
            reset = self.next_word("reset")
            if reset.value != "reset":
                raise self.error(reset, "expected 'reset'")
            self.tcp_reset = kind
            return ir.RejectTarget(ir.RejectWith.TCP_RESET)
        if self.family is None and kind.value in ("icmp", "icmpv6"):
            self._family_of(kind)
        if kind.value == "icmpx" and self.family is not None:
            raise self.error(kind, "abstracted ICMP unreachable not supported in a table of "
                             "one family", "icmp (icmpv6) types here; icmpx in inet tables")
        icmp = "icmpv6" if self.v6 else "icmp"
        if kind.value not in (icmp, "icmpx"):
            raise self.error(kind, "reject type not supported", f"{icmp}, icmpx, tcp reset")
        if self.peek_value() == "type":
            self.pos += 1
        code = self.next_word("an ICMP code")
        known = names.REJECTX_CODES if kind.value == "icmpx" else \
            names.REJECT6_CODES if self.v6 else names.REJECT_CODES
        if code.value not in known:
            raise self.error(code, "unknown ICMP code", ", ".join(known))
        return ir.RejectTarget(known[code.value])

    def _log(self) -> ir.LogTarget:
        prefix, level = "", 4
        while self.peek_value() in ("prefix", "level", "flags", "group"):
            key = self.next_word("a log option")
            if key.value == "prefix":
                prefix = self.next_word("a prefix string").value
            elif key.value == "level":
                word = self.next_word("a log level")
                if word.value not in names.LOG_LEVELS:
                    raise self.error(word, "unknown log level", ", ".join(names.LOG_LEVELS))
                level = names.LOG_LEVELS[word.value]
            elif key.value == "flags":
                self.comma_list("log flags")
            else:
                raise self.error(key, "log groups (nflog) are not supported",
                                 "log [prefix S] [level L]")
        return ir.LogTarget(prefix, level)

    def _is_mark_set(self, word: Word) -> bool:
        if word.value in ("meta", "ct"):
            return self.peek_value() == "mark" and self.peek_value(1) == "set"
        return word.value == "mark" and self.peek_value() == "set"

    def _mark_set(self, word: Word) -> ir.Target:
        """`meta mark set V`, `meta mark set meta mark | V` (and & ^), `meta mark set ct
        mark`, `ct mark set V`, `ct mark set meta mark`."""
        connection = word.value == "ct"
        if word.value in ("meta", "ct"):
            self.pos += 1  # mark
        self.pos += 1  # set
        source = self.next_word("a mark value")
        if source.value in ("meta", "ct", "mark"):
            other_ct = source.value == "ct"
            if source.value != "mark":
                self.next_word("mark")
            if other_ct == connection:
                return self._mark_arith(source, connection)
            if connection:
                return ir.ConnmarkTarget(ir.ConnmarkMode.SAVE)
            return ir.ConnmarkTarget(ir.ConnmarkMode.RESTORE)
        value = self._int(source)
        if connection:
            return ir.ConnmarkTarget(ir.ConnmarkMode.SET, value)
        return ir.MarkTarget(value)

    def _mark_arith(self, word: Word, connection: bool) -> ir.Target:
        """`mark & A | B ^ C ...` as the (value, mask) of mark = (mark & ~mask) ^ value,
        applying each operation in turn to the identity (0, 0)."""
        mark, mask = 0, 0
        while True:
            op = self.next_word("| & ^ or 'or', 'and', 'xor'")
            value = self._int(self.next_word("a mark value"))
            op_value = {"or": "|", "and": "&", "xor": "^"}.get(op.value, op.value)
            if op_value == "|":
                mark, mask = mark | value, mask | value
            elif op_value == "&":
                mark, mask = mark & value, (mask | ~value) & 0xFFFFFFFF
            elif op_value == "^":
                mark ^= value
            else:
                raise self.error(op, "unsupported mark arithmetic", "|, &, ^")
            if self.peek_value() not in ("|", "&", "^", "or", "and", "xor"):
                break
        if connection:
            return ir.ConnmarkTarget(ir.ConnmarkMode.SET, mark, mask)
        return ir.MarkTarget(mark, mask)

    # ----------------------------------------------------------------- expressions

    def _fib(self, word: Word) -> ir.AddrTypeMatch:
        """`fib saddr|daddr [. iif|oif] type [!=] TYPE|{ TYPE, ... }`: iptables' addrtype
        (nft_fib4 asks inet_dev_addr_type() as xt_addrtype does)."""
        field = self.next_word("saddr or daddr")
        if field.value not in ("saddr", "daddr"):
            raise self.error(field, "fib looks up saddr or daddr", "fib daddr type local")
        limit = None
        if self.peek_value() == ".":
            self.pos += 1
            device = self.next_word("iif or oif")
            if device.value not in ("iif", "oif"):
                raise self.error(device, "not supported after fib's address",
                                 "fib daddr . iif type local, fib daddr . oif type local")
            limit = "in" if device.value == "iif" else "out"
        result = self.next_word("type")
        if result.value != "type":
            raise self.error(result, f"fib's '{result.value}' result is not compiled yet "
                             "(only the address type is)", "fib daddr type local")
        if self.family is not ir.Family.IPV4:
            raise self.error(word, "fib's address type is compiled in ip tables only for "
                             "now (the kernel looks IPv6 routes up in every table)",
                             "fib ... type in a table of family ip")
        negate = False
        if self.peek_value() in ("==", "!=", "eq", "ne"):
            negate = self.next_word("an operator").value in ("!=", "ne")
        rhs = self.next("an address type")
        listed = [element[0] for element in rhs.elements] if isinstance(rhs, SetLiteral) \
            else [rhs]
        found = set()
        for item in listed:
            if not isinstance(item, Word) or item.value not in names.FIB_TYPES:
                raise self.error(item, "not an address type", ", ".join(names.FIB_TYPES))
            found.add(item.value.upper())
        types = tuple(t for t in ir.AddrTypeMatch.TYPES if t in found)
        if field.value == "saddr":
            return ir.AddrTypeMatch(src=types, src_negate=negate, limit=limit)
        return ir.AddrTypeMatch(dst=types, dst_negate=negate, limit=limit)

    def _numgen(self, word: Word) -> list[_Choice]:
        """`numgen random|inc mod N [offset K]` compared with a number or range, in a set,
        or looked up in a verdict map: one number per packet for the whole nft rule, which
        the IR's rules made of it share (NumgenMatch.draw)."""
        form = "numgen random|inc mod N [offset K]"
        mode = self.next_word("random or inc")
        if mode.value not in ("random", "inc"):
            raise self.error(mode, "numgen makes random or inc numbers", form)
        if self.next_word("'mod'").value != "mod":
            raise self.error(self.words[self.pos - 1], "expected 'mod'", form)
        modulus = self._int(self.next_word("a modulus"))
        offset = 0
        if self.peek_value() == "offset":
            self.pos += 1
            offset = self._int(self.next_word("an offset"))
        if not 0 < modulus <= 0xFFFFFFFF or not 0 <= offset <= 0xFFFFFFFF - (modulus - 1):
            raise self.error(word, "numgen's modulus must be 1 to 2^32 - 1 and offset + "
                             "modulus - 1 must not overflow (the kernel refuses it)", form)
        base = ir.NumgenMatch(mode.value, modulus, offset,
                              draw=f"{self.source}:{word.line}:{word.column}")
        op = "implicit"
        if self.peek_value() in _OPS or self.peek_value() in _WORD_OPS:
            op = _WORD_OPS.get(self.peek_value(), self.peek_value())
            self.pos += 1
        rhs = self.next("a value")
        if isinstance(rhs, Word) and rhs.value == "vmap":
            if op != "implicit":
                raise self.error(rhs, "vmap takes no operator")
            return self._numgen_vmap(base)
        elements = self._elements(rhs)
        if elements is not None:
            if op not in ("implicit", "==", "!="):
                raise self.error(rhs, f"'{op}' a set is not supported", "==, !=")
            values = tuple(self._numgen_value(self._element_words(e, 1)[0])
                           for e in elements)
            return [_Choice((replace(base, values=values, negate=op == "!="),))]
        value = self._numgen_value([rhs])
        top = 0xFFFFFFFF
        if op in ("<", ">=", ">", "<=") and value.low != value.high:
            raise self.error(rhs, f"'{op}' a range is not supported")
        ranges = {"<": (0, value.low - 1), ">=": (value.low, top), ">": (value.low + 1, top),
                  "<=": (0, value.low)}
        if op in ranges:
            low, high = ranges[op]
            if low > high:  # `< 0`, `> 2^32 - 1`: no value, never
                return [_Choice((base,))]
            value = ir.Range(low, high)
        return [_Choice((replace(base, values=(value,), negate=op == "!="),))]

    def _numgen_value(self, part: list[Word]) -> ir.Range:
        if len(part) == 3:  # `a - b` in a set
            return ir.Range(self._int(part[0]), self._int(part[2]))
        return self._range(part[0], 0xFFFFFFFF)

    def _numgen_vmap(self, base: ir.NumgenMatch) -> list[_Choice]:
        _elements, verdicts = self._verdict_map()
        self.verdict_map = True
        return [_Choice((replace(base, values=(
            self._numgen_value(self._element_words(key, 1)[0]),)),), target)
            for key, target in verdicts]

    def _selector(self) -> tuple[str, Word]:
        word = self.next_word("an expression")
        first = word.value
        if first == "ct" and self.peek_value() == "protocol":  # the original direction's
            self.pos += 1
            return "ct original protocol", word
        if first == "ct" and self.peek_value() in ("original", "reply"):
            direction = self.next_word("original or reply").value
            key = self.next_word("a field of the connection's tuple")
            if key.value in ("ip", "ip6"):  # ct original ip saddr
                if self.family is None:
                    self._family_of(key)
                key = self.next_word("saddr or daddr")
            elif self.family is None and key.value in ("saddr", "daddr"):
                raise self.error(key, "in an inet table the address needs its family",
                                 f"ct {direction} ip {key.value}, "
                                 f"ct {direction} ip6 {key.value}")
            if key.value not in TUPLE_FIELDS:
                raise self.error(key, "not supported", ", ".join(TUPLE_FIELDS))
            return f"ct {direction} {key.value}", word
        if first in _META_SHORT or first == "mark":
            return f"meta {first}", word
        second = self.next_word(f"a field of '{first}'").value if first in (
            "ip", "ip6", "tcp", "udp", "icmp", "icmpv6", "meta", "ct", "ether", "th") else ""
        if first in ("ip", "icmp", "ip6", "icmpv6") and self.family is None:
            self._family_of(word)
        if first in ("ip", "icmp", "ip6", "icmpv6") and \
                (first in ("ip6", "icmpv6")) != self.v6:
            raise self.error(word, f"'{first}' in a table of family "
                             f"{'ip6' if self.v6 else 'ip'}", "ip6, icmpv6" if self.v6
                             else "ip, icmp")
        if self.v6 and (first, second) in _V6_SELECTORS:
            return _V6_SELECTORS[(first, second)], word
        if (first, second) not in SELECTORS or (self.v6 and first == "ip"):
            raise self.error(word, f"'{first}{' ' + second if second else ''}' is not "
                             "supported", SUPPORTED)
        return f"{first} {second}", word

    def _family_of(self, word: Word) -> None:
        """In an inet table: `ip`, `icmp` (or `ip6`, `icmpv6`) reads that family's
        packets, and the rule holds only for them (nft adds `meta nfproto` before)."""
        self.v6 = word.value in ("ip6", "icmpv6")
        implied = ir.FamilyMatch(ir.Family.IPV6 if self.v6 else ir.Family.IPV4)
        if implied not in self.implied:
            self.implied.append(implied)

    def _relation(self) -> list[_Choice]:
        selectors = [self._selector()]
        while self.peek_value() == ".":
            self.pos += 1
            selectors.append(self._selector())
        mask = None
        if self.peek_value() in ("&", "and"):
            self.pos += 1
            mask = self._flags_or_int(selectors[0][0], self._operand())
        op = "implicit"
        if self.peek_value() in _OPS or self.peek_value() in _WORD_OPS or \
                self.peek_value() == "!":
            op = self.next_word("an operator").value
            op = _WORD_OPS.get(op, op)
        rhs = self.next("a value")
        if isinstance(rhs, Word) and rhs.value == "vmap":
            return self._vmap(selectors, op, mask)
        elements = self._elements(rhs)
        if elements is None:
            return [_Choice(self._compare(selectors[0], op, mask, self._value_words(rhs)))]
        if op not in ("implicit", "==", "!="):
            raise self.error(rhs, f"'{op}' a set is not supported", "==, !=")
        if op == "!=" and len(selectors) > 1:
            raise self.error(rhs, "!= a set of concatenations is not supported")
        self.may_overlap |= len(selectors) > 1
        return self._in_set(selectors, op, mask, elements, rhs)

    def _operand(self) -> list[Word]:
        """A mask: `0xff`, `fin,syn`, or `(fin|syn)`."""
        if self.peek_value() != "(":
            return self.comma_list("a mask")
        self.pos += 1
        words = [self.next_word("a flag")]
        while self.peek_value() != ")":
            bar = self.next_word("')'")
            if bar.value != "|":
                raise self.error(bar, "syntax error, expecting ')' or '|'", "(a | b | c)")
            words.append(self.next_word("a flag"))
        self.pos += 1
        return words

    def _value_words(self, first: Word) -> list[Word]:
        words = [first]
        while self.peek_value() in (",", "|"):
            self.pos += 1
            words.append(self.next_word("a value"))
        if self.peek_value() == "/":  # tcp flags syn / syn,ack
            self.pos += 1
            words.append(Word("/", first.line, first.column))
            words.extend(self.comma_list("a mask"))
        return words

    def _elements(self, rhs: Item) -> Optional[list[tuple[Item, ...]]]:
        if isinstance(rhs, SetLiteral):
            if not rhs.elements:
                raise self.error(rhs, "syntax error, unexpected '}' (an empty set)")
            return list(rhs.elements)
        if rhs.value.startswith("@"):
            named = self.sets.get(rhs.value[1:])
            if named is None:
                raise self.error(rhs, f"no set '{rhs.value[1:]}' in table '{self.table}'")
            return named.elements
        if rhs.value.startswith("$"):
            raise self.error(rhs, "variables are not supported (nft -f expands them; "
                             "give `nft list ruleset` output)")
        return None

    def _in_set(self, selectors, op, mask, elements, rhs) -> list[_Choice]:
        kind = selectors[0][0]
        for element in elements:
            colon = next((w for w in element if isinstance(w, Word) and w.value == ":"), None)
            if colon is not None:
                raise self.error(colon, "mapping outside of map context", "vmap { k : v }")
        words = [self._element_words(e, len(selectors)) for e in elements]
        if len(selectors) == 1:
            native = self._set_match(kind, [w[0] for w in words], op == "!=")
            if native is not None:
                return [_Choice(native)]
        if op == "!=":
            return [_Choice(tuple(m for w in words
                                  for m in self._compare(selectors[0], "!=", mask, w[0])))]
        choices = [_Choice(self._element_matches(selectors, mask, w)) for w in words]
        named = self.sets.get(rhs.value[1:]) if isinstance(rhs, Word) else None
        if named is not None and not named.auto_merge:
            _disjoint(choices, [e[0] for e in elements], self)
        return choices

    def _element_matches(self, selectors, mask, parts) -> tuple[ir.Match, ...]:
        """A packet whose fields equal an element's parts."""
        return tuple(m for sel, part in zip(selectors, parts)
                     for m in self._compare(sel, "==", mask, part))

    def _element_words(self, element: tuple[Item, ...], parts: int) -> list[list[Word]]:
        """An element's parts (split at the concatenation's dots), each its words; an
        element's `comment "..."` (nft lists kube-proxy's so) says nothing of it."""
        split: list[list[Word]] = [[]]
        words = list(element)
        for i in range(len(words) - 2, -1, -1):
            if isinstance(words[i], Word) and words[i].value == "comment":
                del words[i:i + 2]
        for word in words:
            if isinstance(word, SetLiteral):
                raise self.error(word, "nested sets are not supported")
            if word.value == "." and len(split) < parts:
                split.append([])
            else:
                split[-1].append(word)
        if len(split) != parts or not all(split):
            raise self.error(element[0], f"element expected with {parts} parts joined by "
                             "' . '")
        for part in split:  # one value, or a range `a - b`
            if len(part) > 1 and not (len(part) == 3 and part[1].value == "-"):
                raise self.error(part[1], "syntax error, expecting comma or '}'",
                                 "{ a, b, c - d }")
        return split

    def _vmap(self, selectors, op, mask) -> list[_Choice]:
        if op != "implicit":
            raise self.error(self.words[self.pos - 1], "vmap takes no operator")
        elements, verdicts = self._verdict_map()
        choices = [_Choice(self._element_matches(selectors, mask,
                                                 self._element_words(key, len(selectors))),
                           target) for key, target in verdicts]
        _disjoint(choices, [e[0] for e in elements], self)
        self.verdict_map = True
        self.may_overlap |= len(selectors) > 1
        return choices

    def _verdict_map(self) -> tuple[list[tuple[Item, ...]], list[tuple[tuple[Item, ...],
                                                                       ir.Target]]]:
        """`{ key : verdict, ... }` or `@map` after vmap: its elements, and each one's key
        words and verdict."""
        table = self.next("a verdict map")
        elements = self._elements(table)
        if elements is None:
            raise self.error(table, "a verdict map expected", "vmap { key : verdict }, "
                             "vmap @map")
        verdicts = []
        for element in elements:
            colon = next((i for i, w in enumerate(element)
                          if isinstance(w, Word) and w.value == ":"), None)
            if colon is None:
                raise self.error(element[0], "map element expected as 'key : verdict'")
            key, verdict = element[:colon], element[colon + 1:]
            if not key or not verdict:
                raise self.error(element[colon], "map element expected as 'key : verdict'")
            sub = RuleReader(list(verdict), self.source, self.sets, self.table,
                             self.family)
            sub.v6 = self.v6
            target = sub._verdict(sub.next_word("a verdict"))
            if sub.peek() is not None:
                raise self.error(sub.peek(), "one verdict per map element")
            verdicts.append((key, target))
        return elements, verdicts

    def _icmp_code(self, where: Word, word: Word, negate: bool) -> tuple[ir.Match, ...]:
        """`icmp type T icmp code C`: the code narrows the type's match just before it
        (the IR's ICMP match is a type and a range of codes)."""
        last = self.groups[-1] if self.groups else []
        icmp = last[0].matches[-1] if len(last) == 1 and last[0].matches else None
        if negate or not isinstance(icmp, ir.IcmpMatch) or icmp.negate or \
                icmp.codes != ir.Range(0, 255):
            raise self.error(where, "icmp code is supported only right after an icmp type",
                             "icmp type T icmp code C")
        code = (names.ICMP6_CODES if self.v6 else names.ICMP_CODES).get(word.value)
        codes = ir.Range(code, code) if code is not None else self._range(word, 255)
        last[0] = _Choice(last[0].matches[:-1] + (replace(icmp, codes=codes),))
        return ()


def _with_family(implied: tuple[ir.Match, ...],
                 matches: tuple[ir.Match, ...]) -> tuple[ir.Match, ...]:
    """The family tests an inet rule's expressions imply, first; after a leading address
    (an IPv4 prefix tested on an IPv6 packet's first 32 bits is then refused by the
    family test), so that runs of addresses still fold into one lookup (passes/fold.py)."""
    implied = tuple(m for m in implied if m not in matches)
    if matches and isinstance(matches[0], ir.AddressMatch):
        return matches[:1] + implied + matches[1:]
    return implied + matches


def _merge(matches: tuple[ir.Match, ...]) -> tuple[ir.Match, ...]:
    """The protocol an expression implies once (nft tests it once per rule as well), and
    one TCP or UDP match of the fields given (`tcp dport 22 tcp flags syn`)."""
    merged: list[ir.Match] = []
    for match in matches:
        if match in merged and isinstance(match, (ir.ProtocolMatch, ir.FamilyMatch)):
            continue
        same = next((i for i, m in enumerate(merged) if type(m) is type(match)
                     and isinstance(m, (ir.TcpMatch, ir.UdpMatch))), None)
        if same is not None:
            fields = {k: v for k, v in vars(match).items()
                      if v is not None and k != "partial_header"}
            if not any(getattr(merged[same], k) is not None for k in fields):
                merged[same] = replace(merged[same], **fields)
                continue
        merged.append(match)
    return tuple(merged)


def _interval(matches: tuple[ir.Match, ...]) -> Optional[tuple[str, int, int]]:
    """The values an element's last match takes, as (field, low, high), for the kinds of
    key that form intervals; None for others."""
    if not matches:
        return None
    last = matches[-1]
    if isinstance(last, ir.AddressMatch) and not last.negate:
        net = last.network
        return (f"addr{net.version}", int(net.network_address), int(net.broadcast_address))
    if isinstance(last, (ir.TcpMatch, ir.UdpMatch)):
        spec = last.dport or last.sport
        if spec is not None and not spec.negate and (last.dport is None or last.sport is None):
            return ("dport" if last.dport else "sport", spec.ports.low, spec.ports.high)
    if isinstance(last, ir.MultiportMatch) and len(last.ports) == 1 and not last.negate:
        return (last.direction, last.ports[0].low, last.ports[0].high)
    return None


def _disjoint(choices: list, where: list, reader: RuleReader) -> None:
    """Elements of a map, or of a named set nft does not merge, may not overlap: nft
    refuses them ('conflicting intervals specified'); the first one would win here. Of a
    concatenation, only the last field forms intervals: elements whose other fields
    differ never overlap (kube-proxy's `ip daddr . meta l4proto . th dport` map)."""
    spans = sorted(((repr(c.matches[:-1]), *span), i) for i, c in enumerate(choices)
                   if (span := _interval(c.matches)) is not None)
    for (a, _i), (b, j) in zip(spans, spans[1:]):
        if a[:2] == b[:2] and b[2] <= a[3]:
            raise reader.error(where[j], "conflicting intervals specified (it overlaps "
                               "another element)", "elements that do not overlap")
