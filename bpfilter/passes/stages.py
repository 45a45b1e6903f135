"""Places built-in chains at netfilter stages and lays out the counter slots."""

from __future__ import annotations

from dataclasses import dataclass

from bpfilter import ir
from bpfilter.passes.classify import ChainItem, Classification, Segment, entry_rules
from bpfilter.passes.fold import PrefixRun, RuleItem, fold_chains

Folds = dict[tuple[str, str], tuple[ChainItem, ...]]


@dataclass(frozen=True)
class ChainRef:
    """A chain reachable from a stage, and the counter slot of each of its rules."""

    chain: ir.Chain
    rule_slots: tuple[int, ...]
    policy_slot: int  # -1 for user-defined chains
    items: tuple[ChainItem, ...] = ()  # as code generation takes them (runs, segments)


# The hooks one program at an interface's ingress runs: after the routing decision the
# kernel takes, a packet for this host walks INPUT, one it routes on walks FORWARD.
INGRESS_HOOKS = (ir.Hook.INPUT, ir.Hook.FORWARD)
# The hooks the program at its egress runs: only there does a host's own packet show.
EGRESS_HOOKS = (ir.Hook.OUTPUT,)


@dataclass(frozen=True)
class Stage:
    """One program: the built-in chains of its hooks and every chain they reach, callees
    first."""

    hooks: tuple[ir.Hook, ...]  # those whose built-in chain the table has
    table: str
    chains: tuple[ChainRef, ...]
    classification: Classification = Classification()
    # Every chain a packet can walk in this program, with the hooks it is reached from.
    reached: tuple[tuple[str, tuple[ir.Hook, ...]], ...] = ()
    # Per classifier segment, the counter slots of its chain's rules.
    segment_slots: tuple[tuple[int, ...], ...] = ()


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
            for item in folds[(table.name, chain.name)]:
                key = table.name, chain.name
                if isinstance(item, PrefixRun):
                    folded.extend((*key, i) for i in item.indexes)
                elif isinstance(item, Segment):
                    folded.extend((*key, i) for e in item.entries for i in entry_rules(e))
                else:
                    slots[(*key, item.index)] = len(slots)
    for table in ruleset.tables:
        for chain in table.chains:
            if chain.builtin:
                slots[(table.name, chain.name, -1)] = len(slots)
    for key in folded:
        slots[key] = len(slots)
    return slots


def _reachable(table: ir.Table, entry: str, folds: Folds | None = None) -> list[str]:
    """Chains reachable from `entry`, each after all the chains it calls. With `folds`,
    only those code reaches (a chain entered only from classifier entries needs no code
    of its own)."""
    order: dict[str, None] = {}  # insertion-ordered, with a constant-time `in`

    def targets(name: str):
        if folds is None:
            return [r.target for r in table.chain(name).rules]
        return [item.rule.target if isinstance(item, RuleItem) else
                item.target if isinstance(item, PrefixRun) else None
                for item in folds[(table.name, name)]]

    def visit(name: str) -> None:
        if name in order:
            return
        for target in targets(name):
            if isinstance(target, ir.JumpTarget):
                visit(target.chain)
        order[name] = None

    visit(entry)
    return list(order)


def _runs_anything(table: ir.Table, hook: ir.Hook) -> bool:
    """An empty built-in chain whose policy is ACCEPT changes no packet: no program need
    run it (only its policy counter then stays at zero)."""
    chain = table.chain(hook.value)
    return chain is not None and (bool(chain.rules) or chain.policy is not ir.Verdict.ACCEPT)


def plan_stages(ruleset: ir.Ruleset, table_name: str = "filter", folds: Folds | None = None,
                slots: dict[tuple[str, str, int], int] | None = None,
                classification: Classification = Classification()) -> tuple[Stage, ...]:
    """One program at ingress (always, if only to pass everything) and one at egress
    (with the egress hooks it must run; code generation drops it if it has nothing to do).
    They share the counter slots and the classification: one set of maps serves both."""
    folds = fold_chains(ruleset) if folds is None else folds
    slots = counter_slots(ruleset, folds) if slots is None else slots
    table = ruleset.table(table_name)
    if table is None:
        table = ir.Table(table_name, ())
    segment_slots = tuple(
        tuple(slots[(*s.chain, i)] for i in range(len(table.chain(s.chain[1]).rules)))
        for s in classification.segments)
    ingress = tuple(h for h in INGRESS_HOOKS if table.chain(h.value) is not None)
    egress = tuple(h for h in EGRESS_HOOKS if _runs_anything(table, h))
    return tuple(_stage(table, hooks, folds, slots, classification, segment_slots)
                 for hooks in (ingress, egress))


def _stage(table: ir.Table, present: tuple[ir.Hook, ...], folds: Folds,
           slots: dict[tuple[str, str, int], int], classification: Classification,
           segment_slots: tuple[tuple[int, ...], ...]) -> Stage:
    names: dict[str, None] = {}  # ordered: callees first across the hooks too
    reached: dict[str, tuple[ir.Hook, ...]] = {}
    for hook in present:
        names.update(dict.fromkeys(_reachable(table, hook.value, folds)))
        for name in _reachable(table, hook.value):
            reached[name] = reached.get(name, ()) + (hook,)
    refs = []
    for name in names:
        chain = table.chain(name)
        rule_slots = tuple(slots[(table.name, name, i)] for i in range(len(chain.rules)))
        refs.append(ChainRef(chain, rule_slots, slots.get((table.name, name, -1), -1),
                             folds[(table.name, name)]))
    return Stage(present, table.name, tuple(refs), classification, tuple(reached.items()),
                 segment_slots)
