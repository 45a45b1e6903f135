"""Connection tracking with real connections: the classic stateful host firewall, once in
the kernel's iptables-legacy and once in bpfilter (at XDP and at TC ingress), on the same
testbed. Every connection attempt must end the same way on both."""

from __future__ import annotations

import errno
import socket
import sys

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from bpfilter import deploy, netns
from bpfilter.codegen import Attach
from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR, VethBed

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


def _tcp(listen_ns: str, listen_addr: str, connect_ns: str, port: int) -> str:
    """Connect from one namespace to a listener in the other and exchange a line."""
    with netns.entered(listen_ns):
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((listen_addr, port))
        server.listen()
        server.settimeout(1.0)
    try:
        with netns.entered(connect_ns):
            client = socket.socket()
            client.settimeout(1.0)
        try:
            client.connect((listen_addr, port))
            peer, _ = server.accept()
            with peer:
                peer.settimeout(1.0)
                client.sendall(b"ping\n")
                assert peer.recv(5) == b"ping\n"
                peer.sendall(b"pong\n")
                return "talked" if client.recv(5) == b"pong\n" else "garbled"
        except (TimeoutError, socket.timeout):
            return "timed out"
        except ConnectionRefusedError:
            return "refused"
        finally:
            client.close()
    finally:
        server.close()


def _udp_to_closed_port(ns: str, addr: str, port: int = 9) -> str:
    """The peer answers with ICMP port unreachable: RELATED to this flow."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(1.0)
        sock.connect((addr, port))
        sock.send(b"x")
        try:
            sock.recv(10)
            return "answered"
        except ConnectionRefusedError:
            return "refused (ICMP error delivered)"
        except OSError as exc:
            return "refused (ICMP error delivered)" if exc.errno == errno.ECONNREFUSED \
                else "timed out"
    finally:
        sock.close()


def _ping(ns: str, addr: str) -> str:
    """One echo request from a raw socket (no ping binary on these machines)."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.settimeout(1.0)
        sock.sendto(bytes(ICMP(type=8, id=0x4242, seq=1)), (addr, 0))
        while True:
            data, source = sock.recvfrom(2048)
            reply = IP(data)
            if source[0] == addr and ICMP in reply and reply[ICMP].type == 0:
                return "answered"
    except (TimeoutError, socket.timeout):
        return "no answer"
    finally:
        sock.close()


def _route_to_server(bed: VethBed) -> None:
    """The testbed's client only sends crafted frames; here its stack talks too."""
    netns.run("ip", "route", "replace", SERVER_ADDR, "dev", "eth0", netns=bed.client)


def _scenarios(bed: VethBed) -> dict[str, str]:
    _route_to_server(bed)
    return {
        "server connects out": _tcp(bed.client, CLIENT_ADDR, bed.server, 8080),
        "client to port 22": _tcp(bed.server, SERVER_ADDR, bed.client, 22),
        "client to port 8080": _tcp(bed.server, SERVER_ADDR, bed.client, 8080),
        "server's UDP to a closed port": _udp_to_closed_port(bed.server, CLIENT_ADDR),
        "server pings out": _ping(bed.server, CLIENT_ADDR),
        "client pings in": _ping(bed.client, SERVER_ADDR),
    }


EXPECTED = {
    "server connects out": "talked",
    "client to port 22": "talked",
    "client to port 8080": "timed out",
    "server's UDP to a closed port": "refused (ICMP error delivered)",
    "server pings out": "answered",
    "client pings in": "answered",
}


@pytest.fixture(scope="module")
def kernel_outcomes(tmp_path_factory):
    from tests.conftest import need_kernel

    need_kernel()
    with VethBed(tmp_path_factory.mktemp("ct-kernel"), prefix="bpfk") as bed:
        netns.run("iptables-legacy-restore", netns=bed.server, input=STATEFUL)
        return _scenarios(bed)


def test_the_kernel_does_what_the_scenarios_expect(kernel_outcomes):
    assert kernel_outcomes == EXPECTED


@pytest.mark.parametrize("attach", list(Attach), ids=[a.value for a in Attach])
def test_stateful_firewall_agrees_with_the_kernel(kernel, build_root, kernel_outcomes,
                                                  attach):
    with VethBed(build_root / f"ct-{attach.value}", prefix="bpfk") as bed:
        with netns.entered(bed.server):
            deploy.apply(STATEFUL, "stateful.v4", "eth0", build_root / f"ct-{attach.value}",
                         attach=attach)
        try:
            assert _scenarios(bed) == kernel_outcomes
            listing = netns.run("env", "COLUMNS=200", sys.executable, "-m", "bpfilter",
                                "conntrack", netns=bed.server).stdout
            # Oriented from the side that opened each connection, as conntrack -L does.
            opened = [line for line in listing.splitlines()
                      if f"│ {SERVER_ADDR} │ {CLIENT_ADDR} │" in line]
            assert {line.split()[1] for line in opened} == {"tcp", "udp", "icmp"}, listing
            assert "8080" not in [line.split()[13] for line in listing.splitlines()
                                  if f"│ {CLIENT_ADDR} │ {SERVER_ADDR} │" in line]
            flushed = netns.run(sys.executable, "-m", "bpfilter", "conntrack", "-F",
                                netns=bed.server).stdout
            assert "connection(s) forgotten" in flushed and " 0 " not in flushed
            assert "0 connection(s)" in netns.run(sys.executable, "-m", "bpfilter",
                                                  "conntrack", netns=bed.server).stdout
        finally:
            with netns.entered(bed.server):
                deploy.detach("eth0")


def test_connections_survive_a_ruleset_swap(kernel, build_root):
    """The table is the interface's, not the ruleset's: a connection opened under one
    ruleset is still ESTABLISHED under the next."""
    with VethBed(build_root / "ct-swap", prefix="bpfk") as bed:
        with netns.entered(bed.server):
            deploy.apply(STATEFUL, "stateful.v4", "eth0", build_root / "ct-swap-a")
        try:
            _route_to_server(bed)
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
    """70,000 connections through the egress tracker into a 65,536-entry table: the LRU
    makes room, and the count of what it pushed out is there for `bpfilter conntrack`."""
    from bpfilter import state, tracker
    from bpfilter.build import build_source
    from bpfilter.loader.objects import Object
    from bpfilter.resources import resource_dir

    with VethBed(build_root / "ct-full", prefix="bpfk") as bed:
        with netns.entered(bed.server):
            deploy.apply(STATEFUL, "stateful.v4", "eth0", build_root / "ct-full")
            paths = state.Paths("eth0", state.netns_id())
            source = (resource_dir("templates") / "ct_egress.c").read_text()
            path, _ = build_source(tracker.PROGRAM, source, build_root / "ct-full-tracker")
            shared = tracker.open_shared(paths)
            try:
                with Object(path, shared={n: m.fd for n, m in shared.items()}) as obj:
                    program = obj.programs[tracker.PROGRAM]
                    frame = bytearray(bytes(Ether() / IP(src=SERVER_ADDR, dst=CLIENT_ADDR)
                                            / UDP(sport=0, dport=53) / b"q"))
                    for n in range(70_000):  # sport and the last octet of the address vary
                        frame[34:36] = (1024 + n % 60_000).to_bytes(2, "big")
                        frame[33] = 2 + n // 60_000
                        frame[24:26] = b"\0\0"
                        frame[24:26] = _ip_checksum(frame[14:34]).to_bytes(2, "big")
                        program.test_run(bytes(frame), ingress_ifindex=1)
            finally:
                for table in shared.values():
                    table.close()
            use = tracker.table_use(paths)
            assert use.capacity == 65_536 and use.entries <= use.capacity
            assert use.entries + use.evicted == 70_000, use
            assert tracker.flush(paths) == use.entries
            assert tracker.table_use(paths) == tracker.TableUse(0, 65_536, 0)
            deploy.detach("eth0")


def _ip_checksum(header: bytes) -> int:
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_tracking_stops_with_the_last_stateful_ruleset(kernel, build_root):
    """As the kernel's conntrack hooks, the tracker runs only while a rule reads the
    states; the table stays pinned for the next stateful ruleset."""
    from bpfilter import state, tracker

    stateless = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp -j DROP\nCOMMIT\n"
    with VethBed(build_root / "ct-stop", prefix="bpfk") as bed:
        with netns.entered(bed.server):
            paths = state.Paths("eth0", state.netns_id())
            deploy.apply(STATEFUL, "a.v4", "eth0", build_root / "ct-stop-a")
            assert paths.tracker_link.exists()
            tracker.flush(paths)
            _udp_to_closed_port(bed.server, CLIENT_ADDR)  # one connection, tracked
            deploy.apply(stateless, "b.v4", "eth0", build_root / "ct-stop-b")
            assert not paths.tracker_link.exists() and paths.conntrack.exists()
            _udp_to_closed_port(bed.server, CLIENT_ADDR)  # not tracked: a new port
            assert tracker.table_use(paths).entries == 1
            deploy.apply(STATEFUL, "a.v4", "eth0", build_root / "ct-stop-c")
            assert paths.tracker_link.exists() and tracker.table_use(paths).entries == 1
            deploy.detach("eth0")
            assert not paths.conntrack.exists()
