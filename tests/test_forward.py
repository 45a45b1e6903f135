"""FORWARD with real connections: the router example (examples/router.v4) on a router
between the client and a far namespace, once in the kernel's iptables-legacy and once in
bpfilter on both of the router's interfaces. Every connection attempt must end the same
way on both, and as the ruleset says."""

from __future__ import annotations

import pytest

from bpfilter.testbed import CLIENT_ADDR, FAR_NET, netns, SERVER_ADDR, VethBed
from bpfilter.codegen import Attach
from tests import sockets
from tests.conftest import EXAMPLES

ROUTER = (EXAMPLES / "router.v4").read_text()
FAR_HOST = "203.0.113.7"  # in FAR_NET, which the far namespace owns

EXPECTED = {
    "client to far port 80": "talked",  # NEW out, its answers ESTABLISHED
    "client to far port 8080": "refused",  # the router's TCP reset
    "far to client port 22": "refused",  # nothing new comes in from eth1
    "client's DNS to a closed far port": "refused (ICMP error delivered)",  # RELATED
    "client's UDP to far port 9": "refused (ICMP error delivered)",  # the router's REJECT
    "client pings far": "answered",
    "far pings client": "no answer",  # the policy drops it
}


def _scenarios(bed: VethBed) -> dict[str, str]:
    netns.run("ip", "route", "replace", SERVER_ADDR, "dev", "eth0", netns=bed.client)
    netns.run("ip", "route", "replace", FAR_NET, "via", SERVER_ADDR, "dev", "eth0",
              "onlink", netns=bed.client)
    return {
        "client to far port 80": sockets.tcp_exchange(bed.far, FAR_HOST, bed.client, 80),
        "client to far port 8080": sockets.tcp_exchange(bed.far, FAR_HOST, bed.client, 8080),
        "far to client port 22": sockets.tcp_exchange(bed.client, CLIENT_ADDR, bed.far, 22),
        "client's DNS to a closed far port": sockets.udp_to_closed_port(bed.client, FAR_HOST, 53),
        "client's UDP to far port 9": sockets.udp_to_closed_port(bed.client, FAR_HOST, 9),
        "client pings far": sockets.ping(bed.client, FAR_HOST),
        "far pings client": sockets.ping(bed.far, CLIENT_ADDR),
    }


kernel_outcomes = sockets.kernel_outcomes_fixture(ROUTER, _scenarios, "bpfr", forward=True)


def test_the_kernel_does_what_the_scenarios_expect(kernel_outcomes):
    assert kernel_outcomes == EXPECTED


@pytest.mark.parametrize("attach", list(Attach), ids=[a.value for a in Attach])
def test_router_agrees_with_the_kernel(kernel, build_root, kernel_outcomes, attach):
    with sockets.bpfilter_bed(build_root / f"fwd-{attach.value}", ROUTER, "router.v4", attach,
                              "bpfr", forward=True) as (bed, _reports):
        assert _scenarios(bed) == kernel_outcomes


# Policy routing by a mark the ruleset sets: UDP to port 9 is marked in mangle PREROUTING
# and the router's table for that mark prohibits the far network, so the kernel answers
# "administratively prohibited" before FORWARD, whose DROP it never reaches. bpfilter at TC hands
# the mark to the skb and routes with it too; at XDP the kernel never sees the mark
# (README: Marks), so only TC is compared.
MARKED = """*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 9 -j MARK --set-xmark 0x1/0xffffffff
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p udp -m udp --dport 9 -j DROP
COMMIT
"""


def _marked_scenarios(bed: VethBed) -> dict[str, str]:
    netns.run("ip", "rule", "add", "fwmark", "0x1", "lookup", "100", netns=bed.server)
    netns.run("ip", "route", "add", "prohibit", FAR_NET, "table", "100", netns=bed.server)
    netns.run("ip", "route", "replace", SERVER_ADDR, "dev", "eth0", netns=bed.client)
    netns.run("ip", "route", "replace", FAR_NET, "via", SERVER_ADDR, "dev", "eth0",
              "onlink", netns=bed.client)
    return {"marked UDP": sockets.udp_to_closed_port(bed.client, FAR_HOST, 9),
            "unmarked UDP": sockets.udp_to_closed_port(bed.client, FAR_HOST, 53)}


marked_outcomes = sockets.kernel_outcomes_fixture(MARKED, _marked_scenarios, "bpfm",
                                                  forward=True)


def test_a_mark_routes_forwarded_packets_as_in_the_kernel(kernel, build_root,
                                                          marked_outcomes):
    assert marked_outcomes == {"marked UDP": "unreachable (ICMP error delivered)",
                               "unmarked UDP": "refused (ICMP error delivered)"}
    with sockets.bpfilter_bed(build_root / "fwd-mark", MARKED, "marked", Attach.TC,
                              "bpfm", forward=True) as (bed, _reports):
        assert _marked_scenarios(bed) == marked_outcomes
