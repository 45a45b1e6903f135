"""Turns large chains into data: rules become entries of a classifier that a fixed program
walks, so that the program does not grow with the ruleset.

The classifier is the linear bit-vector search of bpf-iptables. Every classified rule is
one bit. For each packet field the classifier keys on (protocol, source, destination, the
two port / ICMP type-code words) a lookup maps the packet's value to the bitset of rules
whose match on that field holds; the AND of those bitsets is the set of candidate rules,
and the lowest candidate bit is the rule iptables would try next. What a field lookup
cannot express stays with the entry as a check the program evaluates on the candidate
(input interface, TCP flags, length, TTL, connection state, the limit bucket), in the
kernel's order.

A chain becomes data when every one of its rules can be an entry; a rule whose jump or
goto leads to a chain that is not data stays code. Inside a chain that stays code, runs of
classifiable rules become segments when long enough. Jumps between data chains never
leave the classifier (it keeps its own return stack), so no C function exists per chain.

Exactness on malformed packets: the kernel drops a packet whose header is too short for a
protocol match as soon as a rule with that match is tried (hotdrop). Each entry records
the L4 bytes its protocol match reads; a packet shorter than that makes the entry a
candidate whatever its ports say, and the entry drops it when tried. Field constraints
are therefore only those the kernel evaluates before the header read.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional, Union

from bpfilter import ir
from bpfilter.passes.calls import CLASSIFIER_LEVEL_MAX, chain_levels
from bpfilter.passes.fold import Item, PrefixRun, RuleItem
from bpfilter.passes.services import ServiceRun

# Below this many items (rules, folded runs) everything stays straight-line C, which is
# faster for few; a chain that stays code needs this many classifiable items in a row for
# a segment.
CLASSIFY_MIN = 64
SEGMENT_MIN = 16
# Data chains nested deeper than this (jumps inside the classifier) stay code. The walk's
# return stack lives on the BPF stack, whose 512 bytes the chains above it share.
MAX_DEPTH = 4

# The protocols whose header layout a match of each module reads, and how many bytes.
_L4_NEEDS = {ir.TcpMatch: 20, ir.UdpMatch: 8, ir.IcmpMatch: 8, ir.MultiportMatch: 4}
_L4_PROTOCOLS = {ir.TcpMatch: {6}, ir.UdpMatch: {17}, ir.IcmpMatch: {1},
                 ir.MultiportMatch: {6, 17, 33, 132, 136}}

# What an entry's action can be (codegen/classifier.py); no target is a rule that counts.
_ENTRY_TARGETS = (ir.VerdictTarget, ir.RejectTarget, ir.ReturnTarget, ir.JumpTarget,
                  ir.LogTarget, type(None))

DIMENSIONS = ("proto", "saddr", "daddr", "sport", "dport")


@dataclass(frozen=True)
class Constraint:
    """One match on one field: the value lies in `spans` (inclusive ranges), or not."""

    dim: str
    spans: tuple[tuple[int, int], ...]
    negate: bool = False


@dataclass(frozen=True)
class Entry:
    """One classified rule (or folded run) and what the program checks on it."""

    item: Union[RuleItem, PrefixRun]
    constraints: tuple[Constraint, ...]
    # InterfaceMatch, TcpFlagsSpec, LengthMatch, TtlMatch, ConntrackMatch, LimitMatch
    checks: tuple[ir.Match, ...]
    need: int  # L4 header bytes the rule's protocol match reads
    target: Optional[ir.Target]
    jump: Optional[str] = None  # the data chain a jump or goto enters


@dataclass(frozen=True)
class Segment:
    """Consecutive entries of one chain, walked by the classifier as one item."""

    number: int
    chain: tuple[str, str]  # (table, chain)
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Classification:
    """Every segment of a table; entries are numbered across segments in this order."""

    segments: tuple[Segment, ...] = ()
    # (table, chain) of the chains that are one whole segment -> that segment's number
    data_chains: tuple[tuple[tuple[str, str], int], ...] = ()

    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(e for s in self.segments for e in s.entries)

    def segment_of(self, table: str, chain: str) -> int:
        return dict(self.data_chains)[(table, chain)]


ChainItem = Union[RuleItem, PrefixRun, Segment, ServiceRun]
Folds = dict[tuple[str, str], tuple[Item, ...]]


def _spans_of_network(net: ir.IPNetwork) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def _range_prefixes(spec: ir.AddressRangeSpec) -> tuple[tuple[int, int], ...]:
    return tuple(_spans_of_network(n)
                 for n in ipaddress.summarize_address_range(spec.low, spec.high))


def _port_constraint(dim: str, spec: Optional[ir.PortSpec]) -> list[Constraint]:
    if spec is None:
        return []
    return [Constraint(dim, ((spec.ports.low, spec.ports.high),), spec.negate)]


def _entry(item: Union[RuleItem, PrefixRun], data: set[str]) -> Optional[Entry]:
    """The entry for a rule or a folded run, or None when it has to stay code (and any
    other item: a service run is a lookup of its own)."""
    if not isinstance(item, (RuleItem, PrefixRun)):
        return None
    if isinstance(item, PrefixRun):
        dim = "saddr" if item.direction == "src" else "daddr"
        constraints = [Constraint(dim, tuple(_spans_of_network(n) for n, _ in item.prefixes))]
        matches, target = item.rest, item.target
    else:
        constraints, matches, target = [], item.rule.matches, item.rule.target
    checks: list[ir.Match] = []
    need, l4_module, protocols = 0, None, set()
    seen_module = False
    for position, match in enumerate(matches):
        kind = type(match)
        if kind is ir.CommentMatch:
            continue
        if kind is ir.AddressMatch:
            dim = "saddr" if match.direction == "src" else "daddr"
            constraints.append(Constraint(dim, (_spans_of_network(match.network),),
                                          match.negate))
        elif kind is ir.ProtocolMatch:
            constraints.append(Constraint("proto", ((match.protocol, match.protocol),),
                                          match.negate))
            if not match.negate:
                protocols.add(match.protocol)
        elif kind is ir.InterfaceMatch:
            # `-o` is known only after the routing decision, and a bare `+` also matches
            # where there is no input interface (OUTPUT): both stay code.
            if match.direction != "in" or ir.InterfaceMatch("in", match.name).matches("") \
                    or any(isinstance(c, ir.InterfaceMatch) for c in checks):
                return None
            checks.append(match)
        elif kind in _L4_NEEDS:
            if match.partial_header:
                return None  # nftables' field-by-field reads: code
            if l4_module is not None or seen_module:
                return None  # the kernel's order between two header reads matters
            l4_module, need = kind, _L4_NEEDS[kind]
            l4 = _l4_constraints(match)
            if l4 is None:
                return None
            constraints += l4
            if kind is ir.TcpMatch and match.flags is not None:
                checks.append(match.flags)
        elif kind is ir.IpRangeMatch:
            if l4_module is not None:
                # A range read after the header is no field constraint: a short packet
                # is dropped by the header match whatever its address.
                return None
            for dim, spec in (("saddr", match.src), ("daddr", match.dst)):
                if spec is not None:
                    constraints.append(Constraint(dim, _range_prefixes(spec), spec.negate))
        elif kind in (ir.LengthMatch, ir.TtlMatch) or (kind is ir.ConntrackMatch
                                                        and match.only_states):
            if any(type(c) is kind for c in checks):
                return None
            checks.append(match)
            seen_module = True
        elif kind is ir.LimitMatch:
            rest = [m for m in matches[position + 1:] if not isinstance(m, ir.CommentMatch)]
            if rest or match.over:
                return None  # the bucket is spent only when every match before it held
            checks.append(match)
        else:
            return None  # fragments, MAC addresses: rare, they stay code
    if l4_module is not None and not protocols & _L4_PROTOCOLS[l4_module]:
        return None
    if not isinstance(target, _ENTRY_TARGETS):
        return None  # MARK, CONNMARK, NOTRACK change the packet: code
    jump = None
    if isinstance(target, ir.JumpTarget):
        if target.chain not in data:
            return None
        jump = target.chain
    return Entry(item, tuple(constraints), tuple(checks), need, target, jump)


def _l4_constraints(match) -> Optional[list[Constraint]]:
    if isinstance(match, (ir.TcpMatch, ir.UdpMatch)):
        return _port_constraint("sport", match.sport) + _port_constraint("dport", match.dport)
    if isinstance(match, ir.IcmpMatch):
        # The classifier's source-port word of an ICMP packet is type << 8 | code.
        if match.icmp_type == ir.IcmpMatch.ANY:
            return None if match.negate else []
        t = match.icmp_type << 8
        return [Constraint("sport", ((t | match.codes.low, t | match.codes.high),),
                           match.negate)]
    if match.direction == "any":
        return None  # source or destination: not one field
    dim = "sport" if match.direction == "src" else "dport"
    return [Constraint(dim, tuple((r.low, r.high) for r in match.ports), match.negate)]


def _depths(table: ir.Table, data: set[str]) -> dict[str, int]:
    """How deep the data chains below each data chain go (jumps only, gotos replace)."""
    memo: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in memo:
            memo[name] = 0
            below = [depth(r.target.chain) + (0 if r.target.goto else 1)
                     for r in table.chain(name).rules
                     if isinstance(r.target, ir.JumpTarget) and r.target.chain in data]
            memo[name] = max(below, default=0)
        return memo[name]

    return {name: depth(name) for name in data}


def _data_chains(table: ir.Table, folds: Folds, walkable: set[str]) -> set[str]:
    """The largest set of `walkable` chains whose every item is an entry (a fixpoint: a
    chain drops out when one of its rules jumps to a chain that dropped out)."""
    data = {c.name for c in table.chains
            if (c.rules or not c.builtin) and c.name in walkable}  # jump targets may be empty
    while True:
        keep = {name for name in data
                if all(_entry(i, data) is not None for i in folds[(table.key, name)])}
        depths = _depths(table, keep)
        keep = {name for name in keep if depths[name] < MAX_DEPTH}
        if keep == data:
            return data
        data = keep


def classify(ruleset: ir.Ruleset, folds: Folds) -> tuple[Folds, Classification]:
    """Rewrites the chains' items with segments, when the ruleset has enough items (rules
    and folded runs, which are one lookup each already) for the classifier to pay."""
    if sum(len(items) for items in folds.values()) < CLASSIFY_MIN:
        return folds, Classification()
    result = dict(folds)
    segments: list[Segment] = []
    data_chains: list[tuple[tuple[str, str], int]] = []
    for table in ruleset.tables:
        if table.family is not ir.Family.IPV4:
            continue  # the classifier's tries hold IPv4 addresses
        # Chains where a classifier walk still fits on the call stack (unreached ones are
        # not compiled), and not those whose rules are all another pass's data (service
        # runs': no items left).
        levels = chain_levels(table)
        walkable = {c.name for c in table.chains
                    if levels.get(c.name, 0) <= CLASSIFIER_LEVEL_MAX
                    and (folds[(table.key, c.name)] or not c.rules)}
        data = _data_chains(table, folds, walkable)
        # Data chains first, so that their segment numbers are stable and known.
        ordered = sorted(table.chains, key=lambda c: c.name not in data)
        for chain in ordered:
            key = (table.key, chain.name)
            if chain.name in data:
                entries = tuple(_entry(i, data) for i in folds[key])
                data_chains.append((key, len(segments)))
                segments.append(Segment(len(segments), key, entries))
                result[key] = (segments[-1],)
                continue
            items: list[ChainItem] = []
            run: list[tuple[Item, Entry]] = []

            def flush() -> None:
                if len(run) >= SEGMENT_MIN and chain.name in walkable:
                    segments.append(Segment(len(segments), key, tuple(e for _i, e in run)))
                    items.append(segments[-1])
                else:
                    items.extend(i for i, _e in run)
                run.clear()

            for item in folds[key]:
                entry = _entry(item, data)
                if entry is None:
                    flush()
                    items.append(item)
                else:
                    run.append((item, entry))
            flush()
            result[key] = tuple(items)
    return result, Classification(tuple(segments), tuple(data_chains))


def entry_rules(entry: Entry) -> tuple[int, ...]:
    """The chain indexes of the rules an entry stands for."""
    item = entry.item
    return item.indexes if isinstance(item, PrefixRun) else (item.index,)
