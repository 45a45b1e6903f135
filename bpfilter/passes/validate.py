"""Refuses what cannot run, with the line that causes it: nothing is dropped silently."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.passes.calls import CHAIN_LEVEL_MAX, MAX_FRAMES, chain_levels
# The iptables tables the compiler places whole (security has no use without SELinux), and
# the nat table, of which the chains PREROUTING reaches compile.
COMPILED_TABLES = ("raw", "mangle", "filter")
NAT_TABLE = "nat"
# Targets the kernel accepts in one table only (xt_target.table).
_TARGET_TABLES = {ir.RejectTarget: ("REJECT", "filter"),
                  ir.NotrackTarget: ("NOTRACK", "raw"),
                  ir.ChecksumTarget: ("CHECKSUM", "mangle"),
                  ir.DnatTarget: ("DNAT", NAT_TABLE),
                  ir.SnatTarget: ("SNAT", NAT_TABLE)}


def _error_at(origin: Optional[ir.Origin], token: str, why: str,
              supported: Optional[str] = None) -> InputError:
    origin = origin or ir.Origin("<input>", 0)
    return InputError(origin.file, origin.line, token, why, supported, origin.column)


def validate(ruleset: ir.Ruleset,
             on_unsupported: Optional[Callable[[InputError], None]] = None) -> ir.Ruleset:
    """Check the ruleset; return it with unsupported rules removed if `on_unsupported`
    accepts them (it is told of each), otherwise raise at the first one."""

    def unsupported(error: InputError) -> None:
        if on_unsupported is None:
            raise error
        on_unsupported(error)

    tables = []
    for table in ruleset.tables:
        chains = []
        # A table not compiled has no rules left, and its chains run nowhere.
        runs = not table.xtables or table.name in COMPILED_TABLES + (NAT_TABLE,)
        for chain in table.chains:
            _check_jumps(table, chain)
        bases = _bases_reaching(table)
        for chain in table.chains:
            keep = []
            for rule in chain.rules:
                problem = _unsupported_rule(table, rule) or _unsupported_nat(
                    table, chain, rule, bases.get(chain.name, []))
                if problem is None:
                    keep.append(rule)
                else:
                    unsupported(problem)
            chains.append(dataclasses.replace(chain, rules=tuple(keep),
                                              hook=chain.hook if runs else None))
        _check_interface_limits(table, bases)
        tables.append(dataclasses.replace(table, chains=tuple(chains)))
    result = ir.Ruleset(ruleset.family, tuple(tables), ruleset.source)
    _check_reply_tuples(result)
    for table in result.tables:
        _check_loops(table)
        _check_depth(table)
    return result


def _unsupported_rule(table: ir.Table, rule: ir.Rule) -> Optional[InputError]:
    if not table.xtables:
        return None
    if table.name not in COMPILED_TABLES + (NAT_TABLE,):
        return _error_at(rule.origin, f"*{table.name}",
                         f"rules in table '{table.name}' are not supported yet",
                         "rules in the " + ", ".join(COMPILED_TABLES) + " tables, and "
                         "in nat's PREROUTING, OUTPUT and POSTROUTING")
    name, only = _TARGET_TABLES.get(type(rule.target), (None, table.name))
    name = _nat_name(rule.target) or name
    if only != table.name:
        return _error_at(rule.origin, name,
                         f"{name} is valid only in the {only} table (the kernel refuses "
                         f"it in '{table.name}')")
    return None


def _bases_reaching(table: ir.Table) -> dict[str, list[ir.Chain]]:
    """Per chain, the base chains whose walk reaches it (a base chain's own first)."""
    bases: dict[str, list[ir.Chain]] = {}
    for base in table.chains:
        if base.hook is not None:
            for name in [base.name] + table.reached(base.name):
                bases.setdefault(name, []).append(base)
    return bases


# Where the kernel runs each NAT target (the hooks of xt_target / nft_nat_validate()),
# and of those where bpfilter compiles it.
_NAT_HOOKS = {"DNAT": ({ir.Hook.PREROUTING, ir.Hook.OUTPUT},
                       {ir.Hook.PREROUTING, ir.Hook.OUTPUT}),
              "REDIRECT": ({ir.Hook.PREROUTING, ir.Hook.OUTPUT}, {ir.Hook.PREROUTING}),
              "SNAT": ({ir.Hook.POSTROUTING, ir.Hook.INPUT},
                       {ir.Hook.POSTROUTING, ir.Hook.INPUT}),
              "MASQUERADE": ({ir.Hook.POSTROUTING}, {ir.Hook.POSTROUTING})}


def _nat_name(target) -> Optional[str]:
    if isinstance(target, ir.DnatTarget):
        return "REDIRECT" if target.redirect else "DNAT"
    if isinstance(target, ir.SnatTarget):
        return "MASQUERADE" if target.masquerade else "SNAT"
    return None


def _unsupported_nat(table: ir.Table, chain: ir.Chain, rule: ir.Rule,
                     bases: list[ir.Chain]) -> Optional[InputError]:
    """Of the nat table, bpfilter compiles what PREROUTING walks (DNAT, REDIRECT), what
    OUTPUT walks (DNAT), what POSTROUTING walks (SNAT, MASQUERADE) and what INPUT walks
    (SNAT): each target only at the hooks the kernel allows it, and in nftables only
    where NAT chains alone lead (nft_nat_validate()). `bases`: the base chains that reach
    the rule's chain."""
    name = _nat_name(rule.target)
    token = name if table.xtables else (name or "").lower()
    if name is not None:
        allowed, compiled = _NAT_HOOKS[name]
        if not table.xtables and any(not base.nat for base in bases):
            return _error_at(rule.origin, token, f"{token} runs only in NAT chains (type "
                             "nat): the kernel refuses it here", f"{token} in a type nat "
                             "chain, or a chain it jumps to")
        hooks = {base.hook for base in bases}
        if hooks - allowed:
            where = ", ".join(sorted(h.value for h in hooks - allowed))
            return _error_at(rule.origin, token, f"{token} is not valid at {where}: the "
                             "kernel allows it at " + ", ".join(sorted(
                                 h.value for h in allowed)))
        if hooks - compiled:
            where = ", ".join(sorted(h.value for h in hooks - compiled))
            return _error_at(rule.origin, token, f"{token} at {where} is not compiled yet",
                             f"{token} at " + ", ".join(sorted(h.value for h in compiled)))
    if not (table.xtables and table.name == NAT_TABLE):
        return None
    if isinstance(rule.target, ir.VerdictTarget) and rule.target.verdict is ir.Verdict.DROP:
        return _error_at(rule.origin, "DROP", "the nat table is not for filtering: iptables "
                         "refuses DROP in it", "DROP in the filter table")
    return None


def _check_reply_tuples(ruleset: ir.Ruleset) -> None:
    """The connection's reply tuple is its original one swapped, but for NAT's: with
    NAT in the ruleset, a rule reading the reply tuple is refused (not compiled yet)."""
    if not any(isinstance(r.target, ir.NAT_TARGETS)
               for t in ruleset.tables for c in t.chains for r in c.rules):
        return
    for table in ruleset.tables:
        for chain in table.chains:
            for rule in chain.rules:
                for m in rule.matches:
                    if isinstance(m, ir.ConntrackMatch) and any(
                            getattr(m, k) is not None for k in
                            ("replsrc", "repldst", "replsrcport", "repldstport")):
                        raise _error_at(rule.origin, "--ctrepl...", "the reply tuple of a "
                                        "NAT connection is not compiled yet: with NAT in "
                                        "the ruleset, --ctreplsrc/--ctrepldst and their "
                                        "ports are refused", "--ctorigsrc/--ctorigdst")


def _check_interface_limits(table: ir.Table, bases: dict[str, list[ir.Chain]]) -> None:
    """An address type limited to the packet's input (output) interface where a packet
    has none: the kernel refuses it at every hook whose chains reach the rule
    (addrtype's checkentry, nft_fib_validate)."""
    for chain in table.chains:
        for rule in chain.rules:
            for match in rule.matches:
                if not (isinstance(match, ir.AddrTypeMatch) and match.limit):
                    continue
                for base in bases.get(chain.name, []):
                    if base.hook in ir.AddrTypeMatch.NO_INTERFACE[match.limit]:
                        where = "" if chain is base else f" (chain {chain.name}, from {base.name})"
                        raise _error_at(rule.origin, f"--limit-iface-{match.limit}",
                                        f"a packet at {base.hook.value} has no "
                                        f"{'output' if match.limit == 'out' else 'input'} "
                                        f"interface{where}: the kernel refuses the limit "
                                        "there")


def _check_jumps(table: ir.Table, chain: ir.Chain) -> None:
    for rule in chain.rules:
        target = rule.target
        if isinstance(target, ir.JumpTarget):
            callee = table.chain(target.chain)
            if callee is None:
                raise _error_at(rule.origin, target.chain,
                                f"no chain '{target.chain}' in table '{table.name}', and it "
                                "is not a supported target",
                                "ACCEPT, DROP, RETURN, REJECT, LOG, or a declared chain")
            if callee.builtin:
                raise _error_at(rule.origin, target.chain,
                                "cannot jump to a built-in chain")


def _check_loops(table: ir.Table) -> None:
    """iptables refuses a ruleset where user chains can reach themselves (ELOOP). A walk
    with its own stack: chains may nest thousands deep before the depth check refuses them."""
    jumps = {c.name: [r for r in c.rules if isinstance(r.target, ir.JumpTarget)]
             for c in table.chains}
    done: set[str] = set()
    for root in table.chains:
        if root.name in done:
            continue
        path = [root.name]
        stack = [iter(jumps[root.name])]
        while stack:
            rule = next(stack[-1], None)
            if rule is None:
                done.add(path.pop())
                stack.pop()
                continue
            callee = rule.target.chain
            if callee in path:
                cycle = path[path.index(callee):] + [callee]
                if len(cycle) > 12:
                    cycle = cycle[:6] + [f"({len(cycle) - 10} more)"] + cycle[-4:]
                raise _error_at(rule.origin, callee, "chains form a loop: " + " -> ".join(cycle))
            if callee not in done and callee in jumps:
                path.append(callee)
                stack.append(iter(jumps[callee]))


def _check_depth(table: ir.Table) -> None:
    """Every chain called is a frame on the BPF call stack, which is bounded."""
    levels = chain_levels(table)
    for chain in table.chains:
        if levels.get(chain.name) != CHAIN_LEVEL_MAX:
            continue
        for rule in chain.rules:
            if isinstance(rule.target, ir.JumpTarget):
                raise _error_at(
                    rule.origin, rule.target.chain,
                    f"chains nested more than {CHAIN_LEVEL_MAX} deep: '{chain.name}' is "
                    f"already {CHAIN_LEVEL_MAX} calls deep, and a BPF program can nest "
                    f"at most {MAX_FRAMES} function calls",
                    f"up to {CHAIN_LEVEL_MAX} chains on one path, the built-in chain "
                    "included")
