"""How deep chains call each other, against the call stack of a BPF program.

The verifier allows 8 frames. The program's entry function is one, every chain that stays
code is one more (a jump or a goto is a call), and a walk of the classifier takes three
(its function, the bpf_loop callback, one step). The frames also share 512 bytes of stack:
the entry function holds the parsed packet (128 bytes), a chain function 16, the walk
about 290 (a copy of the packet and its return stack; the step); at the deepest a walk
can start the total is about 480 (measured with llvm-objdump) - what grows struct bf_pkt
or struct bf_walk must keep it under 512, or the verifier refuses the deepest rulesets
("combined stack size ... Too large"), as it did once for a generated one.
"""

from __future__ import annotations

from bpfilter import ir

MAX_FRAMES = 8  # the kernel's MAX_CALL_FRAMES
CHAIN_LEVEL_MAX = MAX_FRAMES - 1
CLASSIFIER_FRAMES = 3
# A chain at this level or above it can still start a classifier walk.
CLASSIFIER_LEVEL_MAX = CHAIN_LEVEL_MAX - CLASSIFIER_FRAMES


def chain_levels(table: ir.Table) -> dict[str, int]:
    """For each chain a built-in chain reaches, the most frames of chains it can run under
    (built-in chains: 1) if every chain were code. Chains turned into data only lower it,
    so it bounds the real depth. Counting stops past CHAIN_LEVEL_MAX + 1: that is enough
    to refuse the ruleset, and it bounds the work on chains that form a loop."""
    levels: dict[str, int] = {}

    def visit(name: str, level: int) -> None:
        if level <= levels.get(name, 0):
            return
        levels[name] = level
        if level > CHAIN_LEVEL_MAX:
            return
        for rule in table.chain(name).rules:
            if isinstance(rule.target, ir.JumpTarget):
                visit(rule.target.chain, level + 1)

    for chain in table.chains:
        if chain.builtin:
            visit(chain.name, 1)
    return levels
