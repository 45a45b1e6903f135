"""nft netdev chains against the kernel's: every frame the device receives, ARP and IPv6
as well as IPv4, meets them (here with a drop policy), at XDP and at TC."""

from __future__ import annotations

import pytest

from tests.conformance.harness import check_example
from tests.conformance.test_ipv6 import _either

FRAMES = 60
BANNED = "02:de:ad:be:ef:01"  # examples/l2-guard.nft drops it


def _arp_outcomes(pair) -> list[tuple[bool, bool]]:
    """(kernel, bpfilter): whether each server answers ARP from the client and from the
    banned MAC."""
    return [(pair.kernel.arp_answered(mac), pair.bpf.arp_answered(mac))
            for mac in (pair.kernel.client_mac, BANNED)]


@pytest.mark.parametrize("attach", ["xdp", "tc"])
def test_default_drop_netdev_chain_conforms(request, attach):
    pair = request.getfixturevalue("mirror" if attach == "xdp" else "tc_mirror")
    check_example(pair, "l2-guard.nft", _either, FRAMES)
    assert _arp_outcomes(pair) == [(True, True), (False, False)]
