"""iptables-save / iptables-save -c text -> IR."""

from __future__ import annotations

import functools
import re

import lark

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.frontend.iptables import names
from bpfilter.frontend.iptables.options import RuleReader, Token
from bpfilter.resources import resource_dir


@functools.cache
def _grammar() -> lark.Lark:
    text = (resource_dir("grammar") / "iptables_save.lark").read_text()
    return lark.Lark(text, parser="lalr")  # (tokens carry their positions)


def _counters(tok: lark.Token) -> ir.Counters:
    packets, byte_count = tok.value[1:-1].split(":")
    return ir.Counters(int(packets), int(byte_count))


# One word as iptables-restore's add_param_to_argv() cuts it: plain characters, or plain
# characters then a quoted part (a backslash escapes the next character) that the closing
# quote ends.
_WORD = re.compile(r'([^ \t"]*)"((?:[^"\\]|\\.)*)"|[^ \t"]+')
_BLANKS = re.compile(r"[ \t]*")
_ESCAPED = re.compile(r"\\(.)")


def _arguments(args: lark.Token | None, source: str) -> list[Token]:
    """A rule's words as iptables-restore splits them (add_param_to_argv): only spaces and
    tabs separate words; a double quote opens a quoted part, in which a backslash escapes
    the next character, and the closing quote ends the word; '!' is a word of its own
    only where spaces make it one. A quote left open is refused (iptables would take the
    rest of the line)."""
    if args is None:
        return []
    tokens, text, pos = [], args.value, 0
    while True:
        pos = _BLANKS.match(text, pos).end()
        if pos == len(text):
            return tokens
        word = _WORD.match(text, pos)
        if word is None or (word[2] is None and text.startswith('"', word.end())):
            # (a quote that does not close stops the quoted form: the plain one stops there)
            raise InputError(source, args.line, text[pos:].split(" ")[0],
                             "unterminated quoted string", column=args.column + pos)
        value = word[0] if word[2] is None else word[1] + _ESCAPED.sub(r"\1", word[2])
        tokens.append(Token(value, args.line, args.column + pos))
        pos = word.end()


def parse_iptables_save(text: str, source: str = "<stdin>",
                        family: ir.Family = ir.Family.IPV4, skip=None) -> ir.Ruleset:
    """iptables-save text, or ip6tables-save text with `family` IPV6. `skip`: called with
    each rule's error instead of raising it (the rule is left out)."""
    try:
        tree = _grammar().parse(text if text.endswith("\n") else text + "\n")
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, text, source) from None
    tables: list[ir.Table] = []
    for node in tree.children:
        table = _table(node, source, family, skip)
        if any(t.name == table.name for t in tables):
            raise InputError(source, table.origin.line, "*" + table.name,
                             "table appears twice in one file")
        tables.append(table)
    return ir.Ruleset(family, tuple(tables), source)


def _table(node: lark.Tree, source: str, family: ir.Family, skip) -> ir.Table:
    header = node.children[0]
    name = header.value[1:]
    origin = ir.Origin(source, header.line, header.column)
    builtins = names.BUILTIN_CHAINS.get(name)
    if builtins is None:
        raise InputError(source, header.line, header.value, "unknown table",
                         ", ".join("*" + t for t in names.BUILTIN_CHAINS), header.column)
    declared: dict[str, ir.Chain] = {}
    rules: dict[str, list[ir.Rule]] = {}
    for child in node.children[1:]:
        if isinstance(child, lark.Token):  # COMMIT
            continue
        if child.data == "chain":
            chain = _chain_decl(child, source, builtins)
            if chain.name in declared:
                raise InputError(source, chain.origin.line, chain.name,
                                 "chain declared twice")
            declared[chain.name] = chain
            rules[chain.name] = []
        else:
            try:
                chain_tok, rule = _rule(child, source, name, family)
            except InputError as exc:
                if skip is None:
                    raise
                skip(exc)
                continue
            if chain_tok.value not in declared:
                raise InputError(source, chain_tok.line, chain_tok.value,
                                 *_undeclared(chain_tok.value, name, builtins),
                                 column=chain_tok.column)
            rules[chain_tok.value].append(rule)
    for builtin in builtins:  # iptables-restore keeps undeclared built-ins, policy ACCEPT
        if builtin not in declared:
            declared[builtin] = ir.Chain(builtin, (), ir.Verdict.ACCEPT)
            rules[builtin] = []
    chains = tuple(
        ir.Chain(c.name, tuple(rules[c.name]), c.policy, c.counters, c.origin,
                 *((ir.Hook(c.name), names.builtin_priority(name, c.name)) if c.builtin
                   else ()), nat=c.builtin and name == "nat")
        for c in declared.values()
    )
    return ir.Table(name, chains, origin, family=family)


def _undeclared(chain: str, table: str, builtins: tuple[str, ...]) -> tuple[str, str]:
    """Why a rule's chain has no declaration line, and what to write."""
    if chain in builtins:
        # iptables-restore keeps the running chain's policy then: unknown to bpfilter.
        return (f"built-in chain {chain} has no ':{chain} POLICY [0:0]' line before its "
                "rules: iptables-restore would keep whatever policy the kernel has now, which "
                "bpfilter cannot know",
                f"':{chain} ACCEPT [0:0]' or ':{chain} DROP [0:0]' in the *{table} block")
    return (f"no chain '{chain}' declared before this rule",
            f"':{chain} - [0:0]' in the *{table} block")


def _chain_decl(node: lark.Tree, source: str, builtins: tuple[str, ...]) -> ir.Chain:
    header, policy = node.children[0], node.children[1]
    counters = _counters(node.children[2]) if len(node.children) > 2 else None
    name = header.value[1:]
    origin = ir.Origin(source, header.line, header.column)
    if name in builtins:
        if policy.value not in ("ACCEPT", "DROP"):
            raise InputError(source, policy.line, policy.value,
                             f"built-in chain {name} needs a policy", "ACCEPT, DROP",
                             policy.column)
        return ir.Chain(name, (), ir.Verdict(policy.value), counters, origin)
    if policy.value != "-":
        raise InputError(source, policy.line, policy.value,
                         f"'{name}' is not a built-in chain of this table, so it has no "
                         "policy", "'-' for user-defined chains", policy.column)
    if len(name) > 28:
        raise InputError(source, header.line, name, "chain names are at most 28 characters")
    return ir.Chain(name, (), None, counters, origin)


def _rule(node: lark.Tree, source: str, table: str,
          family: ir.Family) -> tuple[lark.Token, ir.Rule]:
    children = list(node.children)
    counters = _counters(children.pop(0)) if children[0].type == "COUNTERS" else None
    append, chain = children[0], children[1]
    tokens = _arguments(children[2] if len(children) > 2 else None, source)
    origin = ir.Origin(source, append.line, append.column)
    matches, target = RuleReader(tokens, source, table, family).read()
    for match in matches:
        if isinstance(match, ir.InterfaceMatch) and chain.value in _NO_INTERFACE[match.direction]:
            option = next(t for t in tokens if t.value in _INTERFACE_OPTIONS[match.direction])
            raise InputError(source, option.line, option.value,
                             f"can't use {option.value} with {chain.value}: a packet there has "
                             f"no {'output' if match.direction == 'out' else 'input'} "
                             "interface (iptables refuses it)", column=option.column)
    return chain, ir.Rule(matches, target, origin, counters)


# The built-in chains whose packets have no input (or output) interface yet.
_NO_INTERFACE = {"out": ("INPUT", "PREROUTING"), "in": ("OUTPUT", "POSTROUTING")}
_INTERFACE_OPTIONS = {"in": ("-i", "--in-interface"), "out": ("-o", "--out-interface")}


def _syntax_error(exc: lark.exceptions.UnexpectedInput, text: str, source: str) -> InputError:
    line = getattr(exc, "line", 0) or 0
    column = getattr(exc, "column", 0) or 0
    token = getattr(exc, "token", None)
    if isinstance(exc, lark.exceptions.UnexpectedEOF) or (
            token is not None and token.type in ("$END", "TABLE_HEADER")):
        opened = _open_table(text, line if token is not None and token.type != "$END"
                             else None)
        if opened is not None:
            last = line if token is not None and token.type != "$END" \
                else max(1, text.rstrip("\n").count("\n") + 1)
            return InputError(source, last, token.value if token is not None
                              and token.type != "$END" else "<end of file>",
                              f"table '{opened[1]}' opened at line {opened[0]} is not "
                              "closed by COMMIT (file truncated?)",
                              column=0 if token is None or token.type == "$END" else column)
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        bad = text.split("\n")[line - 1][column - 1:].split(" ")[0] if line else "?"
        return InputError(source, line, bad, "unexpected text",
                          "'*table', ':CHAIN POLICY [p:b]', '-A CHAIN ...', 'COMMIT', "
                          "'# comment'", column)
    value = token.value if token is not None else "?"
    if "\r" in (text.split("\n")[line - 1] if 0 < line <= text.count("\n") + 1 else ""):
        return InputError(source, line, "\\r", "a carriage return (CRLF line ends?): "
                          "iptables-restore refuses them too", "LF line ends (dos2unix)",
                          column)
    return InputError(source, line, value.strip() or "<newline>",
                      "unexpected here", "'*table', ':CHAIN POLICY [p:b]', "
                      "'-A CHAIN ...', 'COMMIT'", column)


def _open_table(text: str, before_line) -> tuple[int, str] | None:
    """The last `*table` line before the error that has no COMMIT after it."""
    opened = None
    for number, raw in enumerate(text.split("\n"), 1):
        if before_line is not None and number >= before_line:
            break
        stripped = raw.strip()
        if stripped.startswith("*"):
            opened = (number, stripped)
        elif stripped == "COMMIT":
            opened = None
    return opened
