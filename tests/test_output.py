"""OUTPUT with real connections: the locked-down host (examples/locked-down.v4) once in
the kernel's iptables-legacy and once in bpfilter (its egress program at TC egress, the
ingress one at XDP and at TC). Every connection must end the same way on both, and as the
ruleset says - but for one known difference: a packet OUTPUT refuses fails the kernel's
sending call with EPERM, while a drop at TC egress is silent to the sender."""

from __future__ import annotations

import pytest

from bpfilter.codegen import Attach
from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR, VethBed
from tests import sockets
from tests.conftest import EXAMPLES

LOCKED = (EXAMPLES / "locked-down.v4").read_text()

EXPECTED = {
    "server to port 80": "talked",  # NEW allowed out, its answers ESTABLISHED
    "server to port 25": "refused",  # REJECT with a reset at OUTPUT
    "server to port 8080": "timed out",  # OUTPUT's policy drops the SYN
    "client to port 22": "talked",  # the server's answers are ESTABLISHED at OUTPUT
    "client to port 23, nothing listens": "refused",  # the kernel's own reset goes out
    "client to port 8080": "timed out",  # INPUT's policy
    "server's DNS to a closed port": "refused (ICMP error delivered)",  # RELATED back
    "server's UDP to port 9": "not permitted",  # REJECT at OUTPUT: the send fails
    "server pings out": "answered",
    "client pings in": "answered",  # the echo reply is ESTABLISHED at OUTPUT
}
# The kernel fails a send that OUTPUT refuses with EPERM; at TC egress the send succeeds
# and the sender learns of the refusal from the ICMP error, as it would from the network.
KNOWN_DIFFERENCES = {"server's UDP to port 9": "refused (ICMP error delivered)"}


def _scenarios(bed: VethBed) -> dict[str, str]:
    sockets.route_to_server(bed)
    return {
        "server to port 80": sockets.tcp_exchange(bed.client, CLIENT_ADDR, bed.server, 80),
        "server to port 25": sockets.tcp_exchange(bed.client, CLIENT_ADDR, bed.server, 25),
        "server to port 8080": sockets.tcp_exchange(bed.client, CLIENT_ADDR, bed.server, 8080),
        "client to port 22": sockets.tcp_exchange(bed.server, SERVER_ADDR, bed.client, 22),
        "client to port 23, nothing listens": sockets.tcp_connect(bed.client, SERVER_ADDR, 23),
        "client to port 8080": sockets.tcp_exchange(bed.server, SERVER_ADDR, bed.client, 8080),
        "server's DNS to a closed port": sockets.udp_to_closed_port(bed.server, CLIENT_ADDR,
                                                                    53),
        "server's UDP to port 9": sockets.udp_to_closed_port(bed.server, CLIENT_ADDR, 9),
        "server pings out": sockets.ping(bed.server, CLIENT_ADDR),
        "client pings in": sockets.ping(bed.client, SERVER_ADDR),
    }


kernel_outcomes = sockets.kernel_outcomes_fixture(LOCKED, _scenarios, "bpfo")


def test_the_kernel_does_what_the_scenarios_expect(kernel_outcomes):
    assert kernel_outcomes == EXPECTED


@pytest.mark.parametrize("attach", list(Attach), ids=[a.value for a in Attach])
def test_locked_down_host_agrees_with_the_kernel(kernel, build_root, kernel_outcomes, attach):
    with sockets.bpfilter_bed(build_root / f"out-{attach.value}", LOCKED, "locked-down.v4",
                              attach, "bpfo") as (bed, (report,)):
        assert report.deployment.egress_prog_id
        assert _scenarios(bed) == {**kernel_outcomes, **KNOWN_DIFFERENCES}
