"""Front-ends: ruleset text in, IR out. None of them knows anything of BPF."""

from __future__ import annotations

from bpfilter.frontend.iptables.parser import parse_iptables_save
from bpfilter.ir import Ruleset


def parse_ruleset(text: str, source: str = "<stdin>") -> Ruleset:
    """Pick the front-end by content. Only iptables-save text exists so far."""
    return parse_iptables_save(text, source)


__all__ = ["parse_ruleset", "parse_iptables_save"]
