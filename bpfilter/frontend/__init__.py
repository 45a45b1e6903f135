"""Front-ends: ruleset text in, IR out. None of them knows anything of BPF."""

from __future__ import annotations

import re

from bpfilter.frontend.iptables.parser import parse_iptables_save
from bpfilter.frontend.nft.jsonformat import parse_nft_json
from bpfilter.frontend.nft.parser import parse_nft
from bpfilter.ir import Ruleset

# iptables-save text has a `*table` line before anything else that is not a comment; an
# nftables ruleset starts with a table block or a command.
_IPTABLES = re.compile(r"\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*\*", re.MULTILINE)


def dialect(text: str) -> str:
    """"iptables", "nft-json" (`nft -j list ruleset`) or "nft", told by content."""
    if _IPTABLES.match(text):
        return "iptables"
    return "nft-json" if text.lstrip().startswith("{") else "nft"


def parse_ruleset(text: str, source: str = "<stdin>") -> Ruleset:
    """Pick the front-end by content."""
    kind = dialect(text)
    if kind == "iptables":
        return parse_iptables_save(text, source)
    return parse_nft_json(text, source) if kind == "nft-json" else parse_nft(text, source)


__all__ = ["dialect", "parse_ruleset", "parse_iptables_save", "parse_nft", "parse_nft_json"]
