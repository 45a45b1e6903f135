"""Front-ends: ruleset text in, IR out. None of them knows anything of BPF."""

from __future__ import annotations

import re
from typing import Optional

from bpfilter.frontend import families
from bpfilter.frontend.iptables.parser import parse_iptables_save
from bpfilter.frontend.iptables.save import rule_text
from bpfilter.frontend.nft.jsonformat import parse_nft_json
from bpfilter.frontend.nft.parser import parse_nft
from bpfilter.frontend.nft.save import rule_text as nft_rule_text
from bpfilter.ir import Family, Rule, Ruleset, Table

# iptables-save text has a `*table` line before anything else that is not a comment; an
# nftables ruleset starts with a table block or a command.
_IPTABLES = re.compile(r"\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*\*", re.MULTILINE)


def dialect(text: str, source: str = "") -> str:
    """"iptables", "ip6tables", "nft-json" (`nft -j list ruleset`) or "nft", told by
    content: iptables-save text whose every section is IPv6's (families.py) is
    ip6tables'."""
    if _IPTABLES.match(text):
        found = families.sections(text, source)
        return "ip6tables" if all(s.family is Family.IPV6 for s in found) else "iptables"
    return "nft-json" if text.lstrip().startswith("{") else "nft"


def xtables_sections(text: str, source: str = "",
                     family: Optional[Family] = None) -> list[tuple[Family, str]]:
    """iptables-save text as its sections of one family each (families.py): iptables-save's
    output then ip6tables-save's (`cat rules.v4 rules.v6`), each told by its header
    comment or its content, or all of `family` when given. A section keeps its lines where
    they were, so that positions in it are positions in the whole."""
    return [(s.family, s.text) for s in families.sections(text, source, family)]


def combine(texts: list[tuple[str, str]],
            given: Optional[list[Optional[Family]]] = None) -> tuple[str, str]:
    """Several iptables-save and ip6tables-save files (text, name) as one text, each
    behind the header comment that tells its family (`given`: the user's, per file); and
    a name for them all."""
    given = given or [None] * len(texts)
    if len(texts) == 1 and given[0] is None:
        return texts[0]
    parts = []
    for (text, source), family in zip(texts, given):
        tool = dialect(text, source) if family is None else \
            ("ip6tables" if family is Family.IPV6 else "iptables")
        parts.append(f"# {tool}-save text: {source}\n" + text
                     + ("" if text.endswith("\n") else "\n"))
    return "".join(parts), " + ".join(source for _text, source in texts)


_NFT_TABLE = re.compile(r"(?:^|[\s;{])table\s|\"table\"")


def holds_tables(text: str) -> bool:
    """Whether the text can hold a table at all (without parsing it): an empty, blank or
    comment-only text holds none. iptables-restore changes nothing for such a text, where
    a ruleset without tables would replace the running one with no filtering."""
    if _IPTABLES.match(text):
        return True
    lines = [line for line in text.split("\n") if line.strip() and
             not line.lstrip().startswith("#")]
    return any(_NFT_TABLE.search(line) for line in lines)


def parse_ruleset(text: str, source: str = "<stdin>", skip=None,
                  family: Optional[Family] = None) -> Ruleset:
    """Pick the front-end by content. iptables-save text may hold both families
    (xtables_sections): their tables make one ruleset; `family`, when given, is the user's
    word for all of it. `skip`: called with the error of each rule the front-end cannot
    read, which is then left out (else it is raised)."""
    kind = dialect(text, source)
    if kind in ("iptables", "ip6tables"):
        parsed = [parse_iptables_save(section, source, found, skip)
                  for found, section in xtables_sections(text, source, family)]
        tables = tuple(t for ruleset in parsed for t in ruleset.tables)
        return Ruleset(parsed[0].family, tables, source)
    reader = parse_nft_json if kind == "nft-json" else parse_nft
    return reader(text, source, skip)


def rule_words(table: Table, chain: str, rule: Rule) -> str:
    """A rule in its ruleset's own words: iptables' options, or nft's expressions."""
    if table.xtables:
        return rule_text(chain, rule, table.family).removeprefix(f"-A {chain} ")
    return nft_rule_text(rule, family=table.family, netdev=table.netdev)


__all__ = ["combine", "dialect", "parse_ruleset", "xtables_sections", "parse_iptables_save",
           "parse_nft", "parse_nft_json", "rule_words"]
