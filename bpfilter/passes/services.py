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
    probability of its statistic match, ONE without), the chain's hairpin marking and its
    DNAT (port None: the packet's own)."""

    pick: RuleKey
    probability: int
    hairpin: Optional[Marking]
    dnat: RuleKey
    address: ipaddress.IPv4Address
    port: Optional[int]


@dataclass(frozen=True)
class Service:
    index: int  # the dispatch rule, in the run's chain
    address: ipaddress.IPv4Address
    protocol: int
    port: int
    masquerade: Optional[Marking]  # the service chain's first rule, when it marks
    endpoints: tuple[Endpoint, ...]

    @property
    def rules(self) -> tuple[RuleKey, ...]:
        """Every rule of the service and endpoint chains it stands for."""
        keys: list[RuleKey] = []
        for marking in filter(None, [self.masquerade]):
            keys += [marking.rule, marking.mark_rule]
        for endpoint in self.endpoints:
            keys.append(endpoint.pick)
            if endpoint.hairpin is not None:
                keys += [endpoint.hairpin.rule, endpoint.hairpin.mark_rule]
            keys.append(endpoint.dnat)
        return tuple(keys)


@dataclass(frozen=True)
class ServiceRun:
    """Consecutive dispatch rules of a chain, as one lookup (numbered across the
    ruleset: the run's key in the program's service map)."""

    number: int
    table: str
    chain: str
    services: tuple[Service, ...]

    @property
    def indexes(self) -> tuple[int, ...]:
        return tuple(s.index for s in self.services)

    @property
    def members(self) -> tuple[RuleKey, ...]:
        """Every rule the run stands for, once: its dispatch rules, then their chains'."""
        keys = [(self.chain, s.index) for s in self.services]
        keys += [k for s in self.services for k in s.rules]
        return tuple(dict.fromkeys(keys))


def _plain(rule: ir.Rule) -> list[ir.Match]:
    return [m for m in rule.matches if not isinstance(m, ir.CommentMatch)]


def _port_of(match) -> Optional[int]:
    """The one destination port an unadorned tcp/udp match tests."""
    if match.sport is not None or match.dport is None or match.dport.negate \
            or getattr(match, "flags", None) is not None or match.partial_header:
        return None
    ports = match.dport.ports
    return ports.low if ports.low == ports.high else None


def _dispatch(rule: ir.Rule) -> Optional[tuple[ipaddress.IPv4Address, int, int, str]]:
    """(address, protocol, port, service chain) of `-d A/32 -p P -m P --dport N -j S`."""
    matches, target = _plain(rule), rule.target
    if len(matches) != 3 or not isinstance(target, ir.JumpTarget) or target.goto:
        return None
    address, protocol, ports = matches
    if not (isinstance(address, ir.AddressMatch) and address.direction == "dst"
            and not address.negate and address.network.version == 4
            and address.network.prefixlen == 32):
        return None
    if not isinstance(protocol, ir.ProtocolMatch) or protocol.negate \
            or type(ports) is not _PORT_MATCHES.get(protocol.protocol):
        return None
    port = _port_of(ports)
    if port is None:
        return None
    return address.network.network_address, protocol.protocol, port, target.chain


class _Reader:
    """Reads service, endpoint and mark chains of one table, each once."""

    def __init__(self, table: ir.Table):
        self.table = table
        self.names = {c.name for c in table.chains}
        self.services: dict[tuple, Optional[tuple]] = {}

    def chain(self, name: str) -> Optional[ir.Chain]:
        if name not in self.names:
            return None
        chain = self.table.chain(name)
        return None if chain.builtin else chain

    def marking(self, chain: str, index: int, rule: ir.Rule,
                source: Optional[ir.AddressMatch]) -> Optional[Marking]:
        target = rule.target
        if not isinstance(target, ir.JumpTarget) or target.goto:
            return None
        marker = self.chain(target.chain)
        if marker is None or len(marker.rules) != 1 or _plain(marker.rules[0]) \
                or not isinstance(marker.rules[0].target, ir.MarkTarget):
            return None
        return Marking((chain, index), (target.chain, 0), marker.rules[0].target, source)

    def masquerade(self, name: str, rule: ir.Rule, address, protocol: int,
                   port: int) -> Optional[Marking]:
        """The service chain's first rule: `[! -s NET] [-d A -p P --dport N] -j MARKER`,
        whose tests other than the source the dispatch rule already passed."""
        source = None
        for match in _plain(rule):
            if isinstance(match, ir.AddressMatch) and match.direction == "src" \
                    and source is None and match.network.version == 4:
                source = match
            elif isinstance(match, ir.AddressMatch) and match.direction == "dst" \
                    and not match.negate and match.network == ipaddress.ip_network(address):
                continue
            elif isinstance(match, ir.ProtocolMatch) and not match.negate \
                    and match.protocol == protocol:
                continue
            elif type(match) is _PORT_MATCHES[protocol] and _port_of(match) == port:
                continue
            else:
                return None
        return self.marking(name, 0, rule, source)

    def endpoint(self, pick: RuleKey, rule: ir.Rule, protocol: int) -> Optional[Endpoint]:
        """A ladder rule (`[-m statistic --mode random --probability p] -j SEP`) and its
        endpoint chain (`[-s EP/32 -j MARKER]`, then `[-p P [-m P]] -j DNAT A[:port]`)."""
        matches, target = _plain(rule), rule.target
        probability = ir.StatisticMatch.ONE
        if matches:
            statistic = matches[0]
            if len(matches) != 1 or not isinstance(statistic, ir.StatisticMatch) \
                    or statistic.mode != "random" or statistic.negate:
                return None
            probability = statistic.probability
        if not isinstance(target, ir.JumpTarget):
            return None
        chain = self.chain(target.chain)
        if chain is None or not 1 <= len(chain.rules) <= 2:
            return None
        hairpin = None
        if len(chain.rules) == 2:
            first = _plain(chain.rules[0])
            if len(first) != 1 or not isinstance(first[0], ir.AddressMatch) \
                    or first[0].direction != "src" or first[0].network.version != 4:
                return None
            hairpin = self.marking(chain.name, 0, chain.rules[0], first[0])
            if hairpin is None:
                return None
        dnat = chain.rules[-1]
        target = dnat.target
        if not isinstance(target, ir.DnatTarget) or target.redirect \
                or target.address is None or target.address.version != 4 \
                or target.last_address is not None:
            return None
        if target.ports is not None and target.ports[0] != target.ports[1]:
            return None
        for match in _plain(dnat):
            if isinstance(match, ir.ProtocolMatch) and not match.negate \
                    and match.protocol == protocol:
                continue
            if type(match) is _PORT_MATCHES[protocol] and match == type(match)():
                continue  # `-m tcp` with nothing to test
            return None
        return Endpoint(pick, probability, hairpin, (chain.name, len(chain.rules) - 1),
                        target.address, target.ports and target.ports[0])

    def service(self, index: int, rule: ir.Rule) -> Optional[Service]:
        found = _dispatch(rule)
        if found is None:
            return None
        address, protocol, port, name = found
        key = (address, protocol, port, name)
        if key not in self.services:
            self.services[key] = self._ladder(*key)
        shape = self.services[key]
        return None if shape is None else Service(index, address, protocol, port, *shape)

    def _ladder(self, address, protocol: int, port: int, name: str) -> Optional[tuple]:
        chain = self.chain(name)
        if chain is None or not chain.rules:
            return None
        rules = list(enumerate(chain.rules))
        masquerade = None
        if self.marking(name, 0, rules[0][1], None) is not None:  # not a ladder rung
            masquerade = self.masquerade(name, rules[0][1], address, protocol, port)
            if masquerade is None:
                return None
            rules = rules[1:]
        endpoints = [self.endpoint((name, i), rule, protocol) for i, rule in rules]
        if not endpoints or None in endpoints or len(endpoints) > MAX_ENDPOINTS:
            return None
        return masquerade, tuple(endpoints)


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
            if key in keys:
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

