"""One C generator per IR target. Every target first counts the rule: it matched."""

from __future__ import annotations

from typing import Callable, Optional

from bpfilter import ir

_REJECT_CODES = "BF_REJECT_TCP_RESET"


def target_lines(target: Optional[ir.Target], slot: str, builtin: bool,
                 functions: dict[str, str], to_policy: str) -> list[str]:
    """`to_policy` leaves for the built-in chain's policy: a goto in the chain function,
    a return code from a part of a long chain. `functions`: the C function of each chain
    of the rule's table."""
    lines = [f"bf_count({slot}, p);"]
    if isinstance(target, ir.LogTarget):
        lines.append(f"bf_log_packet({slot}, p);")
    if target is None:
        return lines
    return lines + _TARGETS[type(target)](target, builtin, functions, to_policy)


def uses_conntrack(target: Optional[ir.Target]) -> bool:
    """Targets that read or write the packet's connection."""
    return isinstance(target, (ir.ConnmarkTarget, *ir.NAT_TARGETS))


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
    if t.with_.family is None and t.with_ is not ir.RejectWith.TCP_RESET:
        v4, v6 = t.with_.icmp_codes  # icmpx: the packet's family's error
        value = f"p->family == 6 ? {v6} : {v4}"
    else:
        code = t.with_.icmp_code
        value = _REJECT_CODES if code is None else str(code)
    return [f"p->reject_with = {value};", "return BF_REJECT;"]


def _log(t: ir.LogTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    return []  # the event needs the slot: see target_lines


def _mark(t: ir.MarkTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    return [f"p->mark = (p->mark & 0x{~t.mask & 0xFFFFFFFF:x}) ^ 0x{t.value:x};"]


def _connmark(t: ir.ConnmarkTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    keep_ct, keep_nf = ~t.ctmask & 0xFFFFFFFF, ~t.nfmask & 0xFFFFFFFF
    if t.mode is ir.ConnmarkMode.RESTORE:
        change = f"p->mark = (p->mark & 0x{keep_nf:x}) ^ (p->ct_mark & 0x{t.ctmask:x});"
    else:
        bits = (f"0x{t.value:x}" if t.mode is ir.ConnmarkMode.SET
                else f"(p->mark & 0x{t.nfmask:x})")
        change = (f"p->ct_mark = (p->ct_mark & 0x{keep_ct:x}) ^ {bits}; "
                  "p->ct_mark_set = 1;")
    # A packet with no connection (INVALID, UNTRACKED) is left alone (xt_connmark).
    return [f"if (p->ct_state & BF_CT_CONN) {{ {change} }}"]


def _checksum(t: ir.ChecksumTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    return []  # the device finishes the checksum, as it does every other packet's


def _notrack(t: ir.NotrackTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    return ["p->ct_state = BF_CT_UNTRACKED;"]


def _dnat(t: ir.DnatTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    address = f"0x{int(t.address):08x}" if t.address is not None else "p->daddr"
    if t.last_address is not None:
        address = (f"bf_nat_pick({address}, 0x{int(t.last_address):08x}, p->saddr, "
                   f"p->daddr, {int(t.persistent)})")
    low, high = t.ports or (0, 0)
    if t.redirect:
        return [f"return bf_redirect(p, {low}, {high}, {int(t.random)});"]
    if t.ports is None:
        return [f"return bf_dnat(p, {address}, p->dport);"]
    if low == high and t.port_base is None:
        return [f"return bf_dnat(p, {address}, {low});"]
    return [f"return bf_dnat_range(p, {address}, {low}, {high}, {int(t.random)}, "
            f"{t.port_base or 0});"]


def _snat(t: ir.SnatTarget, builtin: bool, functions, to_policy: str) -> list[str]:
    address = 0 if t.address is None else int(t.address)
    last = address if t.last_address is None else int(t.last_address)
    low, high = t.ports or (0, 0)
    flags = [name for name, on in (("MASQUERADE", t.masquerade), ("RANDOM", t.random),
                                   ("RANDOM_FULLY", t.random_fully),
                                   ("PORTS", t.ports is not None),
                                   ("PERSISTENT", t.persistent)) if on]
    flags = " | ".join(f"BF_SNAT_{name}" for name in flags) or "0"
    return [f"return bf_snat(p, 0x{address:08x}, 0x{last:08x}, {low}, {high}, {flags});"]


_TARGETS: dict[type, Callable[..., list[str]]] = {
    ir.VerdictTarget: _verdict,
    ir.ReturnTarget: _return,
    ir.JumpTarget: _jump,
    ir.RejectTarget: _reject,
    ir.LogTarget: _log,
    ir.MarkTarget: _mark,
    ir.ConnmarkTarget: _connmark,
    ir.NotrackTarget: _notrack,
    ir.ChecksumTarget: _checksum,
    ir.DnatTarget: _dnat,
    ir.SnatTarget: _snat,
}
