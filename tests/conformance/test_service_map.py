"""The service map (bpfilter/passes/services.py, templates/services.h) against the
kernel: a kube-proxy ruleset of 2,500 ClusterIP services (examples/make_kube.py), whose
endpoints are the far network's addresses, on the mirror routers, in kube-proxy's
iptables and nftables modes. Connections to the first, a middle and the last service of
the dispatch run, to a service whose ladder has MAX_ENDPOINTS rungs (iptables: the last
one always taken, every other rung's probability is 0; nftables: a `numgen random mod
256` map whose endpoints all DNAT to that same address), to a service port nothing
serves and a TCP header too short for the port match: which endpoint each connection
reached and what the client got back, as the kernel's. Then the same flows with the
service rows' endpoint addresses off by one (a mutation) must disagree: the comparison
can see a wrong DNAT."""

from __future__ import annotations

import dataclasses
import struct

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpfilter.codegen import Attach, program
from bpfilter.testbed import CLIENT_ADDR, netns
from bpfilter.passes.services import MAX_ENDPOINTS
from examples.make_kube import kube_nat, kube_nft
from tests.conformance.nat_flows import flow, sports

SERVICES = 2500
LADDER = 7  # the service with MAX_ENDPOINTS rungs
COUNTS = [MAX_ENDPOINTS if i == LADDER else 1 for i in range(SERVICES)]


def _endpoint(n: int) -> str:
    return f"203.0.113.{10 + n % 200}"


def _never_but_last(service: int, rung: int, count: int) -> float:
    return 0.0 if service == LADDER else 1 / (count - rung)


def _cluster_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def _expected(i: int) -> str:
    """The endpoint service i's connections reach: its only one, or its ladder's last."""
    return _endpoint(sum(COUNTS[:i + 1]) - 1)


def _ladder_as_one(n: int) -> str:
    """Endpoint n's address, the ladder's all that of its last (any draw reaches it)."""
    first = sum(COUNTS[:LADDER])
    return _expected(LADDER) if first <= n < first + MAX_ENDPOINTS else _endpoint(n)


RULESETS = {"iptables": kube_nat(SERVICES, counts=COUNTS, address=_endpoint, port=8443,
                                 chance=_never_but_last),
            "nftables": kube_nft(SERVICES, counts=COUNTS, address=_ladder_as_one, port=8443)}
PROBED = (0, 1, LADDER, SERVICES // 2, SERVICES - 1)


def _connections(bed, peers) -> list:
    seen = []
    for i in PROBED:
        steps = flow(bed, "syn", _cluster_ip(i), 80, next(sports))
        accepted = peers.accepted(bed)
        seen.append((i, accepted and accepted[1], len(steps)))
    return seen


def test_a_service_map_of_thousands_agrees_with_the_kernel(nat_router, far_peers,
                                                            monkeypatch):
    # nftables mode at XDP only: the program's service map is the same C at TC, where
    # iptables mode runs (a few seconds of the suite's budget)
    for mode in RULESETS if nat_router.attach is Attach.XDP else ["iptables"]:
        _agrees(nat_router, far_peers, monkeypatch, RULESETS[mode])


def _agrees(nat_router, far_peers, monkeypatch, ruleset: str) -> None:
    nat_router.load(ruleset)
    kernel = _connections(nat_router.kernel, far_peers)
    assert [(i, reached and reached[0]) for i, reached, _steps in kernel] == \
        [(i, _expected(i)) for i in PROBED], kernel
    assert _connections(nat_router.bpf, far_peers) == kernel
    # Nothing serves port 81 (routed back to the client: without ICMP redirects, which
    # the two routers' stacks send differently, for a reason not the service map's);
    # and a header too short for the port match to a served port.
    for bed in (nat_router.kernel, nat_router.bpf):
        for conf in ("all", "eth0"):
            netns.sysctl(bed.server, f"net.ipv4.conf.{conf}.send_redirects", "0")
    for port in (81, 80):
        segment = TCP(sport=next(sports), dport=port, flags="S")
        frame = Ether() / IP(src=CLIENT_ADDR, dst=_cluster_ip(1), proto=6) / \
            (segment if port == 81 else bytes(segment)[:12])
        kernel_outcome, ours = nat_router.compare(frame, {"service map"})
        assert ours == kernel_outcome, (port, kernel_outcome, ours)

    real = program.service_tables

    def off_by_one(runs, slots):  # every endpoint's address + 1 (ENDPOINT_FORMAT: 4th word)
        tables = real(runs, slots)
        rows = [row[:12] + struct.pack("<I", struct.unpack("<I", row[12:16])[0] + 1)
                + row[16:] for row in tables.endpoints]
        return dataclasses.replace(tables, endpoints=tuple(rows))

    with monkeypatch.context() as patched:
        patched.setattr(program, "service_tables", off_by_one)
        nat_router.load(ruleset)
        assert _connections(nat_router.bpf, far_peers) != kernel
