"""examples/docker.v4, Docker's rules as dockerd writes them, on mirror routers against
the kernel's: the published port (DNAT of what does not come from the bridge, then
FORWARD's DOCKER chain), the container's other ports and addresses (FORWARD DROP), its
answers (RELATED,ESTABLISHED), the host's own ports, and what the container sends out
(MASQUERADE of the bridge's range), field by field."""

from __future__ import annotations

from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR
from tests.conftest import EXAMPLES
from tests.conformance.harness import FAR_LISTENER
from tests.conformance.nat_flows import (ACCEPT_PORT, ECHO_PORT, from_the_far_end, snat_flow,
                                         sports)

RULES = (EXAMPLES / "docker.v4").read_text()
FLOWS = (("syn", SERVER_ADDR, 8080),  # the published port: to the container's 8443
         ("syn", SERVER_ADDR, 8081),  # no such port: the host's own (nothing listens)
         ("syn", FAR_LISTENER, ACCEPT_PORT),  # straight to the container: FORWARD drops
         ("udp", FAR_LISTENER, ECHO_PORT),
         ("ping", SERVER_ADDR, 0), ("syn", SERVER_ADDR, 22))


def test_a_docker_ruleset_runs_as_the_kernels(nat_router, far_peers):
    nat_router.load(RULES)
    for kind, dst, port in FLOWS:
        sport = next(sports)
        kernel = snat_flow(nat_router.kernel, far_peers, kind, dst, port, sport)
        ours = snat_flow(nat_router.bpf, far_peers, kind, dst, port, sport)
        assert ours == kernel, f"{kind} to {dst}:{port}: kernel {kernel}, bpfilter {ours}"
        if (dst, port) == (SERVER_ADDR, 8080):
            assert kernel[-1] == (CLIENT_ADDR, "the client's"), "the container accepted it"


def test_what_the_container_sends_out_is_masqueraded_as_the_kernels(nat_router):
    nat_router.load(RULES)
    kernel = from_the_far_end(nat_router.kernel)
    assert kernel == (SERVER_ADDR, "its port"), kernel
    assert from_the_far_end(nat_router.bpf) == kernel
