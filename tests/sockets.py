"""Real connections between the testbed's namespaces, and the same scenarios run once
under the kernel's iptables-legacy and once under bpfilter. Each helper says how an
attempt ended, in the words the tests compare."""

from __future__ import annotations

import errno
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
from scapy.layers.inet import ICMP, IP

from bpfilter.runtime import deploy
from bpfilter.testbed import netns, SERVER_ADDR, VethBed
from bpfilter.codegen import Attach
from tests.conftest import need_kernel

Scenarios = Callable[[VethBed], dict[str, str]]


def tcp_exchange(listen_ns: str, listen_addr: str, connect_ns: str, port: int) -> str:
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


def tcp_connect(ns: str, addr: str, port: int) -> str:
    """A connection to a port nothing listens on: the host answers with a reset."""
    with netns.entered(ns):
        sock = socket.socket()
    try:
        sock.settimeout(1.0)
        sock.connect((addr, port))
        return "connected"
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timed out"
    finally:
        sock.close()


def udp_to_closed_port(ns: str, addr: str, port: int = 9) -> str:
    """The peer answers with ICMP port unreachable: RELATED to this flow. A send the
    host's own OUTPUT refuses fails with EPERM: "not permitted"."""
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
            return {errno.ECONNREFUSED: "refused (ICMP error delivered)",
                    errno.EHOSTUNREACH: "unreachable (ICMP error delivered)"}.get(
                        exc.errno, "timed out")
    except PermissionError:
        return "not permitted"
    finally:
        sock.close()


def ping(ns: str, addr: str) -> str:
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
    except PermissionError:
        return "not permitted"
    finally:
        sock.close()


def route_to_server(bed: VethBed) -> None:
    """The testbed's client only sends crafted frames; here its stack talks too."""
    netns.run("ip", "route", "replace", SERVER_ADDR, "dev", "eth0", netns=bed.client)


def kernel_outcomes_fixture(ruleset: str, scenarios: Scenarios, prefix: str,
                            forward: bool = False):
    """A module fixture: the scenarios' outcomes with the ruleset in the kernel's
    iptables-legacy, found once for every bpfilter variant to compare with."""

    @pytest.fixture(scope="module")
    def kernel_outcomes(tmp_path_factory) -> dict[str, str]:
        need_kernel()
        with VethBed(tmp_path_factory.mktemp(f"{prefix}-kernel"), prefix=prefix,
                     forward=forward) as bed:
            netns.run("iptables-legacy-restore", netns=bed.server, input=ruleset)
            return scenarios(bed)

    return kernel_outcomes


@contextmanager
def bpfilter_bed(build_dir: Path, ruleset: str, source: str, attach: Attach, prefix: str,
                 forward: bool = False) -> Iterator[tuple[VethBed, list[deploy.ApplyReport]]]:
    """A testbed whose server runs the ruleset in bpfilter (on both of its interfaces
    when it forwards), detached again however the test ends."""
    ifaces = ("eth0", "eth1") if forward else ("eth0",)
    with VethBed(build_dir, prefix=prefix, forward=forward) as bed:
        try:
            with netns.entered(bed.server):
                reports = [deploy.apply(ruleset, source, iface, build_dir / "rules",
                                        attach=attach) for iface in ifaces]
            yield bed, reports
        finally:
            with netns.entered(bed.server):
                for iface in ifaces:
                    try:
                        deploy.detach(iface)
                    except Exception:  # not applied: the failure is reported already
                        pass
