"""OUTPUT: the servers of both mirrors send packets themselves (a raw socket), the kernel's
iptables-legacy filtering one, bpfilter's egress program the other. Every packet must
meet the same fate: it reaches the client or not, and the same replies (a REJECT's)
come back into the server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conformance.harness import SETTINGS, check_example, check_generated, count
from tests.conformance.rulesets import layered, rulesets
from tests.packets import sent_packets

GENERATED_RULESETS = count(14)
LAYERED_RULESETS = count(10)
PACKETS_PER_RULESET = 16
PACKETS_PER_EXAMPLE = 60


@pytest.mark.parametrize("name", ["locked-down.v4", "marks.v4"])
def test_examples_conform(sender, name):
    check_example(sender, name, sent_packets, PACKETS_PER_EXAMPLE, sent=True)


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_output_rulesets_conform(sender, data):
    check_generated(sender, data, rulesets(hook="OUTPUT"), sent_packets,
                    PACKETS_PER_RULESET, sent=True)


@settings(max_examples=LAYERED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_raw_mangle_filter_rulesets_conform(sender, data):
    """raw OUTPUT, mangle OUTPUT, filter OUTPUT, mangle POSTROUTING."""
    check_generated(sender, data, layered(hook="OUTPUT"), sent_packets,
                    PACKETS_PER_RULESET, sent=True)
