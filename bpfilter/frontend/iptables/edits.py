"""Recognises the commonest change to a large ruleset, without parsing it: addresses added
to or removed from a block of rules that differ only in their leading `-s` / `-d` (a
blocklist). `apply` can then update the running ruleset's address lookup in place
instead of compiling 10,000 rules again.

Only the changed lines are looked at, and the two lines around them; anything else (a
changed rule, a counter, a new chain, several places changed) is not an edit here, and
the caller compiles the whole text as usual.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

# iptables-save prints the address first, always with its length.
_ADDRESS_RULE = re.compile(r"^-A (\S+) -([sd]) (\d+\.\d+\.\d+\.\d+/\d+) (.+)$")


@dataclass(frozen=True)
class AddressEdit:
    table: str
    chain: str
    index: int  # the first rule added (in the new text) or removed (in the old)
    direction: str  # "src" | "dst"
    rest: str  # the rule after its address: equal for every rule of the block
    added: tuple[ipaddress.IPv4Network, ...] = ()
    removed: tuple[ipaddress.IPv4Network, ...] = ()
    # `rest` of the rules just before and after the change, when they are address rules
    # of the same chain and direction
    before: Optional[str] = None
    after: Optional[str] = None


def _address_rule(line: str) -> Optional[tuple[str, str, ipaddress.IPv4Network, str]]:
    found = _ADDRESS_RULE.match(line)
    if not found:
        return None
    try:
        network = ipaddress.IPv4Network(found.group(3))
    except ValueError:
        return None
    return found.group(1), "src" if found.group(2) == "s" else "dst", network, found.group(4)


def address_edit(old: str, new: str) -> Optional[AddressEdit]:
    """The edit that turns `old` into `new`, if it is one block of address lines added or
    removed in one place; else None."""
    old_lines, new_lines = old.split("\n"), new.split("\n")
    shortest = min(len(old_lines), len(new_lines))
    head = 0
    while head < shortest and old_lines[head] == new_lines[head]:
        head += 1
    tail = 0
    while tail < shortest - head and old_lines[-1 - tail] == new_lines[-1 - tail]:
        tail += 1
    removed = old_lines[head:len(old_lines) - tail]
    added = new_lines[head:len(new_lines) - tail]
    if bool(removed) == bool(added):
        return None  # nothing changed, or lines changed in place
    changed = [_address_rule(line) for line in removed or added]
    if any(c is None for c in changed):
        return None
    chain, direction, _net, rest = changed[0]
    if any((c[0], c[1], c[3]) != (chain, direction, rest) for c in changed):
        return None
    table, index = _position(old_lines[:head], chain)
    if table is None:
        return None
    outside = old_lines[head + len(removed):]

    def rest_of(line: Optional[str]) -> Optional[str]:
        rule = _address_rule(line) if line is not None else None
        return rule[3] if rule is not None and rule[:2] == (chain, direction) else None

    networks = tuple(c[2] for c in changed)
    return AddressEdit(table, chain, index, direction, rest,
                       added=networks if added else (), removed=networks if removed else (),
                       before=rest_of(old_lines[head - 1] if head else None),
                       after=rest_of(outside[0] if outside else None))


def _position(lines: list[str], chain: str) -> tuple[Optional[str], int]:
    """The table the next line belongs to, and how many rules `chain` has before it."""
    table, count = None, 0
    prefix = f"-A {chain} "
    for line in lines:
        if line.startswith("*"):
            table, count = line[1:].strip(), 0
        elif line.startswith(prefix):
            count += 1
        elif line.startswith("COMMIT"):
            table = None
    return table, count
