"""Conformance at scale: rulesets of 3,000 to 20,000 rules against the kernel's
iptables-legacy and ip6tables-legacy, with frames aimed at rules in every position
(tests/conformance/scale.py). Each frame must meet the same fate on both sides, and after
all of them every rule's counter must be equal: a frame taken by the wrong rule shows
there even when the verdicts happen to agree.

The sizes are the suite's budget; BPFILTER_SCALE_SIZES (comma-separated) runs others,
e.g. 50000 for a longer run."""

from __future__ import annotations

import os
import random

import pytest

from bpfilter.runtime import deploy, state
from bpfilter.testbed import netns
from tests.conformance.harness import MirrorPair
from tests.conformance.scale import aimed, frames, generate, unmatched
from tests.kernel_oracle import counter_snapshot

# (seed, rules, family, mixed): IPv4 chains become classifier data, past the scan window
# (2,048 entries) several times; IPv6 ones stay code (parts of 32 rules) with their address
# runs folded, as many as a program holds.
SIZES = [(1, 3000, 4, True), (2, 8000, 4, True), (3, 20000, 4, True),
         (4, 3000, 6, False), (5, 12000, 6, False)]
if os.environ.get("BPFILTER_SCALE_SIZES"):
    SIZES = [(seed, int(n), 4, True) for seed, n in
             enumerate(os.environ["BPFILTER_SCALE_SIZES"].split(","), start=10)]
EXTRA_AIMS = 40


def _kernel_counters(pair: MirrorPair, version: int) -> dict:
    save = "iptables-legacy-save" if version == 4 else "ip6tables-legacy-save"
    text = netns.run(save, "-c", "-t", "filter", netns=pair.kernel.server).stdout
    return {k: v for k, v in counter_snapshot(text).items() if k[1] in ("INPUT", "SUB")}


def _our_counters(pair: MirrorPair, kernel: dict, version: int) -> dict:
    table = "filter" if version == 4 else "ip6 filter"  # Table.key
    with netns.entered(pair.bpf.server):
        paths = state.Paths("eth0", state.netns_id())
        with deploy.LiveCounters(paths, state.read(paths)) as live:
            return {key: live(table, *key[1:]).packets for key in kernel}


@pytest.mark.parametrize("seed,size,version,mixed", SIZES,
                         ids=[f"{n}-ipv{v}" for _s, n, v, _m in SIZES])
def test_large_rulesets_conform(mirror, seed, size, version, mixed):
    large = generate(seed, size, version, mixed)
    mirror.load(large.text)
    rng = random.Random(seed)
    sent = 0
    for k in aimed(large, rng, EXTRA_AIMS):
        for frame in frames(large, large.keys[k], rng):
            kernel, ours = mirror.compare(frame, {f"{size} rules, IPv{version}"})
            chain, index = large.positions[k]
            assert ours == kernel, (f"{frame.summary()} aimed at {chain} rule {index + 1} "
                                    f"of {size}: kernel {kernel}, bpfilter {ours}")
            sent += 1
    for frame in unmatched(version, rng):
        kernel, ours = mirror.compare(frame, {f"{size} rules, IPv{version}"})
        assert ours == kernel, f"{frame.summary()}: kernel {kernel}, bpfilter {ours}"
    theirs = _kernel_counters(mirror, version)
    mine = _our_counters(mirror, theirs, version)
    differ = {key: (theirs[key], mine[key]) for key in theirs if theirs[key] != mine[key]}
    assert not differ, f"counters (kernel, bpfilter) differ after {sent} frames: {differ}"
