"""IPv6 rulesets: bpfilter on a real interface against ip6tables-legacy on its mirror, the
same frames to both (neighbour discovery, extension headers, ICMPv6 errors among them)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bpfilter.frontend import combine, parse_ruleset
from bpfilter.frontend.nft.save import save_nft
from tests.conftest import EXAMPLES
from tests.conformance.harness import SETTINGS, check_example, check_generated, count
from tests.conformance.rulesets import V6, large_acls, rulesets
from tests.packets import frames, frames6, interesting, routed_frames, sent_packets

GENERATED_RULESETS = count(18)
FORWARD_RULESETS = count(6)
OUTPUT_RULESETS = count(5)  # at each attach point
LARGE_ACLS = count(6)
FRAMES_PER_RULESET = 20
FRAMES_PER_EXAMPLE = 60


def _frames(ruleset):
    return frames6(interesting(ruleset), ("eth0",))


def test_example_conforms(mirror):
    check_example(mirror, "host-firewall.v6", _frames, FRAMES_PER_EXAMPLE)


def test_example_conforms_at_tc(tc_mirror):
    check_example(tc_mirror, "host-firewall.v6", _frames, FRAMES_PER_EXAMPLE)


def test_example_as_nft_conforms(mirror):
    """The same firewall as an nft table of family ip6, against the kernel's nftables."""
    text = save_nft(parse_ruleset((EXAMPLES / "host-firewall.v6").read_text(),
                                  "host-firewall.v6"))
    check_example(mirror, "host-firewall.v6 as nft", _frames, FRAMES_PER_EXAMPLE, text=text)


def _either(ruleset):
    """IPv4 or IPv6 frames, for a ruleset of both families."""
    values = interesting(ruleset)
    return st.one_of(frames(values, ("eth0",)), frames6(values, ("eth0",)))


def test_both_families_on_one_interface(mirror):
    """iptables' and ip6tables' firewalls in one program (`apply rules.v4 rules.v6`):
    IPv4 frames meet the first, IPv6 frames the second, as in the kernel."""
    text, _source = combine([((EXAMPLES / name).read_text(), name)
                             for name in ("host-firewall.v4", "host-firewall.v6")])
    check_example(mirror, "host-firewall.v4 + host-firewall.v6", _either,
                  2 * FRAMES_PER_EXAMPLE, text=text)


def test_inet_table_conforms(mirror):
    """One nft inet table for both families, against the kernel's nftables."""
    check_example(mirror, "dual-stack.nft", _either, 2 * FRAMES_PER_EXAMPLE)


def test_inet_table_conforms_at_tc(tc_mirror):
    check_example(tc_mirror, "dual-stack.nft", _either, FRAMES_PER_EXAMPLE)


def test_netdev_table_of_both_families_conforms(mirror):
    """edge.nft's netdev chain drops IPv4 and IPv6 sources before the ip table's INPUT."""
    check_example(mirror, "edge.nft", _either, FRAMES_PER_EXAMPLE)


@settings(max_examples=GENERATED_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_rulesets_conform(mirror, data):
    check_generated(mirror, data, rulesets(fam=V6), _frames, FRAMES_PER_RULESET)


@settings(max_examples=FORWARD_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_forward_rulesets_conform(router, data):
    """The servers route IPv6 on to the far namespace (2001:db8:f::/48)."""
    check_generated(router, data, rulesets(hook="FORWARD", fam=V6), routed_frames,
                    FRAMES_PER_RULESET)


@settings(max_examples=OUTPUT_RULESETS, **SETTINGS)
@given(data=st.data())
def test_generated_output_rulesets_conform(sender, data):
    """The servers send IPv6 packets themselves."""
    check_generated(sender, data, rulesets(hook="OUTPUT", fam=V6), sent_packets,
                    FRAMES_PER_RULESET, sent=True)


@settings(max_examples=LARGE_ACLS, **SETTINGS)
@given(data=st.data())
def test_large_generated_acls_conform(mirror, data):
    """Long lists of IPv6 sources or destinations, which bpfilter folds into one lookup
    (bf_prefixes6), overlapping prefixes cutting the runs."""
    check_generated(mirror, data, large_acls(V6), _frames, FRAMES_PER_RULESET)
