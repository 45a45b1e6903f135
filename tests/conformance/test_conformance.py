"""bpfilter on a real interface against iptables-legacy on its mirror: generated rulesets
and frames, and the examples. Every frame must meet the same fate on both sides."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfilter.passes import classify
from tests.conformance.harness import (MirrorPair, SETTINGS, check_example,
                                       check_generated, count)
from tests.conformance.rulesets import large_acls, layered, rulesets
from tests.packets import frames, interesting
GENERATED_RULESETS = count(50)
LAYERED_RULESETS = count(20)
READOUT_RULESETS = count(30)
LARGE_ACLS = count(10)
LARGE_MIXED = count(7)
FRAMES_PER_RULESET = 20
FRAMES_PER_EXAMPLE = 60


EXAMPLES = ["host-firewall.v4", "user-chains.v4", "stateful-host.v4", "marks.v4"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_conform(mirror, name, as_data):
    _examples_conform(mirror, name)


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_conform_at_tc(tc_mirror, name):
    _examples_conform(tc_mirror, name)


def test_ufw_conforms(mirror):
    """Ubuntu's firewall as ufw writes it (examples/ufw.v4: -m recent limits, addrtype
    BROADCAST, limit-ed LOGs, a DROP policy)."""
    _examples_conform(mirror, "ufw.v4")


def _frames(ruleset):
    return frames(interesting(ruleset), ("eth0",))


def _examples_conform(mirror: MirrorPair, name: str) -> None:
    check_example(mirror, name, _frames, FRAMES_PER_EXAMPLE)


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_rulesets_conform(mirror, as_data, data):
    check_generated(mirror, data, rulesets(), _frames, FRAMES_PER_RULESET)


@settings(max_examples=LAYERED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_raw_mangle_filter_rulesets_conform(mirror, as_data, data):
    """raw PREROUTING, mangle PREROUTING, mangle INPUT, filter INPUT: marks and
    connection marks carried between tables and packets, NOTRACK."""
    check_generated(mirror, data, layered(), _frames, FRAMES_PER_RULESET)


@settings(max_examples=READOUT_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_marks_conform_to_the_bit(mirror, data):
    """The same, with filter INPUT refusing each mark value its own way: every packet's
    final mark shows, so each MARK, CONNMARK and mask on its way counts."""
    check_generated(mirror, data, layered(readout=True), _frames, FRAMES_PER_RULESET)


@settings(max_examples=LARGE_ACLS, **SETTINGS)
@given(data=st.data())
def test_large_generated_acls_conform(mirror, data):
    """Long address lists, which bpfilter folds into map lookups."""
    check_generated(mirror, data, large_acls(), _frames, FRAMES_PER_RULESET)


@settings(max_examples=LARGE_MIXED, **SETTINGS)
@given(data=st.data())
def test_large_mixed_rulesets_conform(mirror, monkeypatch, data):
    """Hundreds of rules of every kind, which bpfilter turns into classifier data with
    bitsets of several words. Generated rules mix kinds the classifier leaves to code
    (MAC, fragments) more densely than real rulesets, so short segments are allowed."""
    monkeypatch.setattr(classify, "SEGMENT_MIN", 2)
    check_generated(mirror, data, rulesets(most=400), _frames, FRAMES_PER_RULESET * 2)
