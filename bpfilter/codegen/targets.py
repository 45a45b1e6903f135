"""One C generator per IR target. Every target first counts the rule: it matched."""

from __future__ import annotations

from typing import Callable, Optional

from bpfilter import ir

_REJECT_CODES = "BF_REJECT_TCP_RESET"


def target_lines(target: Optional[ir.Target], slot: int, builtin: bool,
                 functions: dict[str, str]) -> list[str]:
    lines = [f"bf_count({slot}, p);"]
    if target is None:
        return lines
    return lines + _TARGETS[type(target)](target, slot, builtin, functions)


def _verdict(t: ir.VerdictTarget, slot: int, builtin: bool, functions) -> list[str]:
    return [f"return BF_{t.verdict.value};"]


def _return(t: ir.ReturnTarget, slot: int, builtin: bool, functions) -> list[str]:
    # RETURN from a built-in chain applies its policy.
    return ["goto policy;"] if builtin else ["return BF_CONTINUE;"]


def _jump(t: ir.JumpTarget, slot: int, builtin: bool, functions) -> list[str]:
    call = f"{functions[t.chain]}(p)"
    if t.goto and not builtin:
        return [f"return {call};"]
    # A jump comes back here; a goto from a built-in chain comes back to its policy.
    after = ["goto policy;"] if t.goto else []
    return [f"{{ int v = {call}; if (v != BF_CONTINUE) return v; }}"] + after


def _reject(t: ir.RejectTarget, slot: int, builtin: bool, functions) -> list[str]:
    code = t.with_.icmp_code
    value = _REJECT_CODES if code is None else str(code)
    return [f"p->reject_with = {value};", "return BF_REJECT;"]


def _log(t: ir.LogTarget, slot: int, builtin: bool, functions) -> list[str]:
    return [f"bf_log_packet({slot}, p);"]


_TARGETS: dict[type, Callable[..., list[str]]] = {
    ir.VerdictTarget: _verdict,
    ir.ReturnTarget: _return,
    ir.JumpTarget: _jump,
    ir.RejectTarget: _reject,
    ir.LogTarget: _log,
}
