"""ferm's output for IPv6 (made by the ferm Debian ships, from its own example) on both
mirrors: read as IPv6, its rules meet IPv6 frames as ip6tables-legacy's do."""

from __future__ import annotations

from tests.conformance.harness import check_example
from tests.packets import family_frames
from tests.test_families import FERM_EXAMPLES, ferm


def test_ferm_ipv6_output_runs_against_ip6tables(mirror, tmp_path):
    text = ferm(tmp_path, FERM_EXAMPLES / "ipv6.ferm", "--domain", "ip6")
    check_example(mirror, "ipv6.ferm", family_frames, 40, text=text)
