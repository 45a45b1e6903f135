"""nftables ruleset text (`nft list ruleset`, `nft -f` scripts) -> IR.

The grammar (grammar/nft.lark) gives statements, blocks and anonymous sets; this module
reads the structure (tables, chains, sets, commands) and leaves each rule's words to
rule.py. Only what the IR can say is accepted: families ip, ip6, inet (both at once) and
netdev (its ingress chain runs first at PREROUTING), filter and route chains at the five
IP hooks; anything else is an error at its line and column.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import lark

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.frontend.nft import names
from bpfilter.frontend.nft.rule import NamedSet, RuleReader
from bpfilter.frontend.nft.words import Item, SetLiteral, Word, error_at, word_of
from bpfilter.resources import resource_dir


class _Braces:
    """Post-lexer: a `{` after a table, chain, set or map header (`table ip t {`,
    `add chain ip t c {`) opens a block whose lines are statements; any other `{` opens an
    anonymous set, inside which a newline does not end the statement."""

    always_accept = ("LBRACE", "RBRACE", "_NL")

    def process(self, stream: Iterator[lark.Token]) -> Iterator[lark.Token]:
        stack: list[str] = []  # "block" | "set"
        line: list[str] = []  # the words of the statement so far
        for tok in stream:
            if tok.type == "_NL" or tok.value == ";":
                if stack and stack[-1] == "set":
                    continue
                line = []
            elif tok.type == "LBRACE":
                words = [w for w in line if w != "{"]
                header = (words[:1] and words[0] in names.BLOCKS) or (
                    words[:2] and words[0] in ("add", "create")
                    and words[1] in names.BLOCKS)
                kind = "block" if header and "{" not in line and not (
                    stack and stack[-1] == "set") else "set"
                stack.append(kind)
                tok = lark.Token.new_borrow_pos("LBLOCK" if kind == "block" else "LSET",
                                                tok.value, tok)
                line = [] if kind == "block" else line + ["{"]
            elif tok.type == "RBRACE":
                kind = stack.pop() if stack else "block"
                tok = lark.Token.new_borrow_pos("RBLOCK" if kind == "block" else "RSET",
                                                tok.value, tok)
                if kind == "block":
                    line = []
            else:
                line.append(tok.value)
            yield tok


@functools.cache
def grammar() -> lark.Lark:
    text = (resource_dir("grammar") / "nft.lark").read_text()
    return lark.Lark(text, parser="lalr", postlex=_Braces())


@dataclass
class Statement:
    words: list[Item]
    block: Optional[list["Statement"]]
    line: int
    column: int


@dataclass
class _Chain:
    name: str
    origin: ir.Origin
    hook: Optional[ir.Hook] = None
    priority: int = 0
    policy: Optional[ir.Verdict] = None
    nat: bool = False
    rules: list[ir.Rule] = field(default_factory=list)
    counters: Optional[ir.Counters] = None
    device: Optional[str] = None  # a netdev chain's


@dataclass
class _Table:
    name: str
    origin: ir.Origin
    kind: str  # "ip", "ip6" or "netdev"
    chains: dict[str, _Chain] = field(default_factory=dict)
    sets: dict[str, NamedSet] = field(default_factory=dict)
    anonymous: int = 0  # chains made for rules with several statements


def _items(children, source: str) -> list[Item]:
    items: list[Item] = []
    for child in children:
        if isinstance(child, lark.Tree):
            elements: list[list[Item]] = [[]]
            for part in _items(child.children[1:-1], source):
                if isinstance(part, Word) and part.value == ",":
                    elements.append([])
                else:
                    elements[-1].append(part)
            opening = child.children[0]
            items.append(SetLiteral(tuple(tuple(e) for e in elements if e),
                                    Word(opening.value, opening.line, opening.column)))
        elif child.type in ("LSET", "RSET"):
            continue
        else:
            value = child.value
            if child.type == "STRING":
                value = child.value[1:-1].replace('\\"', '"')
            items.append(Word(value, child.line, child.column, child.type == "STRING"))
    return items


def _statements(tree: lark.Tree, source: str) -> list[Statement]:
    result = []
    for node in tree.children:
        if not isinstance(node, lark.Tree) or node.data != "statement":
            continue
        block = node.children[-1] if isinstance(node.children[-1], lark.Tree) and \
            node.children[-1].data == "block" else None
        words = _items(node.children[:-1] if block is not None else node.children, source)
        first = word_of(words[0])
        result.append(Statement(words, _statements(block, source) if block is not None
                                else None, first.line, first.column))
    return result


class NftReader:
    def __init__(self, source: str, skip=None):
        """`skip`: called with each rule's error instead of raising it (the rule is left
        out: compile --ignore-unsupported)."""
        self.source = source
        self.skip = skip
        self.tables: dict[tuple[str, str], _Table] = {}

    def error(self, word: Item, why: str, supported: Optional[str] = None) -> InputError:
        return error_at(self.source, word, why, supported)

    def _word(self, statement: Statement, index: int, what: str) -> Word:
        if index >= len(statement.words) or not isinstance(statement.words[index], Word):
            raise self.error(statement.words[min(index, len(statement.words)) - 1],
                             f"{what} expected after this")
        return statement.words[index]

    # ------------------------------------------------------------------ top level

    def read(self, statements: list[Statement]) -> None:
        for statement in statements:
            head = statement.words[0]
            verb = head.value if isinstance(head, Word) else ""
            if verb == "table":
                table = self._table_header(statement, 1)
                self._table_body(table, statement.block or [])
            elif verb in ("add", "create", "insert"):
                self._command(statement)
            elif verb == "flush" and len(statement.words) == 2 and \
                    statement.words[1].value == "ruleset":
                self.tables.clear()
            else:
                raise self.error(head, "unknown or unsupported command",
                                 "table blocks, add/create/insert commands, flush ruleset")

    def _family_and_name(self, statement: Statement, index: int) -> tuple[str, Word, int]:
        """`[family] name` at `index`: the family, the name word, and where the statement
        goes on."""
        first = self._word(statement, index, "a table name")
        if first.value in names.FAMILIES:
            if first.value not in names.TABLE_FAMILIES:
                raise self.error(first, f"tables of family {first.value} are not "
                                 "supported yet (arp and bridge see other frames)",
                                 "families ip, ip6, inet, netdev")
            return first.value, self._word(statement, index + 1, "a table name"), index + 2
        return "ip", first, index + 1

    def _table_header(self, statement: Statement, index: int) -> _Table:
        family, name, _ = self._family_and_name(statement, index)
        key = (family, name.value)
        if key not in self.tables:
            self.tables[key] = _Table(name.value, ir.Origin(self.source, name.line,
                                                            name.column), family)
        return self.tables[key]

    def _table_body(self, table: _Table, body: list[Statement]) -> None:
        for statement in body:
            head = statement.words[0]
            kind = head.value if isinstance(head, Word) else ""
            if kind == "chain":
                chain = self._chain(table, self._word(statement, 1, "a chain name"))
                self._chain_body(table, chain, statement.block or [])
            elif kind in ("set", "map"):
                self._set(table, self._word(statement, 1, "a set name"), statement)
            elif kind in ("flags", "comment"):
                continue
            else:
                raise self.error(head, "unexpected in a table", "chain, set, map")

    def _command(self, statement: Statement) -> None:
        verb, what = statement.words[0], self._word(statement, 1, "table, chain, rule, ...")
        if what.value == "table":
            table = self._table_header(statement, 2)
            self._table_body(table, statement.block or [])
            return
        if what.value not in ("chain", "rule", "set", "map", "element"):
            raise self.error(what, "unsupported command",
                             "add table, add chain, add rule, insert rule, add set, "
                             "add map, add element")
        family, name, at = self._family_and_name(statement, 2)
        table = self.tables.get((family, name.value))
        if table is None:
            raise self.error(name, f"no table '{name.value}' (add it first)")
        target = self._word(statement, at, f"a {what.value} name")
        if what.value == "chain":
            self._chain_body(table, self._chain(table, target), statement.block or [])
        elif what.value in ("set", "map"):
            self._set(table, target, statement)
        elif what.value == "element":
            named = self._named(table, target)
            named.add(statement.words[at + 1:], self)
        else:
            chain = table.chains.get(target.value)
            if chain is None:
                raise self.error(target, f"no chain '{target.value}' in table "
                                 f"'{table.name}'")
            words = statement.words[at + 1:]
            if words[:1] and isinstance(words[0], Word) and words[0].value in (
                    "position", "handle", "index"):
                raise self.error(words[0], "rule positions are not supported",
                                 "add rule (append) and insert rule (prepend)")
            rules = self._rules(table, chain, words, statement)
            if verb.value == "insert":
                chain.rules[0:0] = rules
            else:
                chain.rules.extend(rules)

    def _named(self, table: _Table, word: Word) -> NamedSet:
        named = table.sets.get(word.value)
        if named is None:
            raise self.error(word, f"no set or map '{word.value}' in table '{table.name}'")
        return named

    # ------------------------------------------------------------------ chains, sets

    def _chain(self, table: _Table, name: Word) -> _Chain:
        if name.value not in table.chains:
            table.chains[name.value] = _Chain(
                name.value, ir.Origin(self.source, name.line, name.column))
        return table.chains[name.value]

    def _chain_body(self, table: _Table, chain: _Chain, body: list[Statement]) -> None:
        for statement in body:
            head = statement.words[0]
            kind = head.value if isinstance(head, Word) else ""
            if kind == "type":
                self._chain_type(table, chain, statement)
            elif kind == "policy":
                policy = self._word(statement, 1, "accept or drop")
                if policy.value not in ("accept", "drop"):
                    raise self.error(policy, "unknown policy", "accept, drop")
                chain.policy = ir.Verdict(policy.value.upper())
            elif kind == "comment" and len(statement.words) == 2:
                continue
            else:
                chain.rules.extend(self._rules(table, chain, statement.words, statement))

    def _chain_type(self, table: _Table, chain: _Chain, statement: Statement) -> None:
        words = [w for w in statement.words if isinstance(w, Word)]
        hooks = names.NETDEV_HOOKS if table.kind == "netdev" else names.HOOKS
        kind = self._word(statement, 1, "a chain type")
        if kind.value not in ("filter", "route", "nat"):
            raise self.error(kind, "unknown chain type", "filter, route, nat")
        chain.nat = kind.value == "nat"
        at = 2
        while at < len(words):
            key = words[at]
            if key.value == "hook":
                hook = self._word(statement, at + 1, "a hook")
                if hook.value not in hooks:
                    raise self.error(hook, f"hook not supported in a {table.kind} table",
                                     ", ".join(hooks))
                chain.hook = hooks[hook.value]
                at += 2
            elif key.value == "priority":
                chain.priority, at = self._priority(words, at + 1, statement)
            elif key.value == "device" and table.kind == "netdev":
                chain.device = self._word(statement, at + 1, "a device name").value
                at += 2
            else:
                raise self.error(key, "unexpected in a chain's type",
                                 "hook, device, priority" if table.kind == "netdev"
                                 else "hook, priority")
        if chain.hook is None:
            raise self.error(kind, "a base chain needs a hook", ", ".join(hooks))
        if table.kind == "netdev" and chain.device is None:
            raise self.error(kind, "a netdev chain needs its device", 'device "eth0"')
        if chain.policy is None:
            chain.policy = ir.Verdict.ACCEPT

    def _priority(self, words: list[Word], at: int, statement: Statement) -> tuple[int, int]:
        first = self._word(statement, at, "a priority")
        value = names.PRIORITIES.get(first.value)
        if value is None:
            try:
                value = int(first.value, 0)
            except ValueError:
                raise self.error(first, "unknown priority",
                                 ", ".join(names.PRIORITIES) + " or a number") from None
        at += 1
        if at + 1 < len(words) and words[at].value in ("+", "-"):
            offset = int(words[at + 1].value, 0)
            value += offset if words[at].value == "+" else -offset
            at += 2
        elif at < len(words) and words[at].value[:1] in "+-" and words[at].value[1:].isdigit():
            value += int(words[at].value)
            at += 1
        return value, at

    def _set(self, table: _Table, name: Word, statement: Statement) -> None:
        kind = statement.words[0] if statement.words[0].value in ("set", "map") else \
            statement.words[1]
        named = table.sets.setdefault(name.value, NamedSet(name.value, kind.value == "map",
                                                            name))
        for line in statement.block or []:
            head = line.words[0]
            if not isinstance(head, Word):
                continue
            if head.value == "type":
                named.set_type(line.words[1:], self)
            elif head.value == "elements":
                named.add(line.words[2:], self)
            elif head.value == "auto-merge":
                named.auto_merge = True
            elif head.value in ("flags", "size", "comment", "policy", "counter"):
                continue
            else:
                raise self.error(head, "not supported in a set",
                                 "type, flags, elements, size, comment, auto-merge")

    # ------------------------------------------------------------------ rules

    def _rules(self, table: _Table, chain: _Chain, words: list[Item],
               statement: Statement) -> list[ir.Rule]:
        try:
            return self._read_rules(table, chain, words, statement)
        except InputError as exc:
            if self.skip is None:
                raise
            self.skip(exc)
            return []

    def _read_rules(self, table: _Table, chain: _Chain, words: list[Item],
                    statement: Statement) -> list[ir.Rule]:
        origin = ir.Origin(self.source, statement.line, statement.column)
        reader = RuleReader(words, self.source, table.sets, table.name,
                            names.TABLE_FAMILIES[table.kind], frames=table.kind == "netdev")
        rules, statements = reader.read(origin)
        if table.kind == "netdev":
            rules = [_ip_guarded(r) for r in rules]
        if statements is not None:
            # Several statements (log then drop, a mark then accept): a chain of their
            # own, called when the rule matches, runs them in order. Only the last can be
            # a verdict (rule.py); return or goto there would leave the wrong chain.
            last = statements[-1].target
            if isinstance(last, ir.ReturnTarget) or (isinstance(last, ir.JumpTarget)
                                                     and last.goto):
                raise self.error(reader.first_statement,
                                 "return or goto after another statement is not supported",
                                 "statements, then accept, drop, reject or jump")
            body = self._add_chain(table, chain, origin, _guarded(statements))
            rules = [ir.Rule(r.matches, ir.JumpTarget(body), r.origin, r.counters)
                     for r in rules]
        if reader.may_overlap and len(rules) > 1 and \
                not all(_final(r.target) for r in rules):
            # A packet in several elements of the set must meet the statements once: the
            # elements' rules go on to them by goto, from a chain the rule calls.
            bodies: dict[ir.Target, str] = {}
            choices = [ir.Rule(r.matches, self._goto(table, chain, r, bodies), r.origin,
                               r.counters) for r in rules]
            rules = [ir.Rule((), ir.JumpTarget(self._add_chain(table, chain, origin, choices)),
                             origin)]
        return rules

    def _at_ingress(self, chain: _Chain) -> ir.Chain:
        """A netdev ingress chain: every frame its device receives."""
        return ir.Chain(chain.name, tuple(chain.rules), chain.policy, chain.counters,
                        chain.origin, ir.Hook.INGRESS, chain.priority, chain.device)

    def _goto(self, table: _Table, chain: _Chain, rule: ir.Rule,
              bodies: dict[ir.Target, str]) -> ir.Target:
        if _final(rule.target):
            return rule.target
        if isinstance(rule.target, ir.JumpTarget):
            return ir.JumpTarget(rule.target.chain, goto=True)
        if rule.target not in bodies:
            bodies[rule.target] = self._add_chain(table, chain, rule.origin,
                                                  [ir.Rule((), rule.target, rule.origin)])
        return ir.JumpTarget(bodies[rule.target], goto=True)

    def _add_chain(self, table: _Table, chain: _Chain, origin: ir.Origin,
                   rules: list[ir.Rule]) -> str:
        name = ""
        while not name or name in table.chains:
            table.anonymous += 1
            name = f"{chain.name}.{table.anonymous}"  # a name nft and iptables both take
        table.chains[name] = _Chain(name, origin, rules=list(rules))
        return name

    def ruleset(self) -> ir.Ruleset:
        tables = []
        for table in self.tables.values():
            chains = []
            for chain in table.chains.values():
                base = chain.hook is not None and (not chain.nat or chain.rules)
                chains.append(ir.Chain(chain.name, tuple(chain.rules),
                                       chain.policy if base else None, chain.counters,
                                       chain.origin, chain.hook if base else None,
                                       chain.priority, nat=chain.nat) if chain.device is None
                              else self._at_ingress(chain))
            tables.append(ir.Table(table.name, tuple(chains), table.origin, xtables=False,
                                   family=names.TABLE_FAMILIES[table.kind]))
        v6 = tables and all(t.family is ir.Family.IPV6 for t in tables)
        return ir.Ruleset(ir.Family.IPV6 if v6 else ir.Family.IPV4, tuple(tables),
                          self.source)


# A packet with a connection (not INVALID, not UNTRACKED).
_HAS_CONNECTION = ir.ConntrackMatch(("NEW", "RELATED", "ESTABLISHED"))


def _guarded(statements: list[ir.Rule]) -> list[ir.Rule]:
    """`meta mark set ct mark` reads the connection's mark: without a connection nft
    stops the rule there (NFT_BREAK), so the statements after it need one."""
    guard: tuple[ir.Match, ...] = ()
    result = []
    for statement in statements:
        result.append(dataclasses.replace(statement, matches=guard + statement.matches))
        if isinstance(statement.target, ir.ConnmarkTarget) and \
                statement.target.mode is ir.ConnmarkMode.RESTORE:
            guard = (_HAS_CONNECTION,)
    return result


# What a frame of any protocol has: its device, addresses, EtherType, length, mark, and
# (at netdev ingress, before connection tracking) no connection: `ct state invalid`.
_FRAME_MATCHES = (ir.InterfaceMatch, ir.MacSourceMatch, ir.EtherTypeMatch, ir.MarkMatch,
                  ir.LimitMatch, ir.CommentMatch, ir.LengthMatch)


def _ip_guarded(rule: ir.Rule) -> ir.Rule:
    """A netdev rule that reads IP headers holds for IP frames only (nft's `meta l4proto`
    and payload dependencies): without a family test of its own it gets an EtherType one."""
    def frame_level(m: ir.Match) -> bool:
        return isinstance(m, _FRAME_MATCHES) or (
            isinstance(m, ir.ConntrackMatch) and m.only_states)

    if all(frame_level(m) for m in rule.matches) or any(
            isinstance(m, ir.FamilyMatch) and not m.negate for m in rule.matches):
        return rule
    guard = ir.EtherTypeMatch((ir.ETHERTYPE_IP, ir.ETHERTYPE_IPV6))
    return dataclasses.replace(rule, matches=(guard,) + rule.matches)


def _final(target: Optional[ir.Target]) -> bool:
    """Ends the chain's walk for the packet: the next rules are not reached."""
    return isinstance(target, (ir.VerdictTarget, ir.RejectTarget, ir.ReturnTarget)) or (
        isinstance(target, ir.JumpTarget) and target.goto)


# Braces and parentheses nest at most this deep (a table, a chain, a set in a rule and a
# few more): what nests deeper is refused where it does, before the parser recurses.
MAX_NESTING = 32
_OPENING, _CLOSING = "{(", "})"


def _check_nesting(text: str, source: str) -> None:
    depth, offset = 0, 0
    while offset < len(text):
        char = text[offset]
        if char in "\"#":  # a string or a comment: to its end
            end = text.find('"' if char == '"' else "\n", offset + 1)
            offset = len(text) if end < 0 else end + 1
            continue
        if char in _OPENING:
            depth += 1
            if depth > MAX_NESTING:
                raise InputError(source, text.count("\n", 0, offset) + 1, char,
                                 f"braces and parentheses nest more than {MAX_NESTING} "
                                 "deep here", "sets and blocks nested as nft lists them",
                                 offset - text.rfind("\n", 0, offset))
        elif char in _CLOSING:
            depth = max(0, depth - 1)
        offset += 1


def parse_nft(text: str, source: str = "<stdin>", skip=None) -> ir.Ruleset:
    _check_nesting(text, source)
    try:
        tree = grammar().parse(text if text.endswith("\n") else text + "\n")
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, text, source) from None
    reader = NftReader(source, skip)
    reader.read(_statements(tree, source))
    return reader.ruleset()


def _syntax_error(exc: lark.exceptions.UnexpectedInput, text: str, source: str) -> InputError:
    line = getattr(exc, "line", 0) or 0
    column = getattr(exc, "column", 0) or 0
    token = getattr(exc, "token", None)
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        rest = text.split("\n")[line - 1][column - 1:] if line else ""
        bad = (re.match(r"[^ \t]+", rest) or re.match(r".?", rest)).group() or "?"
        if not bad.isprintable():  # a vertical tab, a no-break space: named, not shown
            bad = repr(bad)[1:-1]
        return InputError(source, line, bad, "unexpected character", None, column)
    if token is None or token.type == "$END":
        return InputError(source, max(1, text.rstrip("\n").count("\n") + 1),
                          "<end of file>", "a '{' is not closed by '}'")
    return InputError(source, line, token.value.strip() or "<newline>", "unexpected here",
                      None, column)
