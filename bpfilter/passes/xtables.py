"""Regroups a ruleset's chains into iptables' fixed tables (for `translate --to
iptables`): IR -> IR.

nftables names its tables and orders base chains by priority; iptables has one table per
priority (raw -300, mangle -150, filter 0; nat's chains at dstnat -100 and srcnat 100) whose
built-in chains are named after their hooks. Each base chain becomes the built-in chain of
its priority's table, and the chains it reaches go with it. What has no place there is an
error naming the chain.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from bpfilter import ir
from bpfilter.errors import InputError

TABLES = {-300: "raw", -150: "mangle", 0: "filter"}
# iptables' nat chains: destination NAT before filtering, source NAT after.
NAT_PRIORITIES = {ir.Hook.PREROUTING: -100, ir.Hook.OUTPUT: -100, ir.Hook.INPUT: 100,
                  ir.Hook.POSTROUTING: 100}
_HOOKS = {"raw": (ir.Hook.PREROUTING, ir.Hook.OUTPUT),
          "mangle": tuple(ir.Hook),
          "nat": tuple(NAT_PRIORITIES),
          "filter": (ir.Hook.INPUT, ir.Hook.FORWARD, ir.Hook.OUTPUT)}
_ORDER = ("raw", "mangle", "nat", "filter")
_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def _error(chain: ir.Chain, why: str, supported: Optional[str] = None) -> InputError:
    origin = chain.origin or ir.Origin("<input>", 0)
    return InputError(origin.file, origin.line, chain.name, why, supported, origin.column)


def to_xtables(ruleset: ir.Ruleset) -> ir.Ruleset:
    if all(t.xtables for t in ruleset.tables):
        return ruleset
    families = {t.family for t in ruleset.tables}
    inet = next((t for t in ruleset.tables if t.family is None), None)
    if inet is not None:
        origin = inet.origin or ir.Origin(ruleset.source, 0)
        why = ("a netdev table filters every frame at ingress, a hook iptables does not have"
               if inet.netdev else
               "an inet table filters both families, which iptables and ip6tables keep apart")
        raise InputError(origin.file, origin.line, inet.name, why,
                         "tables of family ip or ip6", origin.column)
    if len(families) > 1:
        table = next(t for t in ruleset.tables if t.family is not ruleset.tables[0].family)
        origin = table.origin or ir.Origin(ruleset.source, 0)
        raise InputError(origin.file, origin.line, table.name, "iptables and ip6tables "
                         "rulesets are separate files: translate the ip and the ip6 tables "
                         "apart", column=origin.column)
    family = families.pop() if families else ir.Family.IPV4
    chains: dict[str, dict[str, ir.Chain]] = {name: {} for name in _ORDER}
    for table in ruleset.tables:
        renames = {c.name: _NAME.sub("-", c.name) for c in table.chains if not c.builtin}
        for base in (c for c in table.chains if c.builtin and c.hook is not None):
            if base.nat:
                target = "nat" if NAT_PRIORITIES.get(base.hook) == base.priority else None
            else:
                target = TABLES.get(base.priority)
            if target is None:
                raise _error(base, f"no iptables table runs {'nat chains ' * base.nat}at "
                             f"priority {base.priority}", "priorities raw (-300), mangle "
                             "(-150), filter (0); nat chains at dstnat (-100) at prerouting "
                             "and output, srcnat (100) at postrouting and input")
            if base.hook not in _HOOKS[target]:
                raise _error(base, f"iptables' {target} table has no {base.hook.value} "
                             "chain")
            if base.hook.value in chains[target]:
                raise _error(base, f"a second base chain at {base.hook.value} priority "
                             f"{base.priority}: iptables' {target} table has one")
            chains[target][base.hook.value] = _renamed(
                base, base.hook.value, renames)
            for name in table.reached(base.name):
                chain = table.chain(name)
                new = renames[name]
                if new in chains[target] and chains[target][new].origin != chain.origin:
                    raise _error(chain, f"two chains named '{new}' would meet in iptables' "
                                 f"{target} table")
                chains[target][new] = _renamed(chain, new, renames)
    tables = tuple(ir.Table(name, tuple(chains[name].values()), family=family)
                   for name in _ORDER if chains[name])
    return ir.Ruleset(family, tables, ruleset.source)


def _renamed(chain: ir.Chain, name: str, renames: dict[str, str]) -> ir.Chain:
    rules = tuple(
        dataclasses.replace(r, target=dataclasses.replace(r.target,
                                                          chain=renames[r.target.chain]))
        if isinstance(r.target, ir.JumpTarget) else r for r in chain.rules)
    return dataclasses.replace(chain, name=name, rules=rules)
