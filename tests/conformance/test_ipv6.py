"""IPv6 rulesets: bpfilter on a real interface against ip6tables-legacy on its mirror, the
same frames to both (neighbour discovery, extension headers, ICMPv6 errors among them)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conformance.harness import SETTINGS, check_example, check_generated
from tests.conformance.rulesets import V6, rulesets
from tests.packets import frames6, interesting

GENERATED_RULESETS = 40
FRAMES_PER_RULESET = 20
FRAMES_PER_EXAMPLE = 60


def _frames(ruleset):
    return frames6(interesting(ruleset), ("eth0",))


def test_example_conforms(mirror):
    check_example(mirror, "host-firewall.v6", _frames, FRAMES_PER_EXAMPLE)


def test_example_conforms_at_tc(tc_mirror):
    check_example(tc_mirror, "host-firewall.v6", _frames, FRAMES_PER_EXAMPLE)


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_rulesets_conform(mirror, data):
    check_generated(mirror, data, rulesets(fam=V6), _frames, FRAMES_PER_RULESET)
