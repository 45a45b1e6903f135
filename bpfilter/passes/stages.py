"""Places built-in chains at netfilter stages and lays out the counter slots."""

from __future__ import annotations

from dataclasses import dataclass

from bpfilter import ir
from bpfilter.passes.fold import Item, PrefixRun, fold_chains

Folds = dict[tuple[str, str], tuple[Item, ...]]


@dataclass(frozen=True)
class ChainRef:
    """A chain reachable from a stage, and the counter slot of each of its rules."""

    chain: ir.Chain
    rule_slots: tuple[int, ...]
    policy_slot: int  # -1 for user-defined chains
    items: tuple[Item, ...] = ()  # the rules as code generation takes them (folded runs)


@dataclass(frozen=True)
class Stage:
    """One hook's program: its entry chain and every chain it can reach, callees first."""

    hook: ir.Hook
    table: str
    entry: str
    chains: tuple[ChainRef, ...]


def counter_slots(ruleset: ir.Ruleset,
                  folds: Folds | None = None) -> dict[tuple[str, str, int], int]:
    """A counter slot per rule and per built-in chain policy (rule index -1).

    Rules that stay code come first, then the policies, then the rules folded into map
    lookups: the code's slot numbers then do not move when addresses are added to or
    removed from a folded run, so such a change compiles to the same program."""
    folds = fold_chains(ruleset) if folds is None else folds
    slots: dict[tuple[str, str, int], int] = {}
    folded: list[tuple[str, str, int]] = []
    for table in ruleset.tables:
        for chain in table.chains:
            for item in folds[(table.name, chain.name)]:
                if isinstance(item, PrefixRun):
                    folded.extend((table.name, chain.name, i) for i in item.indexes)
                else:
                    slots[(table.name, chain.name, item.index)] = len(slots)
    for table in ruleset.tables:
        for chain in table.chains:
            if chain.builtin:
                slots[(table.name, chain.name, -1)] = len(slots)
    for key in folded:
        slots[key] = len(slots)
    return slots


def _reachable(table: ir.Table, entry: str) -> list[str]:
    """Chains reachable from `entry`, each after all the chains it calls."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for rule in table.chain(name).rules:
            if isinstance(rule.target, ir.JumpTarget):
                visit(rule.target.chain)
        order.append(name)

    visit(entry)
    return order


def plan_stages(ruleset: ir.Ruleset, hooks: tuple[ir.Hook, ...], table_name: str = "filter",
                folds: Folds | None = None,
                slots: dict[tuple[str, str, int], int] | None = None) -> tuple[Stage, ...]:
    folds = fold_chains(ruleset) if folds is None else folds
    slots = counter_slots(ruleset, folds) if slots is None else slots
    table = ruleset.table(table_name)
    if table is None:
        table = ir.Table(table_name, ())
    stages = []
    for hook in hooks:
        if table.chain(hook.value) is None:
            continue
        refs = []
        for name in _reachable(table, hook.value):
            chain = table.chain(name)
            rule_slots = tuple(slots[(table.name, name, i)] for i in range(len(chain.rules)))
            refs.append(ChainRef(chain, rule_slots, slots.get((table.name, name, -1), -1),
                                 folds[(table.name, name)]))
        stages.append(Stage(hook, table.name, hook.value, tuple(refs)))
    return tuple(stages)
