"""examples/docker.v4, Docker's rules as dockerd writes them, on mirror routers against
the kernel's: the published port (DNAT of what does not come from the bridge, then
FORWARD's DOCKER chain), the container's other ports and addresses (FORWARD DROP), its
answers (RELATED,ESTABLISHED), the host's own ports, field by field. (What the container
sends out, MASQUERADEd, is not exercised: the far end here only answers.)"""

from __future__ import annotations

from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR
from tests.conftest import EXAMPLES
from tests.conformance.harness import FAR_LISTENER
from tests.conformance.nat_flows import ACCEPT_PORT, ECHO_PORT, snat_flow, sports

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
