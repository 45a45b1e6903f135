"""Places built-in chains at netfilter stages and lays out the counter slots."""

from __future__ import annotations

from dataclasses import dataclass

from bpfilter import ir
from bpfilter.passes.classify import ChainItem, Classification, Segment, entry_rules
from bpfilter.passes.fold import PrefixRun, fold_chains, item_target
from bpfilter.passes.services import ServiceRun, service_runs

Folds = dict[tuple[str, str], tuple[ChainItem, ...]]


@dataclass(frozen=True)
class ChainRef:
    """A chain reachable from a stage, and the counter slot of each of its rules."""

    table: str  # its Table.key
    chain: ir.Chain
    rule_slots: tuple[int, ...]
    policy_slot: int  # -1 for user-defined chains
    items: tuple[ChainItem, ...] = ()  # as code generation takes them (runs, segments)
    family: ir.Family = ir.Family.IPV4  # the packets it sees

    @property
    def key(self) -> tuple[str, str]:
        return self.table, self.chain.name


# The hooks one program at an interface's ingress runs: every frame walks INGRESS (netdev
# chains), every IP packet PREROUTING; after the routing decision the kernel takes, one
# for this host walks INPUT, one it routes on FORWARD and then POSTROUTING (decided here,
# where its marks are known).
INGRESS_HOOKS = (ir.Hook.INGRESS, ir.Hook.PREROUTING, ir.Hook.INPUT, ir.Hook.FORWARD,
                 ir.Hook.POSTROUTING)
# The hooks the program at its egress runs for the host's own packets: only there do they
# show.
EGRESS_HOOKS = (ir.Hook.OUTPUT, ir.Hook.POSTROUTING)


@dataclass(frozen=True)
class Stage:
    """One program: per hook, the base chains it walks, and every chain they reach,
    callees first."""

    # (hook, the (table, chain) of each base chain that runs there, in priority order);
    # only hooks with at least one
    walks: tuple[tuple[ir.Hook, tuple[tuple[str, str], ...]], ...]
    chains: tuple[ChainRef, ...]
    classification: Classification = Classification()
    # Every chain a packet can walk in this program, with the hooks it is reached from.
    reached: tuple[tuple[tuple[str, str], tuple[ir.Hook, ...]], ...] = ()
    # Per classifier segment, the counter slots of its chain's rules.
    segment_slots: tuple[tuple[int, ...], ...] = ()
    # The service runs (by number), and the counter slots of each one's members.
    services: tuple[ServiceRun, ...] = ()
    service_slots: tuple[tuple[int, ...], ...] = ()

    @property
    def hooks(self) -> tuple[ir.Hook, ...]:
        return tuple(hook for hook, _tables in self.walks)

    def base_chains(self, hook: ir.Hook) -> tuple[tuple[str, str], ...]:
        return dict(self.walks).get(hook, ())


def counter_slots(ruleset: ir.Ruleset,
                  folds: Folds | None = None) -> dict[tuple[str, str, int], int]:
    """A counter slot per rule and per built-in chain policy (rule index -1).

    Rules that stay code come first, then the policies, then the rules that are data
    (folded runs, classifier entries): the code's slot numbers then do not move when
    data rules are added or removed, so such a change compiles to the same program."""
    folds = fold_chains(ruleset) if folds is None else folds
    slots: dict[tuple[str, str, int], int] = {}
    folded: list[tuple[str, str, int]] = []
    for table in ruleset.tables:
        for chain in table.chains:
            for item in folds[(table.key, chain.name)]:
                key = table.key, chain.name
                if isinstance(item, PrefixRun):
                    folded.extend((*key, i) for i in item.indexes)
                elif isinstance(item, ServiceRun):
                    folded.extend((table.key, *member) for member in item.members)
                elif isinstance(item, Segment):
                    folded.extend((*key, i) for e in item.entries for i in entry_rules(e))
                else:
                    slots[(*key, item.index)] = len(slots)
    for table in ruleset.tables:
        for chain in table.chains:
            if chain.builtin:
                slots[(table.key, chain.name, -1)] = len(slots)
    for key in folded:  # (a service run's rule in a chain of code has its slot there)
        slots.setdefault(key, len(slots))
    return slots


def _reachable(table: ir.Table, entry: str, folds: Folds | None = None) -> list[str]:
    """Chains reachable from `entry`, each after all the chains it calls. With `folds`,
    only those code reaches (a chain entered only from classifier entries needs no code
    of its own)."""
    order: dict[str, None] = {}  # insertion-ordered, with a constant-time `in`

    def targets(name: str):
        if folds is None:
            return [r.target for r in table.chain(name).rules]
        return [item_target(item) for item in folds[(table.key, name)]]

    def visit(name: str) -> None:
        if name in order:
            return
        for target in targets(name):
            if isinstance(target, ir.JumpTarget):
                visit(target.chain)
        order[name] = None

    visit(entry)
    return list(order)


def _runs_anything(table: ir.Table, chain: ir.Chain) -> bool:
    """An empty base chain whose policy is ACCEPT changes no packet: no program need run
    it (only its policy counter then stays at zero). iptables' filter INPUT and FORWARD
    run even so: their policy counters are what `list` is most read for."""
    return (bool(chain.rules) or chain.policy is not ir.Verdict.ACCEPT
            or (table.xtables and table.name == "filter"
                and chain.hook in (ir.Hook.INPUT, ir.Hook.FORWARD)))


def _base_chains(ruleset: ir.Ruleset, hook: ir.Hook) -> tuple[tuple[str, str], ...]:
    """The base chains that run at `hook`, lowest priority first (file order among equal
    ones)."""
    found = [(chain.priority, table.key, chain.name) for table in ruleset.tables
             for chain in table.chains
             if chain.hook is hook and chain.builtin and _runs_anything(table, chain)]
    return tuple((table, chain) for _priority, table, chain in
                 sorted(found, key=lambda found: found[0]))


def plan_stages(ruleset: ir.Ruleset, folds: Folds | None = None,
                slots: dict[tuple[str, str, int], int] | None = None,
                classification: Classification = Classification()) -> tuple[Stage, ...]:
    """One program at ingress (always, if only to pass everything) and one at egress
    (with the egress hooks it must run; code generation drops it if it has nothing to do).
    They share the counter slots and the classification: one set of maps serves both."""
    folds = fold_chains(ruleset) if folds is None else folds
    slots = counter_slots(ruleset, folds) if slots is None else slots
    segment_slots = tuple(
        tuple(slots[(*s.chain, i)]
              for i in range(len(ruleset.table(s.chain[0]).chain(s.chain[1]).rules)))
        for s in classification.segments)
    services = service_runs(folds)
    service_slots = tuple(tuple(slots[(run.table, *member)] for member in run.members)
                          for run in services)
    stages = []
    for hooks in (INGRESS_HOOKS, EGRESS_HOOKS):
        walks = tuple((hook, keys) for hook in hooks if (keys := _base_chains(ruleset, hook)))
        stages.append(_stage(ruleset, walks, folds, slots, classification, segment_slots,
                             services, service_slots))
    return tuple(stages)


def _stage(ruleset: ir.Ruleset,
           walks: tuple[tuple[ir.Hook, tuple[tuple[str, str], ...]], ...],
           folds: Folds, slots: dict[tuple[str, str, int], int],
           classification: Classification,
           segment_slots: tuple[tuple[int, ...], ...],
           services: tuple[ServiceRun, ...],
           service_slots: tuple[tuple[int, ...], ...]) -> Stage:
    keys: dict[tuple[str, str], None] = {}  # ordered: callees first across the hooks too
    reached: dict[tuple[str, str], tuple[ir.Hook, ...]] = {}
    for hook, bases in walks:
        for name, base in bases:
            table = ruleset.table(name)
            keys.update(dict.fromkeys((name, c) for c in _reachable(table, base, folds)))
            for chain in _reachable(table, base):
                reached[(name, chain)] = reached.get((name, chain), ()) + (hook,)
    refs = []
    for table_name, name in keys:
        chain = ruleset.table(table_name).chain(name)
        rule_slots = tuple(slots[(table_name, name, i)] for i in range(len(chain.rules)))
        refs.append(ChainRef(table_name, chain, rule_slots,
                             slots.get((table_name, name, -1), -1),
                             folds[(table_name, name)], ruleset.table(table_name).family))
    return Stage(walks, tuple(refs), classification, tuple(reached.items()), segment_slots,
                 services, service_slots)
