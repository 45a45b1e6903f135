"""One C generator per IR target. Every target first counts the rule: it matched."""

from __future__ import annotations

from typing import Callable, Optional

from bpfilter import ir

_REJECT_CODES = "BF_REJECT_TCP_RESET"


def target_lines(target: Optional[ir.Target], slot: str, builtin: bool,
                 functions: dict[str, str], to_policy: str) -> list[str]:
    """`to_policy` leaves for the built-in chain's policy: a goto in the chain function,
    a return code from a part of a long chain."""
    lines = [f"bf_count({slot}, p);"]
    if isinstance(target, ir.LogTarget):
        lines.append(f"bf_log_packet({slot}, p);")
    if target is None:
        return lines
    return lines + _TARGETS[type(target)](target, builtin, functions, to_policy)


def _verdict(t: ir.VerdictTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    return [f"return BF_{t.verdict.value};"]


def return_lines(builtin: bool, to_policy: str) -> list[str]:
    """Leave the chain for its caller; leaving a built-in chain applies its policy."""
    return [to_policy] if builtin else ["return BF_CONTINUE;"]


def _return(t: ir.ReturnTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    return return_lines(builtin, to_policy)


def _jump(t: ir.JumpTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    call = f"{functions[t.chain]}(p)"
    if t.goto and not builtin:
        return [f"return {call};"]
    # A jump comes back here; a goto from a built-in chain comes back to its policy.
    after = [to_policy] if t.goto else []
    return [f"{{ int v = {call}; if (v != BF_CONTINUE) return v; }}"] + after


def _reject(t: ir.RejectTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    code = t.with_.icmp_code
    value = _REJECT_CODES if code is None else str(code)
    return [f"p->reject_with = {value};", "return BF_REJECT;"]


def _log(t: ir.LogTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    return []  # the event needs the slot: see target_lines


_TARGETS: dict[type, Callable[..., list[str]]] = {
    ir.VerdictTarget: _verdict,
    ir.ReturnTarget: _return,
    ir.JumpTarget: _jump,
    ir.RejectTarget: _reject,
    ir.LogTarget: _log,
}
