"""examples/kube-proxy.v4 and .nft, kube-proxy's iptables and nftables modes as they write
them, on mirror routers against the kernel's: a ClusterIP service's connections spread over its three endpoints
in the kernel's proportions (-m statistic's ladder, or one numgen verdict map: a chi-square
bound on each side, not exact counts), each endpoint seeing the router's address (KUBE-MARK-MASQ, then
KUBE-POSTROUTING's MASQUERADE --random-fully); its NodePort at the router's address
(addrtype LOCAL); a UDP service; a service without endpoints (REJECT); and the router's
own connection to the ClusterIP (nat OUTPUT), all field by field as the kernel's."""

from __future__ import annotations

import socket
from collections import Counter

import pytest

from bpfilter.testbed import SERVER_ADDR, netns
from bpfilter.testbed.veth import ROUTER_LINK
from tests.conftest import EXAMPLES
from tests.conformance.nat_flows import ACCEPT_PORT, FarPeers, flow, snat_flow, sports

CLUSTER_IP, NODE_PORT = ("10.96.0.10", 443), 30443
ENDPOINTS = ("203.0.113.10", "203.0.113.11", "203.0.113.12")
CONNECTIONS = 45
# chi-square with two degrees of freedom: exceeded by chance once in 10,000 runs (a
# ladder that always takes the first endpoint scores 90)
CHI2_LIMIT = 18.4


def _spread(bed, peers: FarPeers) -> Counter:
    """Which endpoint each of CONNECTIONS new connections to the ClusterIP reached, and
    the source each endpoint saw (all must be the router's eth1 address)."""
    reached = Counter()
    for _ in range(CONNECTIONS):
        steps = flow(bed, "syn", *CLUSTER_IP, next(sports))
        accepted = peers.accepted(bed)
        assert accepted is not None, steps
        (peer, _port), (local, local_port) = accepted
        assert (peer, local_port) == (ROUTER_LINK, ACCEPT_PORT), accepted
        reached[local] += 1
    return reached


def _chi2(reached: Counter) -> float:
    expected = CONNECTIONS / len(ENDPOINTS)
    return sum((reached[e] - expected) ** 2 / expected for e in ENDPOINTS)


@pytest.mark.parametrize("mode", ["v4", "nft"], ids=["iptables", "nftables"])
def test_a_kube_proxy_ruleset_runs_as_the_kernels(nat_router, far_peers, mode):
    nat_router.load((EXAMPLES / f"kube-proxy.{mode}").read_text())
    spreads = [_spread(bed, far_peers) for bed in (nat_router.kernel, nat_router.bpf)]
    for reached in spreads:
        assert set(reached) <= set(ENDPOINTS) and _chi2(reached) < CHI2_LIMIT, spreads
    for kind, dst, port in (("syn", SERVER_ADDR, NODE_PORT), ("udp", "10.96.0.53", 53),
                            ("syn", "10.96.0.30", 80), ("syn", SERVER_ADDR, 30080)):
        sport = next(sports)
        kernel = snat_flow(nat_router.kernel, far_peers, kind, dst, port, sport)
        assert kernel[0], f"the kernel answers {kind} to {dst}:{port}"
        ours = snat_flow(nat_router.bpf, far_peers, kind, dst, port, sport)
        assert ours == kernel, f"{kind} to {dst}:{port}: kernel {kernel}, bpfilter {ours}"
    seen = []
    for bed in (nat_router.kernel, nat_router.bpf):  # the node's own connection
        with netns.entered(bed.server):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with tcp:
            tcp.settimeout(1.0)
            tcp.connect(CLUSTER_IP)
            peer = tcp.getpeername()
        accepted = far_peers.accepted(bed)
        seen.append((peer, accepted and (accepted[0][0], accepted[1][0] in ENDPOINTS)))
    assert seen == [(CLUSTER_IP, (ROUTER_LINK, True))] * 2, seen
