"""Flows through the NAT mirror routers and what the far end saw, shared by the NAT
conformance modules: a client's SYN (and the handshake's ACK with data), datagram or ping
and the replies as the client sees them; the far namespace's UDP echo (it answers with
the address and port it saw) and TCP listener (its accepted peers and the address each
connection came to)."""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
import sys
import time
from typing import Optional

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from bpfilter.testbed import CLIENT_ADDR, netns
from bpfilter.testbed.veth import drain, incoming
from tests.conformance.harness import FAR_LISTENER, MirrorPair

ECHO_PORT, ACCEPT_PORT = 7, 8443
# Client source ports: a new one per flow, so that no connection of an earlier flow is met.
sports = itertools.count(20000)


def _valid(packet: Packet) -> bool:
    """Every checksum of the packet as it should be (a UDP datagram may have none)."""
    received = IP(bytes(packet))
    fresh = received.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if layer in fresh and not (layer is UDP and fresh[UDP].chksum == 0):
            fresh[layer].chksum = None
    return bytes(IP(bytes(fresh))) == bytes(received)


def describe(reply: Packet) -> tuple:
    """What the client sees of a reply, without what differs by chance (sequence numbers,
    IP ids, TTLs of other hosts' packets)."""
    fields: list = [reply.src, reply.dst, reply.proto, _valid(reply)]
    if TCP in reply:
        fields += [reply[TCP].sport, reply[TCP].dport, str(reply[TCP].flags)]
    elif UDP in reply:
        fields += [reply[UDP].sport, reply[UDP].dport, bytes(reply[UDP].payload)]
    elif ICMP in reply:
        fields += [reply[ICMP].type, reply[ICMP].code]
        if IPerror in reply:
            quoted = reply[IPerror]
            fields += [quoted.src, quoted.dst, quoted.proto]
            for layer in (TCPerror, UDPerror):
                if layer in reply:
                    fields += [reply[layer].sport, reply[layer].dport]
    return tuple(fields)


def _send(bed, packet: Packet) -> list[Packet]:
    return bed.send(bytes(Ether(src=bed.client_mac, dst=bed.server_mac) / packet))


def flow(bed, kind: str, dst: str, port: int, sport: int, src: str = CLIENT_ADDR
         ) -> list[tuple]:
    """One flow from the client (or another address behind it); what came back, in order
    of the flow's steps."""
    base = IP(src=src, dst=dst)
    if kind == "ping":
        return [tuple(sorted(describe(r) for r in _send(bed, base / ICMP(id=sport, seq=1))))]
    if kind == "udp":
        return [tuple(sorted(describe(r) for r in _send(
            bed, base / UDP(sport=sport, dport=port) / b"hello")))]
    replies = _send(bed, base / TCP(sport=sport, dport=port, flags="S", seq=1000))
    seen = [tuple(sorted(describe(r) for r in replies))]
    answer = next((r for r in replies if TCP in r and r[TCP].flags == "SA"), None)
    if answer is not None:
        ack = TCP(sport=sport, dport=port, flags="A", seq=1001, ack=answer[TCP].seq + 1)
        seen.append(tuple(sorted(describe(r) for r in _send(bed, base / ack / b"data"))))
        _send(bed, base / TCP(sport=sport, dport=port, flags="R", seq=1005))
    return seen



# The far end's echo, a process of its own in the far namespace: a thread of the test's
# would answer after the frame's grace, waiting for the interpreter lock.
_ECHO = f"""
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{FAR_LISTENER}", {ECHO_PORT}))
print("ready", flush=True)
while True:
    data, (address, port) = sock.recvfrom(2048)
    sock.sendto(f"{{address}}:{{port}}".encode(), (address, port))
"""


class FarPeers:
    """In each far namespace, a UDP echo that answers with the address and port it saw
    and a TCP listener whose accepted peers are read back."""

    def __init__(self, pair: MirrorPair):
        self.echoes, self.tcp = [], {}
        try:
            for bed in (pair.kernel, pair.bpf):
                echo = subprocess.Popen(["ip", "netns", "exec", bed.far, sys.executable,
                                         "-c", _ECHO], stdout=subprocess.PIPE, text=True)
                self.echoes.append(echo)
                assert echo.stdout.readline().strip() == "ready"
                with netns.entered(bed.far):
                    self.tcp[bed.far] = socket.create_server(("0.0.0.0", ACCEPT_PORT))
                self.tcp[bed.far].settimeout(0.5)
        except BaseException:
            self.close()
            raise

    def peer(self, bed) -> Optional[tuple[str, int]]:
        accepted = self.accepted(bed)
        return accepted and accepted[0]

    def accepted(self, bed) -> Optional[tuple[tuple[str, int], tuple[str, int]]]:
        """The peer of the connection the listener accepted and the address it came to
        (None: nothing connected)."""
        try:
            conn, address = self.tcp[bed.far].accept()
        except OSError:  # timed out: nothing connected
            return None
        with conn:
            return address, conn.getsockname()

    def close(self) -> None:
        for echo in self.echoes:
            echo.kill()
            echo.wait()
        for sock in self.tcp.values():
            sock.close()


def _port_seen(port: int, sport: int) -> object:
    """A source port as the far end saw it: the client's own, or another (the kernel
    picks a new one at random: test_snat_port_ranges checks where)."""
    return "the client's" if port == sport else "another"


def snat_flow(bed, peers: FarPeers, kind: str, dst: str, port: int, sport: int,
              src: str = CLIENT_ADDR, ports=_port_seen) -> list:
    """A flow as `flow`, the far end's answers about the source it saw made comparable
    (`ports` says what of a port is compared), and for TCP the peer its listener
    accepted."""
    def seen(field):
        found = re.fullmatch(rb"([\d.]+):(\d+)", field) if isinstance(field, bytes) else None
        return (found[1].decode(), ports(int(found[2]), sport)) if found else field

    steps = [tuple(tuple(seen(f) for f in reply) for reply in step)
             for step in flow(bed, kind, dst, port, sport, src)]
    if kind == "syn":
        peer = peers.peer(bed) if any("SA" in reply for reply in steps[0]) else None
        steps.append(peer and (peer[0], ports(peer[1], sport)))
    return steps


def from_the_far_end(bed, port: int = 9999) -> tuple:
    """A datagram the far end (a container, a guest) sends out to the client: the source
    the client sees (MASQUERADE's, say), its port kept or not; () when none arrives."""
    with netns.entered(bed.far):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((FAR_LISTENER, 0))
        sport = sock.getsockname()[1]
        drain(bed.sock)
        sock.sendto(b"out", (CLIENT_ADDR, port))
        end = time.monotonic() + 0.5
        for frame in incoming(bed.sock, lambda: end):
            if UDP in frame and frame[UDP].dport == port:
                return frame[IP].src, "its port" if frame[UDP].sport == sport else "another"
    return ()
