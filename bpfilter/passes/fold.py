"""Folds runs of rules that differ only in one address prefix into one map lookup.

iptables walks such a run rule by rule; bpfilter looks the packet's address up once in an
LPM trie whose value is the matching rule's counter slot. That is exact, not an
approximation, when:
- every rule of the run starts with a non-negated `-s` (or every one with `-d`), and is
  otherwise identical (same further matches, same target): the lookup then finds the
  rule that would have matched first, because
- no two prefixes of the run overlap, so at most one rule of the run can match at all;
- no rule carries state of its own (a `limit` bucket), which folding would merge.
Rules keep their own counters (the map's value is the rule's counter slot), so per-rule
counters stay exact. Items name rules by their index in the chain.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Union

from bpfilter import ir

# Shorter runs cost less as straight-line C than as a map lookup.
FOLD_MIN = 8


@dataclass(frozen=True)
class RuleItem:
    rule: ir.Rule
    index: int


@dataclass(frozen=True)
class PrefixRun:
    """Consecutive rules of a chain, as one lookup."""

    direction: str  # "src" | "dst"
    prefixes: tuple[tuple[ir.IPNetwork, int], ...]  # (prefix, rule index), in rule order
    rest: tuple[ir.Match, ...]  # the matches after the address, common to every rule
    target: ir.Target | None
    rules: tuple[ir.Rule, ...]

    @property
    def indexes(self) -> tuple[int, ...]:
        return tuple(index for _net, index in self.prefixes)

    @property
    def version(self) -> int:
        """The IP version of the run's prefixes (one for all)."""
        return self.prefixes[0][0].version

    @property
    def uniform_length(self) -> int | None:
        """The prefix length all prefixes share (then a hash lookup will do), or None
        (and always for IPv6 runs, which use a trie)."""
        lengths = {net.prefixlen for net, _slot in self.prefixes}
        return lengths.pop() if len(lengths) == 1 and self.version == 4 else None


Item = Union[RuleItem, PrefixRun]


def item_target(item) -> ir.Target | None:
    """The target of a rule or folded run; None for the items that are lookups of their
    own (classifier segments, service runs), whose jumps stay inside their data."""
    if isinstance(item, RuleItem):
        return item.rule.target
    return item.target if isinstance(item, PrefixRun) else None


def _key(rule: ir.Rule):
    """What must be equal for two rules to fold: all but the leading prefix."""
    first = rule.matches[0] if rule.matches else None
    if not isinstance(first, ir.AddressMatch) or first.negate:
        return None
    if any(isinstance(m, (ir.LimitMatch, ir.StatisticMatch, ir.NumgenMatch))
           for m in rule.matches):
        return None
    return (first.direction, first.network.version, rule.matches[1:], rule.target)


class _Disjoint:
    """Prefixes of one run, pairwise disjoint; tells whether another would overlap one."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.prefixes: set[tuple[int, int]] = set()
        self.lengths: set[int] = set()

    def overlaps(self, net: ir.IPNetwork) -> bool:
        start, end = int(net.network_address), int(net.broadcast_address)
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] <= end:
            return True  # one of ours starts inside the new prefix
        bits = net.max_prefixlen
        return any((start & ~((1 << (bits - length)) - 1), length) in self.prefixes
                   for length in self.lengths if length < net.prefixlen)  # one contains it

    def add(self, net: ir.IPNetwork) -> None:
        bisect.insort(self.starts, int(net.network_address))
        self.prefixes.add((int(net.network_address), net.prefixlen))
        self.lengths.add(net.prefixlen)


def _split_disjoint(rules: list[tuple[ir.Rule, int]]) -> list[list[tuple[ir.Rule, int]]]:
    """Cut the run before any prefix that overlaps one already in it."""
    runs: list[list[tuple[ir.Rule, int]]] = [[]]
    seen = _Disjoint()
    for rule, slot in rules:
        net = rule.matches[0].network
        if seen.overlaps(net):
            runs.append([])
            seen = _Disjoint()
        runs[-1].append((rule, slot))
        seen.add(net)
    return runs


def fold_rules(rules: tuple[ir.Rule, ...]) -> tuple[Item, ...]:
    items: list[Item] = []
    pending: list[tuple[ir.Rule, int]] = []
    pending_key = None

    def flush() -> None:
        for run in _split_disjoint(pending) if pending else []:
            if len(run) >= FOLD_MIN:
                first = run[0][0]
                items.append(PrefixRun(
                    first.matches[0].direction,
                    tuple((r.matches[0].network, s) for r, s in run),
                    first.matches[1:], first.target, tuple(r for r, _s in run)))
            else:
                items.extend(RuleItem(r, s) for r, s in run)
        pending.clear()

    for slot, rule in enumerate(rules):
        key = _key(rule)
        if key is None or key != pending_key:
            flush()
            pending_key = key
        if key is None:
            items.append(RuleItem(rule, slot))
        else:
            pending.append((rule, slot))
    flush()
    return tuple(items)


def fold_chains(ruleset: ir.Ruleset) -> dict[tuple[str, str], tuple[Item, ...]]:
    """fold_rules for every chain, by (table key, chain). (In a table of both families a
    rule tests the family right after its address: a packet of the other family that the
    lookup finds, by the first 32 bits of an IPv6 address or by an IPv4 one, fails
    there.)"""
    return {(t.key, c.name): fold_rules(c.rules) for t in ruleset.tables for c in t.chains}
