"""Turns kube-proxy's service chains into one lookup: the service map.

kube-proxy (iptables mode) writes, per service, a rule in a dispatch chain
(`-d CLUSTER-IP -p tcp --dport 80 -j KUBE-SVC-x`), a service chain (an optional rule
that marks traffic for MASQUERADE, then a ladder of `-m statistic --probability` jumps,
one per endpoint) and an endpoint chain per endpoint (a hairpin mark, then DNAT). The
kernel walks the dispatch chain rule by rule: the cost of a connection's first packet
grows with the number of services. Here a run of dispatch rules becomes one hash lookup
by (destination, protocol, port), and the service and endpoint chains become rows the
program reads: the ladder is still drawn rule by rule (one draw per statistic rule
tried, as xt_statistic), so the choice keeps the kernel's proportions exactly.

This is exact, not a heuristic, because the shapes are checked whole: the dispatch rules
of a run test only an exact destination, protocol and port, and no two share all three
(so at most one of them can match: their order does not matter); a service chain is
what kube-proxy writes and nothing else; every endpoint ends in a DNAT, which ends the
walk, so a service either translates the packet or (no ladder rule drew) returns. Any
other shape stays code, rule by rule. Rules keep their own counter slots.

kube-proxy's nftables mode has the same three levels in other words: a concatenated
verdict map `ip daddr . meta l4proto . th dport vmap @service-ips` (one dispatch rule per
element, going to the service chain), and `numgen random mod N vmap { 0 : goto
endpoint-a, ... }` in place of the ladder: one draw, as nft_ng_random_eval() draws it,
picks endpoint N. A dispatch rule that goes (goto) rather than jumps stands for its chain
only when that chain always ends in a DNAT (a numgen map with every value, or a ladder
with an unconditional rung): a chain that returned would return from the dispatch chain
too. An external chain (KUBE-EXT-*, nft's external-*: a marking, then on to the service
chain) is read through. nft's port match fails a packet too short for it where xtables'
drops it (a run's `partial`).

Chains that only service runs reach have no code at all (their items become empty), so
that thousands of services do not make thousands of functions.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from bpfilter import ir
from bpfilter.passes.fold import RuleItem, item_target

# The endpoints the program's ladder loop walks at most (templates/services.h); a service
# with more stays code.
MAX_ENDPOINTS = 256
# The L4 protocols whose ports the dispatch rules test (their match reads 20 / 8 bytes).
_PORT_MATCHES = {6: ir.TcpMatch, 17: ir.UdpMatch}

RuleKey = tuple[str, int]  # (chain, rule index) within the run's table


@dataclass(frozen=True)
class Marking:
    """A rule that jumps to a chain whose one rule is MARK (kube-proxy's KUBE-MARK-MASQ),
    held when the source lies in `source` (None: always)."""

    rule: RuleKey
    mark_rule: RuleKey
    mark: ir.MarkTarget
    source: Optional[ir.AddressMatch]


@dataclass(frozen=True)
class Endpoint:
    """One rung of a service's ladder: the rule that picks the endpoint chain (with the
    probability of its statistic match, ONE without; a numgen rung's is ONE: the draw
    picks it by position), the chain's hairpin marking and its DNAT (port None: the
    packet's own)."""

    pick: RuleKey
    probability: int
    hairpin: Optional[Marking]
    dnat: RuleKey
    address: ipaddress.IPv4Address
    port: Optional[int]


@dataclass(frozen=True)
class Service:
    """A dispatch rule and the chains it stands for. `via`: the rule of an external chain
    (kube-proxy's KUBE-EXT-*, nft's external-*) that goes on to the service chain after
    its own marking `external`; `modulus`: 0 for a statistic ladder (rung by rung), N
    for one numgen draw of 0..N-1 that picks endpoint N (nft's `numgen random mod N
    vmap`); `rules`: every rule of those chains, each once."""

    index: int  # the dispatch rule, in the run's chain
    address: ipaddress.IPv4Address
    protocol: int
    port: int
    masquerade: Optional[Marking]  # the service chain's first rule, when it marks
    endpoints: tuple[Endpoint, ...]
    rules: tuple[RuleKey, ...]
    modulus: int = 0
    external: Optional[Marking] = None
    via: Optional[RuleKey] = None
    partial: bool = False  # nftables' port match: a packet too short for it fails it


@dataclass(frozen=True)
class ServiceRun:
    """Consecutive dispatch rules of a chain, as one lookup (numbered across the
    ruleset: the run's key in the program's service map), all of one kind of port match
    (`partial`)."""

    number: int
    table: str
    chain: str
    services: tuple[Service, ...]

    @property
    def partial(self) -> bool:
        return self.services[0].partial

    @property
    def indexes(self) -> tuple[int, ...]:
        return tuple(s.index for s in self.services)

    @property
    def members(self) -> tuple[RuleKey, ...]:
        """Every rule the run stands for, once: its dispatch rules, then their chains'."""
        keys = [(self.chain, s.index) for s in self.services]
        keys += [k for s in self.services for k in s.rules]
        return tuple(dict.fromkeys(keys))


class _NotAService(Exception):
    """A chain a dispatch rule reaches is not of the shapes the service map stands for."""


def _plain(rule: ir.Rule) -> list[ir.Match]:
    return [m for m in rule.matches if not isinstance(m, ir.CommentMatch)]


def _port_match(match, protocol: int) -> bool:
    """An unadorned destination port test fit for `protocol`: tcp/udp's, or nft's `th
    dport` (a multiport match of the destination with nftables' partial header)."""
    if isinstance(match, ir.MultiportMatch):
        return match.direction == "dst" and match.partial_header and len(match.ports) == 1
    return type(match) is _PORT_MATCHES.get(protocol) and match.sport is None \
        and match.dport is not None and getattr(match, "flags", None) is None


def _ports(match) -> tuple[ir.Range, bool]:
    if isinstance(match, ir.MultiportMatch):
        return match.ports[0], match.negate
    return match.dport.ports, match.dport.negate


def _dispatch(rule: ir.Rule) -> Optional[tuple]:
    """(address, protocol, port, service chain, goto, partial) of `-d A/32 -p P -m P
    --dport N -j S` (nft: `ip daddr A meta l4proto P th dport N goto S`, a concatenated
    verdict map's element)."""
    matches, target = _plain(rule), rule.target
    if len(matches) != 3 or not isinstance(target, ir.JumpTarget):
        return None
    address, protocol, ports = matches
    if not (isinstance(address, ir.AddressMatch) and address.direction == "dst"
            and not address.negate and address.network.version == 4
            and address.network.prefixlen == 32):
        return None
    if not isinstance(protocol, ir.ProtocolMatch) or protocol.negate \
            or protocol.protocol not in _PORT_MATCHES \
            or not _port_match(ports, protocol.protocol):
        return None
    port, negate = _ports(ports)
    if negate or port.low != port.high:
        return None
    return (address.network.network_address, protocol.protocol, port.low, target.chain,
            target.goto, ports.partial_header)


class _Reader:
    """Reads service, endpoint and mark chains of one table, each once."""

    def __init__(self, table: ir.Table):
        self.table = table
        self.names = {c.name for c in table.chains}
        self.services: dict[tuple, Optional[dict]] = {}

    def chain(self, name: str) -> ir.Chain:
        if name not in self.names or self.table.chain(name).builtin:
            raise _NotAService(name)
        return self.table.chain(name)

    def marking(self, chain: str, index: int, rule: ir.Rule,
                source: Optional[ir.AddressMatch]) -> Marking:
        target = rule.target
        if not isinstance(target, ir.JumpTarget) or target.goto:
            raise _NotAService(chain)
        marker = self.chain(target.chain)
        if len(marker.rules) != 1 or _plain(marker.rules[0]) \
                or not isinstance(marker.rules[0].target, ir.MarkTarget):
            raise _NotAService(chain)
        return Marking((chain, index), (target.chain, 0), marker.rules[0].target, source)

    def masquerade(self, name: str, rule: ir.Rule, address, protocol: int,
                   port: int) -> Optional[Marking]:
        """The service chain's first rule: `[! -s NET] [-d A -p P --dport N] -j MARKER`.
        Its tests other than the source are decided by the dispatch rule's key: None when
        they fail (a NodePort's packet meets the ClusterIP's test)."""
        source, holds = None, True
        for match in _plain(rule):
            if isinstance(match, ir.AddressMatch) and match.network.version == 4 \
                    and match.direction == "src" and source is None:
                source = match
            elif isinstance(match, ir.AddressMatch) and match.network.version == 4 \
                    and match.direction == "dst":
                holds &= (address in match.network) != match.negate
            elif isinstance(match, ir.ProtocolMatch):
                holds &= (match.protocol == protocol) != match.negate
            elif _port_match(match, protocol):
                ports, negate = _ports(match)
                holds &= (ports.low <= port <= ports.high) != negate
            else:
                raise _NotAService(name)
        marking = self.marking(name, 0, rule, source)
        return marking if holds else None

    def endpoint(self, pick: RuleKey, target: ir.Target, protocol: int,
                 probability: int) -> Endpoint:
        """An endpoint chain (`[-s EP/32 -j MARKER]`, then `[-p P [-m P]] -j DNAT
        A[:port]`) that rung `pick` reaches."""
        if not isinstance(target, ir.JumpTarget):
            raise _NotAService(pick[0])
        chain = self.chain(target.chain)
        if not 1 <= len(chain.rules) <= 2:
            raise _NotAService(chain.name)
        hairpin = None
        if len(chain.rules) == 2:
            first = _plain(chain.rules[0])
            if len(first) != 1 or not isinstance(first[0], ir.AddressMatch) \
                    or first[0].direction != "src" or first[0].network.version != 4:
                raise _NotAService(chain.name)
            hairpin = self.marking(chain.name, 0, chain.rules[0], first[0])
        dnat = chain.rules[-1]
        target = dnat.target
        if not isinstance(target, ir.DnatTarget) or target.redirect \
                or target.address is None or target.address.version != 4 \
                or target.last_address is not None \
                or (target.ports is not None and target.ports[0] != target.ports[1]):
            raise _NotAService(chain.name)
        for match in _plain(dnat):
            if isinstance(match, ir.ProtocolMatch) and not match.negate \
                    and match.protocol == protocol:
                continue
            if type(match) is _PORT_MATCHES[protocol] and match == type(match)():
                continue  # `-m tcp` with nothing to test
            raise _NotAService(chain.name)
        return Endpoint(pick, probability, hairpin, (chain.name, len(chain.rules) - 1),
                        target.address, target.ports and target.ports[0])

    def service(self, index: int, rule: ir.Rule) -> Optional[Service]:
        found = _dispatch(rule)
        if found is None:
            return None
        address, protocol, port, name, goto, partial = found
        key = (address, protocol, port, name)
        if key not in self.services:
            try:
                self.services[key] = self._reached(*key)
            except _NotAService:
                self.services[key] = None
        shape = self.services[key]
        if shape is None:
            return None
        shape = dict(shape)
        # After a goto, a service chain that returns returns from the dispatch chain too:
        # only a ladder that always draws (always DNATs) stands for it.
        if not shape.pop("complete") and goto:
            return None
        return Service(index, address, protocol, port, partial=partial, **shape)

    def _reached(self, address, protocol: int, port: int, name: str) -> dict:
        """The service chain `name` (or an external chain that marks and goes on to one)."""
        try:
            return self._ladder(address, protocol, port, name)
        except _NotAService:
            chain = self.chain(name)
            if len(chain.rules) != 2:
                raise
            first, then = chain.rules
            onward = then.target
            if _plain(then) or not isinstance(onward, ir.JumpTarget):
                raise
            source = _plain(first)
            if len(source) > 1 or (source and not (
                    isinstance(source[0], ir.AddressMatch) and source[0].direction == "src"
                    and source[0].network.version == 4)):
                raise
            external = self.marking(name, 0, first, source[0] if source else None)
            shape = self._ladder(address, protocol, port, onward.chain)
            shape["rules"] = (external.rule, external.mark_rule, (name, 1)) + shape["rules"]
            return dict(shape, external=external, via=(name, 1))

    def _ladder(self, address, protocol: int, port: int, name: str) -> dict:
        chain = self.chain(name)
        rules = list(enumerate(chain.rules))
        keys: list[RuleKey] = []
        masquerade = None
        if rules and self._marks(name, rules[0][1]):  # not a ladder rung
            masquerade = self.masquerade(name, rules[0][1], address, protocol, port)
            keys += [(name, 0), (rules[0][1].target.chain, 0)]
            rules = rules[1:]
        if not rules or len(rules) > MAX_ENDPOINTS:
            raise _NotAService(name)
        draws = [_numgen_value(rule) for _i, rule in rules]
        if None not in draws:
            endpoints, modulus = self._numgen_rungs(name, rules, draws, protocol), len(rules)
        else:
            endpoints, modulus = [self._rung(name, i, rule, protocol) for i, rule in rules], 0
        for e in endpoints:
            keys.append(e.pick)
            if e.hairpin is not None:
                keys += [e.hairpin.rule, e.hairpin.mark_rule]
            keys.append(e.dnat)
        complete = modulus > 0 or any(e.probability == ir.StatisticMatch.ONE
                                      for e in endpoints)
        return dict(masquerade=masquerade, endpoints=tuple(endpoints),
                    rules=tuple(dict.fromkeys(keys)), modulus=modulus, complete=complete)

    def _marks(self, name: str, rule: ir.Rule) -> bool:
        """Whether the rule jumps to a mark chain (else it may be a ladder rung)."""
        try:
            self.marking(name, 0, rule, None)
        except _NotAService:
            return False
        return True

    def _rung(self, name: str, index: int, rule: ir.Rule, protocol: int) -> Endpoint:
        """`[-m statistic --mode random --probability p] -j SEP`."""
        matches = _plain(rule)
        probability = ir.StatisticMatch.ONE
        if matches:
            statistic = matches[0]
            if len(matches) != 1 or not isinstance(statistic, ir.StatisticMatch) \
                    or statistic.mode != "random" or statistic.negate:
                raise _NotAService(name)
            probability = statistic.probability
        return self.endpoint((name, index), rule.target, protocol, probability)

    def _numgen_rungs(self, name: str, rules: list, draws: list, protocol: int) -> list:
        """The elements of one `numgen random mod N [offset K] vmap`: one draw, each value
        of K..K+N-1 once; endpoint i is value K+i's."""
        first = draws[0]
        one_draw = len(draws) == 1 or (first.fresh and first.draw is not None and all(
            d.draw == first.draw and not d.fresh for d in draws[1:]))
        if not one_draw or first.modulus != len(draws) \
                or any((d.modulus, d.offset) != (first.modulus, first.offset) for d in draws):
            raise _NotAService(name)
        by_value = {d.values[0].low - d.offset: (i, rule) for d, (i, rule) in zip(draws, rules)}
        if sorted(by_value) != list(range(first.modulus)):
            raise _NotAService(name)
        return [self.endpoint((name, i), rule.target, protocol, ir.StatisticMatch.ONE)
                for _v, (i, rule) in sorted(by_value.items())]


def _numgen_value(rule: ir.Rule) -> Optional[ir.NumgenMatch]:
    """The match of a numgen verdict map's element: `numgen random mod N == v`."""
    matches = _plain(rule)
    if len(matches) != 1 or not isinstance(matches[0], ir.NumgenMatch):
        return None
    numgen = matches[0]
    if numgen.mode != "random" or numgen.negate or len(numgen.values) != 1 \
            or not numgen.values[0].single:
        return None
    return numgen


def _runs(table: ir.Table, folds: dict, first: int) -> dict[str, list]:
    """Per chain, its items with runs of dispatch rules made ServiceRuns."""
    reader = _Reader(table)
    result: dict[str, list] = {}
    number = first
    for chain in table.chains:
        items: list = []
        run: list[Service] = []
        keys: set[tuple] = set()

        def flush() -> None:
            nonlocal number
            if run:
                items.append(ServiceRun(number, table.key, chain.name, tuple(run)))
                number += 1
            run.clear()
            keys.clear()

        for item in folds[(table.key, chain.name)]:
            service = reader.service(item.index, item.rule) \
                if isinstance(item, RuleItem) else None
            if service is None:
                flush()
                items.append(item)
                continue
            key = (service.address, service.protocol, service.port)
            if key in keys or (run and run[0].partial != service.partial):
                flush()  # the later rule is tried only if the first's chain returned
            run.append(service)
            keys.add(key)
        flush()
        result[chain.name] = items
    return result


def _code_only(table: ir.Table, items: dict[str, list]) -> set[str]:
    """The chains that service runs stand for and no code reaches: they need no code."""
    involved = {key[0] for chain_items in items.values() for item in chain_items
                if isinstance(item, ServiceRun) for key in item.members}
    involved -= {c.name for c in table.chains if c.builtin}
    for item in (i for chain_items in items.values() for i in chain_items
                 if isinstance(i, ServiceRun)):
        involved.discard(item.chain)
    gone: set[str] = set()
    while True:
        targets = {item_target(i) for name, chain_items in items.items() if name not in gone
                   for i in chain_items}
        called = {t.chain for t in targets if isinstance(t, ir.JumpTarget)}
        more = {name for name in involved - gone if name not in called}
        if not more:
            return gone
        gone |= more


def find_services(ruleset: ir.Ruleset, folds: dict) -> dict:
    """The folds with runs of dispatch rules as ServiceRuns; the chains only they reach
    get no items (their rules are data: each run's members)."""
    result = dict(folds)
    number = 0
    for table in ruleset.tables:
        if table.family is not ir.Family.IPV4:
            continue
        items = _runs(table, folds, number)
        found = sum(isinstance(i, ServiceRun) for c in items.values() for i in c)
        if not found:
            continue
        number += found
        for name in _code_only(table, items):
            items[name] = []
        for name, chain_items in items.items():
            result[(table.key, name)] = tuple(chain_items)
    return result


def service_runs(folds: dict) -> tuple[ServiceRun, ...]:
    """Every service run of the folds, by number."""
    runs = [i for items in folds.values() for i in items if isinstance(i, ServiceRun)]
    return tuple(sorted(runs, key=lambda run: run.number))

