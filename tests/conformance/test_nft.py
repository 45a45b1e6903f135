"""bpfilter's nftables front-end against the kernel's nftables: the same nft text loaded
on both mirrors (nft -f on one, bpfilter apply on the other), the same frames."""

from __future__ import annotations

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from bpfilter import netns
from bpfilter.errors import InputError
from bpfilter.frontend.nft.save import save_nft
from tests.conformance.harness import SETTINGS, check_example, check_generated
from tests.conformance.rulesets import layered, rulesets
from tests.conftest import EXAMPLES as FOLDER
from tests.conformance.test_conformance import EXAMPLES, _frames

NFT_EXAMPLES = ["host-firewall.nft"]
GENERATED_RULESETS = 40
LAYERED_RULESETS = 30
FRAMES_PER_RULESET = 20
FRAMES_PER_EXAMPLE = 60


def translated(text: str) -> str:
    """iptables-save text as nft text, by iptables' own translator."""
    return netns.run("iptables-restore-translate", "-f", "/dev/stdin", input=text).stdout


@pytest.mark.parametrize("name", NFT_EXAMPLES)
def test_nft_examples_conform(mirror, name, as_data):
    check_example(mirror, name, _frames, FRAMES_PER_EXAMPLE)


@pytest.mark.parametrize("name", NFT_EXAMPLES)
def test_nft_examples_conform_at_tc(tc_mirror, name):
    check_example(tc_mirror, name, _frames, FRAMES_PER_EXAMPLE)


@pytest.mark.parametrize("name", EXAMPLES)
def test_translated_examples_conform(mirror, name, tmp_path):
    """Each iptables example as iptables-restore-translate writes it in nft."""
    text = translated((FOLDER / name).read_text())
    check_example(mirror, name, _frames, FRAMES_PER_EXAMPLE // 2, text=text)


def _nft(ruleset) -> str:
    """The generated ruleset in nft, as `translate --to nft` prints it (a ruleset with
    what nft cannot say, e.g. CONNMARK under masks, is drawn again)."""
    try:
        return save_nft(ruleset)
    except InputError:
        reject()


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_nft_rulesets_conform(mirror, as_data, data):
    """Generated rulesets in nft: sets (multiport), field-by-field header reads, base
    chains and user chains."""
    check_generated(mirror, data, rulesets(), _frames, FRAMES_PER_RULESET, render=_nft)


@settings(max_examples=LAYERED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_layered_nft_rulesets_conform(mirror, data):
    """Three nft tables whose base chains run at the raw, mangle and filter priorities:
    the order across tables, NOTRACK before tracking, marks carried on; each mark value
    refused its own way at the end, so every packet's final mark shows."""
    check_generated(mirror, data, layered(readout=True), _frames, FRAMES_PER_RULESET,
                    render=_nft)
