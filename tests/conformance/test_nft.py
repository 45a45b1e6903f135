"""bpfilter's nftables front-end against the kernel's nftables: the same nft text loaded
on both mirrors (nft -f on one, bpfilter apply on the other), the same frames."""

from __future__ import annotations

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from bpfilter.testbed import netns
from bpfilter.errors import InputError
from bpfilter.frontend import parse_ruleset
from bpfilter.frontend.iptables.save import save
from bpfilter.frontend.nft.save import save_nft
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.conformance.harness import SETTINGS, check, check_example, check_generated, count
from tests.conformance.nft_rulesets import nft_rulesets
from tests.conformance.rulesets import layered, rulesets
from tests.conftest import EXAMPLES as FOLDER
from tests.conformance.test_conformance import EXAMPLES, _frames

NFT_EXAMPLES = ["host-firewall.nft", "edge.nft"]
GENERATED_RULESETS = count(25)
LAYERED_RULESETS = count(20)
NFT_RULESETS = count(40)
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


def test_nft_json_example_conforms(mirror, namespace):
    """The example as `nft -j list ruleset` prints it, loaded as JSON on both sides."""
    space = namespace()
    netns.run("nft", "-f", str(FOLDER / "host-firewall.nft"), netns=space)
    document = netns.run("nft", "-j", "list", "ruleset", netns=space).stdout
    check_example(mirror, "host-firewall.nft", _frames, FRAMES_PER_EXAMPLE, text=document)


@pytest.mark.parametrize("name", EXAMPLES)
def test_translated_examples_conform(mirror, name, tmp_path):
    """Each iptables example as iptables-restore-translate writes it in nft."""
    text = translated((FOLDER / name).read_text())
    check_example(mirror, name, _frames, FRAMES_PER_EXAMPLE // 2, text=text)


def _nft(ruleset) -> str:
    """The generated ruleset in nft, as `translate --to nft` prints its iptables-save text
    (a ruleset with what nft cannot say, e.g. CONNMARK under masks, is drawn again)."""
    try:
        return save_nft(parse_ruleset(save(ruleset)))
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


@settings(max_examples=NFT_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_nft_native_rulesets_conform(mirror, data):
    """nft as nft users write it: tables with base chains at one hook and several
    priorities, named and anonymous sets, `!=` sets, verdict maps, concatenations, rules
    with several statements, goto and return (tests/conformance/nft_rulesets.py)."""
    check_generated(mirror, data, nft_rulesets(), _frames, FRAMES_PER_RULESET, render=None)


TRUNCATED = """table ip t {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp flags syn accept
        tcp dport 22 drop
        tcp sport 22 accept
        ip protocol tcp drop
        udp dport 53 accept
        udp sport 53 drop
        icmp type echo-request icmp code 0 drop
        icmp type echo-request accept
        ip protocol icmp drop
    }
}
"""


def test_truncated_transport_headers_conform(mirror):
    """nft reads each field of a transport header where it is: a TCP segment of 14 bytes
    has its flags, one of 2 its source port. Every length up to the whole header, each
    field's end turning the verdict over."""
    mirror.load(TRUNCATED)
    ruleset = parse_ruleset(TRUNCATED)
    headers = {6: bytes(TCP(sport=22, dport=22, flags="S")),
               17: bytes(UDP(sport=53, dport=53)), 1: bytes(ICMP(type=8, code=0))}
    cases = [("eth0", Ether() / IP(src="192.0.2.9", dst="198.18.0.1", proto=proto) /
              Raw(header[:length]))
             for proto, header in headers.items() for length in range(len(header) + 1)]
    check(mirror, TRUNCATED, ruleset, cases)
