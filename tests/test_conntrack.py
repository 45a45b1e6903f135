"""Connection tracking with real connections: the classic stateful host firewall, once in
the kernel's iptables-legacy and once in bpfilter (at XDP and at TC ingress), on the same
testbed. Every connection attempt must end the same way on both."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfilter.runtime import deploy
from bpfilter.testbed import CLIENT_ADDR, netns, SERVER_ADDR, VethBed
from bpfilter.codegen import Attach
from tests import sockets

STATEFUL = """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type 8 -m state --state NEW -j ACCEPT
COMMIT
"""


def _scenarios(bed: VethBed) -> dict[str, str]:
    sockets.route_to_server(bed)
    return {
        "server connects out": sockets.tcp_exchange(bed.client, CLIENT_ADDR, bed.server, 8080),
        "client to port 22": sockets.tcp_exchange(bed.server, SERVER_ADDR, bed.client, 22),
        "client to port 8080": sockets.tcp_exchange(bed.server, SERVER_ADDR, bed.client, 8080),
        "server's UDP to a closed port": sockets.udp_to_closed_port(bed.server, CLIENT_ADDR),
        "server pings out": sockets.ping(bed.server, CLIENT_ADDR),
        "client pings in": sockets.ping(bed.client, SERVER_ADDR),
    }


EXPECTED = {
    "server connects out": "talked",
    "client to port 22": "talked",
    "client to port 8080": "timed out",
    "server's UDP to a closed port": "refused (ICMP error delivered)",
    "server pings out": "answered",
    "client pings in": "answered",
}


kernel_outcomes = sockets.kernel_outcomes_fixture(STATEFUL, _scenarios, "bpfk")


def test_the_kernel_does_what_the_scenarios_expect(kernel_outcomes):
    assert kernel_outcomes == EXPECTED


@pytest.mark.parametrize("attach", list(Attach), ids=[a.value for a in Attach])
def test_stateful_firewall_agrees_with_the_kernel(kernel, build_root, kernel_outcomes,
                                                  attach):
    with sockets.bpfilter_bed(build_root / f"ct-{attach.value}", STATEFUL, "stateful.v4",
                              attach, "bpfk") as (bed, _reports):
        assert _scenarios(bed) == kernel_outcomes
        listing = json.loads(netns.run(sys.executable, "-m", "bpfilter", "conntrack", "-L",
                                       "--json", netns=bed.server).stdout)["connections"]
        # Oriented from the side that opened each connection, as conntrack -L does.
        opened = [c for c in listing if (c["src"], c["dst"]) == (SERVER_ADDR, CLIENT_ADDR)]
        assert {c["proto"] for c in opened} == {"tcp", "udp", "icmp"}, listing
        assert 8080 not in [c["dport"] for c in listing
                            if (c["src"], c["dst"]) == (CLIENT_ADDR, SERVER_ADDR)]
        flushed = netns.run(sys.executable, "-m", "bpfilter", "conntrack", "-F",
                            netns=bed.server).stdout
        assert "connection(s) forgotten" in flushed and " 0 " not in flushed
        assert "0 connection(s)" in netns.run(sys.executable, "-m", "bpfilter",
                                              "conntrack", netns=bed.server).stdout


def test_connections_survive_a_ruleset_swap(kernel, build_root):
    """The table is the interface's, not the ruleset's: a connection opened under one
    ruleset is still ESTABLISHED under the next."""
    with VethBed(build_root / "ct-swap", prefix="bpfk") as bed:
        with netns.entered(bed.server):
            deploy.apply(STATEFUL, "stateful.v4", "eth0", build_root / "ct-swap-a")
        try:
            sockets.route_to_server(bed)
            with netns.entered(bed.client):
                listener = socket.create_server((CLIENT_ADDR, 8081))
                listener.settimeout(1.0)
            with netns.entered(bed.server):
                client = socket.create_connection((CLIENT_ADDR, 8081), timeout=1.0)
            peer, _ = listener.accept()
            peer.settimeout(1.0)
            with netns.entered(bed.server):
                swapped = deploy.apply(STATEFUL.replace("COMMIT", "-A INPUT -p udp -j DROP\n"
                                                        "COMMIT"),
                                       "stateful2.v4", "eth0", build_root / "ct-swap-b")
            assert swapped.replaced and not swapped.map_only
            peer.sendall(b"after the swap\n")  # client -> server: ESTABLISHED, accepted
            assert client.recv(15) == b"after the swap\n"
            client.close()
            peer.close()
            listener.close()
        finally:
            with netns.entered(bed.server):
                deploy.detach("eth0")


def test_a_full_table_evicts_and_says_so(kernel, build_root):
    """70,000 connections through the egress program into a 65,536-entry table: the LRU
    makes room, and the count of what it pushed out is there for `bpfilter conntrack`."""
    from bpfilter.runtime import conntable, state
    from bpfilter.codegen.program import EGRESS
    from bpfilter.compiler import compile_ruleset
    from bpfilter.runtime.runner import LoadedRuleset

    with VethBed(build_root / "ct-full", prefix="bpfk") as bed:
        with netns.entered(bed.server):
            deploy.apply(STATEFUL, "stateful.v4", "eth0", build_root / "ct-full")
            paths = state.Paths("eth0", state.netns_id())
            shared = conntable.open_shared(paths)
            try:
                compilation = compile_ruleset(STATEFUL, "stateful.v4",
                                              build_root / "ct-full-egress", verify=False)
                with LoadedRuleset(compilation, conntrack={n: m.fd for n, m in
                                                           shared.items()}) as loaded:
                    program = loaded.program(EGRESS)
                    frame = bytearray(bytes(Ether() / IP(src=SERVER_ADDR, dst=CLIENT_ADDR)
                                            / UDP(sport=0, dport=53) / b"q"))
                    for n in range(70_000):  # sport and the last octet of the address vary
                        frame[34:36] = (1024 + n % 60_000).to_bytes(2, "big")
                        frame[33] = 2 + n // 60_000
                        frame[24:26] = b"\0\0"
                        frame[24:26] = _ip_checksum(frame[14:34]).to_bytes(2, "big")
                        program.test_run(bytes(frame))
            finally:
                for table in shared.values():
                    table.close()
            use = conntable.table_use(paths)
            assert use.capacity == 65_536 and use.entries <= use.capacity
            assert use.entries + use.evicted == 70_000, use
            assert conntable.flush(paths) == use.entries
            assert conntable.table_use(paths) == conntable.TableUse(0, 65_536, 0)
            deploy.detach("eth0")


def _ip_checksum(header: bytes) -> int:
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_tracking_stops_with_the_last_stateful_ruleset(kernel, build_root):
    """As the kernel's conntrack hooks, tracking runs only while a rule reads the
    states (a stateless ruleset with an empty OUTPUT has no egress program); the table
    stays pinned for the next stateful ruleset."""
    from bpfilter.runtime import conntable, state

    stateless = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp -j DROP\nCOMMIT\n"
    with VethBed(build_root / "ct-stop", prefix="bpfk") as bed:
        with netns.entered(bed.server):
            paths = state.Paths("eth0", state.netns_id())
            deploy.apply(STATEFUL, "a.v4", "eth0", build_root / "ct-stop-a")
            assert paths.egress_link.exists()
            conntable.flush(paths)
            sockets.udp_to_closed_port(bed.server, CLIENT_ADDR)  # one connection, tracked
            deploy.apply(stateless, "b.v4", "eth0", build_root / "ct-stop-b")
            assert not paths.egress_link.exists() and paths.conntrack.exists()
            sockets.udp_to_closed_port(bed.server, CLIENT_ADDR)  # not tracked: a new port
            assert conntable.table_use(paths).entries == 1
            deploy.apply(STATEFUL, "a.v4", "eth0", build_root / "ct-stop-c")
            assert paths.egress_link.exists() and conntable.table_use(paths).entries == 1
            deploy.detach("eth0")
            assert not paths.conntrack.exists()


def test_a_table_of_another_layout_is_refused_clearly(kernel, namespace):
    """A connection table pinned by another version of bpfilter (other entries) cannot be
    shared: apply says so instead of passing on the verifier's refusal."""
    from bpfilter.runtime import conntable, state
    from bpfilter.errors import KernelError

    with netns.entered(namespace("bpft-oldct")):
        paths = state.Paths("eth0", state.netns_id())
        paths.conntrack.mkdir(parents=True)
        try:
            for name, spec in (("bf_conntrack", "type lru_hash key 16 value 16 entries 64"),
                               ("bf_ct_created", "type percpu_array key 4 value 8 entries 1")):
                subprocess.run(["bpftool", "map", "create", str(paths.conntrack / name),
                                *spec.split(), "name", name], check=True)
            with pytest.raises(KernelError, match="made by another version of bpfilter"):
                conntable.open_shared(paths)
        finally:
            state.remove_tree(paths.conntrack)
