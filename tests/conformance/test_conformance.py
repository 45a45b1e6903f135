"""bpfilter on a real interface against iptables-legacy on its mirror: generated rulesets
and frames, and the examples. Every frame must meet the same fate on both sides."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfilter.codegen import Attach
from bpfilter.passes import classify
from bpfilter.frontend.iptables.save import save
from tests.conformance.harness import SETTINGS, MirrorPair, check, check_example
from tests.conformance.rulesets import large_acls, rulesets
from tests.packets import frames, interesting
GENERATED_RULESETS = 100
LARGE_ACLS = 15
LARGE_MIXED = 10
FRAMES_PER_RULESET = 20
FRAMES_PER_EXAMPLE = 60


def _mirror(tmp_path_factory, attach: Attach):
    from tests.conftest import need_kernel

    need_kernel()
    pair = MirrorPair(tmp_path_factory.mktemp(f"conformance-{attach.value}"), attach)
    yield pair
    pair.print_table()
    pair.close()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    yield from _mirror(tmp_path_factory, Attach.XDP)


@pytest.fixture(scope="module")
def tc_mirror(tmp_path_factory):
    yield from _mirror(tmp_path_factory, Attach.TC)


@pytest.fixture(params=["code", "data"])
def as_data(request, monkeypatch):
    """Both ways bpfilter compiles a chain: straight-line code, and classifier data
    (forced here even for small rulesets, which would otherwise stay code)."""
    if request.param == "data":
        monkeypatch.setattr(classify, "CLASSIFY_MIN", 0)
        monkeypatch.setattr(classify, "SEGMENT_MIN", 1)
    return request.param


@pytest.mark.parametrize("name", ["host-firewall.v4", "user-chains.v4", "stateful-host.v4"])
def test_examples_conform(mirror, name, as_data):
    _examples_conform(mirror, name)


@pytest.mark.parametrize("name", ["host-firewall.v4", "user-chains.v4", "stateful-host.v4"])
def test_examples_conform_at_tc(tc_mirror, name):
    _examples_conform(tc_mirror, name)


def _examples_conform(mirror: MirrorPair, name: str) -> None:
    check_example(mirror, name, lambda ruleset: frames(interesting(ruleset), ("eth0",)),
                  FRAMES_PER_EXAMPLE)


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_rulesets_conform(mirror, as_data, data):
    ruleset = data.draw(rulesets(), label="ruleset")
    text = save(ruleset)
    mirror.load(text)
    case_frames = data.draw(st.lists(frames(interesting(ruleset), ("eth0",)),
                                     min_size=FRAMES_PER_RULESET,
                                     max_size=FRAMES_PER_RULESET), label="frames")
    check(mirror, text, ruleset, case_frames)


@settings(max_examples=LARGE_ACLS, **SETTINGS)
@given(data=st.data())
def test_large_generated_acls_conform(mirror, data):
    """Long address lists, which bpfilter folds into map lookups."""
    ruleset = data.draw(large_acls(), label="ruleset")
    text = save(ruleset)
    mirror.load(text)
    case_frames = data.draw(st.lists(frames(interesting(ruleset), ("eth0",)),
                                     min_size=FRAMES_PER_RULESET,
                                     max_size=FRAMES_PER_RULESET), label="frames")
    check(mirror, text, ruleset, case_frames)


@settings(max_examples=LARGE_MIXED, **SETTINGS)
@given(data=st.data())
def test_large_mixed_rulesets_conform(mirror, monkeypatch, data):
    """Hundreds of rules of every kind, which bpfilter turns into classifier data with
    bitsets of several words. Generated rules mix kinds the classifier leaves to code
    (MAC, fragments) more densely than real rulesets, so short segments are allowed."""
    monkeypatch.setattr(classify, "SEGMENT_MIN", 2)
    ruleset = data.draw(rulesets(most=400), label="ruleset")
    text = save(ruleset)
    mirror.load(text)
    case_frames = data.draw(st.lists(frames(interesting(ruleset), ("eth0",)),
                                     min_size=FRAMES_PER_RULESET * 2,
                                     max_size=FRAMES_PER_RULESET * 2), label="frames")
    check(mirror, text, ruleset, case_frames)
