"""Places built-in chains at netfilter stages and lays out the counter slots."""

from __future__ import annotations

from dataclasses import dataclass

from bpfilter import ir
from bpfilter.passes.fold import Item, fold_rules


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


def counter_slots(ruleset: ir.Ruleset) -> dict[tuple[str, str, int], int]:
    """A slot per rule, then one per built-in chain policy (rule index -1), in file order."""
    slots: dict[tuple[str, str, int], int] = {}
    for table in ruleset.tables:
        for chain in table.chains:
            for index in range(len(chain.rules)):
                slots[(table.name, chain.name, index)] = len(slots)
    for table in ruleset.tables:
        for chain in table.chains:
            if chain.builtin:
                slots[(table.name, chain.name, -1)] = len(slots)
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


def plan_stages(ruleset: ir.Ruleset, hooks: tuple[ir.Hook, ...],
                table_name: str = "filter") -> tuple[Stage, ...]:
    slots = counter_slots(ruleset)
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
                                 fold_rules(chain.rules, rule_slots)))
        stages.append(Stage(hook, table.name, hook.value, tuple(refs)))
    return tuple(stages)
