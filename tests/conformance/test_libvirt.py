"""examples/libvirt.v4, libvirt's default network as it writes it, on mirror routers
against the kernel's: the guests' network is the far one (virbr0 is eth1, 192.168.122.0/24
is 203.0.113.0/24). What a guest sends out is MASQUERADEd (ports 1024-65535), a new
connection from outside to a guest is REJECTed (LIBVIRT_FWI lets in only its answers),
field by field as the kernel's."""

from __future__ import annotations

from tests.conftest import EXAMPLES
from tests.conformance.harness import FAR_LISTENER
from tests.conformance.nat_flows import (ACCEPT_PORT, ECHO_PORT, from_the_far_end, snat_flow,
                                         sports)

RULES = (EXAMPLES / "libvirt.v4").read_text().replace("virbr0", "eth1").replace(
    "192.168.122.0/24", "203.0.113.0/24")


def test_a_libvirt_ruleset_runs_as_the_kernels(nat_router, far_peers):
    nat_router.load(RULES)
    kernel = from_the_far_end(nat_router.kernel)
    assert kernel and kernel[0] != FAR_LISTENER, kernel  # masqueraded
    assert from_the_far_end(nat_router.bpf) == kernel
    for kind, dst, port in (("syn", FAR_LISTENER, ACCEPT_PORT), ("udp", FAR_LISTENER,
                                                                  ECHO_PORT),
                            ("ping", FAR_LISTENER, 0)):
        sport = next(sports)
        kernel = snat_flow(nat_router.kernel, far_peers, kind, dst, port, sport)
        assert kernel[0], f"the kernel answers {kind} (a REJECT)"
        ours = snat_flow(nat_router.bpf, far_peers, kind, dst, port, sport)
        assert ours == kernel, f"{kind} to {dst}:{port}: kernel {kernel}, bpfilter {ours}"
