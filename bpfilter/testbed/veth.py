"""A client and a server namespace joined by a veth pair, for the demo and the tests.

The server owns 198.18.0.0/15 and 2001:db8:1::/48 (local routes, so any address in them is
local) and routes everything else back through the client (100.64.0.2, 2001:db8:ff::2,
a neighbour it knows: the client has no IPv6 stack to answer neighbour discovery, nor to
send anything of its own). The client runs a pass-through XDP program
(veth hands XDP_TX frames, i.e. bpfilter's REJECT replies, only to a peer that runs XDP) and
sends frames from a raw socket. After each frame it sends an ARP request: the server
handles it after the frame, so its answer says the frame has been dealt with, without
waiting out a timeout.

With `forward`, the server is also a router: it forwards FAR_NET through its eth1 to a
third namespace, which owns that range, answers as a host would, and runs the
pass-through program too.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from bpfilter.testbed import netns
from bpfilter.compiler import compile_ruleset
from bpfilter.loader.links import XdpLink
from bpfilter.loader.xdp import XdpMode
from bpfilter.runtime.runner import LoadedRuleset

# The client must not be inside the server's local range: it is the server's gateway.
SERVER_ADDR, CLIENT_ADDR = "198.18.0.1", "100.64.0.2"
SERVER_NET = "198.18.0.0/15"
SERVER_ADDR6, CLIENT_ADDR6 = "2001:db8:1::1", "2001:db8:ff::2"
SERVER_NET6 = "2001:db8:1::/48"
PASS_ALL = "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
FAR_NET = "203.0.113.0/24"
ROUTER_LINK, FAR_LINK = "192.0.2.1", "192.0.2.2"  # the server's eth1, the far end
FAR_NET6 = "2001:db8:f::/48"
ROUTER_LINK6, FAR_LINK6 = "2001:db8:e::1", "2001:db8:e::2"
# XDP_TX frames are flushed at the end of the server's NAPI poll, possibly after the ARP
# answer that was handled in the same poll; a forwarded frame's answer comes from the far
# namespace, which runs after the server.
_TX_GRACE = 0.005
_FORWARD_GRACE = 0.02
# A reply to the server's own packet comes back through lo as the send returns (the
# kernel's REJECT at OUTPUT, bpfilter's from TC egress): a short wait is enough.
_LOOPBACK_GRACE = 0.01
# How long an unanswered ARP request is given (an answer comes within a millisecond).
_ARP_WAIT = 0.2


def network_layer(frame: Packet) -> Optional[Packet]:
    """A frame's IPv4 or IPv6 packet (None for others: ARP)."""
    for layer in (IP, IPv6):
        if layer in frame:
            return frame[layer]
    return None


def _quiet(namespace: str) -> None:
    """No router solicitations from the interfaces a namespace gets next: they would be
    delivered (or counted as received) between two test frames."""
    for key in ("all", "default"):
        netns.sysctl(namespace, f"net.ipv6.conf.{key}.router_solicitations", "0")


def _answer_everyone(namespace: str, ifname: str) -> None:
    """Deterministic answers: no reverse-path filter (the tests send from any source) and
    no per-destination ICMP rate limit."""
    for key in ("all", "default", ifname):
        netns.sysctl(namespace, f"net.ipv4.conf.{key}.rp_filter", "0")
    netns.sysctl(namespace, "net.ipv4.icmp_ratelimit", "0")
    netns.sysctl(namespace, "net.ipv6.icmp.ratelimit", "0")


def drain(sock: socket.socket) -> None:
    """Forget what a packet socket has received so far."""
    while select.select([sock], [], [], 0)[0]:
        sock.recv(65535)


def incoming(sock: socket.socket, deadline: Callable[[], float]) -> Iterator[Ether]:
    """Frames a packet socket receives (not those it sees leave) until `deadline()`,
    which may move while they come."""
    while (left := deadline() - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            data, addr = sock.recvfrom(65535)
            if addr[2] != socket.PACKET_OUTGOING:
                yield Ether(data)


class VethBed:
    def __init__(self, build_dir: Path, prefix: str = "bpfd", server_xdp: bool = False,
                 forward: bool = False):
        """`server_xdp`: give the server the pass-through program too, for frames sent
        with XDP_TX from the client (veth hands those only to a peer running XDP)."""
        self.namespaces: list[str] = []
        self.far: Optional[str] = None
        self._grace = _FORWARD_GRACE if forward else _TX_GRACE
        self._passthrough: Optional[LoadedRuleset] = None
        self._links: list[XdpLink] = []
        self.sock: Optional[socket.socket] = None
        self._raw: dict[int, socket.socket] = {}  # per address family
        self._loopback: Optional[socket.socket] = None
        try:
            self._setup(build_dir, prefix, server_xdp)
            if forward:
                self._setup_far(prefix)
        except BaseException:
            self.close()
            raise

    def _setup(self, build_dir: Path, prefix: str, server_xdp: bool) -> None:
        self.server = self._namespace(f"{prefix}-server")
        self.client = self._namespace(f"{prefix}-client")
        _quiet(self.server)
        netns.veth("eth0", self.server, "eth0", self.client)
        srv = lambda *a: netns.run(*a, netns=self.server)  # noqa: E731
        srv("ip", "addr", "add", f"{SERVER_ADDR}/32", "dev", "eth0")
        srv("ip", "route", "add", "local", SERVER_NET, "dev", "lo")
        netns.run("ip", "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0", netns=self.client)
        srv("ip", "route", "add", CLIENT_ADDR, "dev", "eth0")
        srv("ip", "route", "add", "default", "via", CLIENT_ADDR)
        _answer_everyone(self.server, "eth0")
        self.server_index, self.server_mac = netns.link_info(self.server, "eth0")
        self.client_index, self.client_mac = netns.link_info(self.client, "eth0")
        netns.sysctl(self.client, "net.ipv6.conf.all.disable_ipv6", "1")
        srv("ip", "-6", "addr", "add", f"{SERVER_ADDR6}/128", "dev", "eth0", "nodad")
        srv("ip", "-6", "route", "add", "local", SERVER_NET6, "dev", "lo")
        srv("ip", "-6", "route", "add", CLIENT_ADDR6, "dev", "eth0")
        srv("ip", "-6", "route", "add", "default", "via", CLIENT_ADDR6, "dev", "eth0")
        srv("ip", "-6", "neigh", "replace", CLIENT_ADDR6, "lladdr", self.client_mac,
            "dev", "eth0", "nud", "permanent")
        self._passthrough = LoadedRuleset(compile_ruleset(
            PASS_ALL, "<pass-through>", build_dir / "pass-through", verify=False))
        if server_xdp:
            self._pass_through(self.server, "eth0")
        self._pass_through(self.client, "eth0")
        with netns.entered(self.client):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            self.sock.bind(("eth0", 0))
        self._arp = bytes(Ether(src=self.client_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=self.client_mac, psrc=CLIENT_ADDR, pdst=SERVER_ADDR))

    def _setup_far(self, prefix: str) -> None:
        self.far = self._namespace(f"{prefix}-far")
        _quiet(self.far)
        netns.veth("eth1", self.server, "eth0", self.far)
        srv = lambda *a: netns.run(*a, netns=self.server)  # noqa: E731
        far = lambda *a: netns.run(*a, netns=self.far)  # noqa: E731
        srv("ip", "addr", "add", f"{ROUTER_LINK}/30", "dev", "eth1")
        far("ip", "addr", "add", f"{FAR_LINK}/30", "dev", "eth0")
        far("ip", "route", "add", "local", FAR_NET, "dev", "lo")
        far("ip", "route", "add", "default", "via", ROUTER_LINK)
        srv("ip", "route", "add", FAR_NET, "via", FAR_LINK)
        # Known neighbours: no ARP exchange delays the first frame either way.
        _index, far_mac = netns.link_info(self.far, "eth0")
        _index, router_mac = netns.link_info(self.server, "eth1")
        srv("ip", "neigh", "replace", FAR_LINK, "lladdr", far_mac, "dev", "eth1",
            "nud", "permanent")
        far("ip", "neigh", "replace", ROUTER_LINK, "lladdr", router_mac, "dev", "eth0",
            "nud", "permanent")
        srv("ip", "-6", "addr", "add", f"{ROUTER_LINK6}/64", "dev", "eth1", "nodad")
        far("ip", "-6", "addr", "add", f"{FAR_LINK6}/64", "dev", "eth0", "nodad")
        far("ip", "-6", "route", "add", "local", FAR_NET6, "dev", "lo")
        far("ip", "-6", "route", "add", "default", "via", ROUTER_LINK6, "dev", "eth0")
        srv("ip", "-6", "route", "add", FAR_NET6, "via", FAR_LINK6, "dev", "eth1")
        srv("ip", "-6", "neigh", "replace", FAR_LINK6, "lladdr", far_mac, "dev", "eth1",
            "nud", "permanent")
        far("ip", "-6", "neigh", "replace", ROUTER_LINK6, "lladdr", router_mac, "dev",
            "eth0", "nud", "permanent")
        netns.sysctl(self.server, "net.ipv6.conf.all.forwarding", "1")
        netns.sysctl(self.server, "net.ipv4.ip_forward", "1")
        netns.sysctl(self.server, "net.ipv4.conf.eth1.rp_filter", "0")
        _answer_everyone(self.far, "eth0")
        # The far end gets bpfilter's REJECT replies to its packets as the client does.
        self._pass_through(self.far, "eth0")

    def _pass_through(self, namespace: str, ifname: str) -> None:
        """The pass-through program on an interface: veth hands XDP_TX frames only to a
        peer that runs XDP."""
        program = self._passthrough.program()
        index, _mac = netns.link_info(namespace, ifname)
        with netns.entered(namespace):
            self._links.append(XdpLink.create(index, program.fd, XdpMode.NATIVE))

    def _namespace(self, prefix: str) -> str:
        name = netns.create(netns.unique_name(prefix))
        self.namespaces.append(name)
        return name

    def frame(self, packet: Packet) -> bytes:
        return bytes(Ether(src=self.client_mac, dst=self.server_mac) / packet)

    def send(self, frame: bytes) -> list[Packet]:
        """Send one frame; the IPv4 or IPv6 packets that came back to its source address."""
        drain(self.sock)
        self.sock.send(frame)
        self.sock.send(self._arp)
        source = network_layer(Ether(frame))
        source = source.src if source is not None else None
        replies: list[Packet] = []
        give_up = time.monotonic() + 1.0
        grace_end: Optional[float] = None  # set by the ARP answer
        for packet in incoming(self.sock, lambda: grace_end or give_up):
            if ARP in packet and packet[ARP].op == 2 and grace_end is None:
                grace_end = time.monotonic() + self._grace
            elif (layer := network_layer(packet)) is not None and layer.dst == source:
                replies.append(layer)
        return replies

    def arp_answered(self, hwsrc: str, psrc: str = CLIENT_ADDR) -> bool:
        """Whether the server answers an ARP request for its address from `hwsrc`."""
        drain(self.sock)
        self.sock.send(bytes(Ether(src=hwsrc, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=hwsrc, psrc=psrc, pdst=SERVER_ADDR)))
        end = time.monotonic() + _ARP_WAIT
        return any(ARP in frame and frame[ARP].op == 2 and frame[ARP].pdst == psrc
                   for frame in incoming(self.sock, lambda: end))

    def send_from_server(self, packet: bytes) -> list[Packet]:
        """The server sends an IPv4 or IPv6 packet itself (a raw socket: it walks OUTPUT);
        the packets that then came into the server through lo for its source address (a
        REJECT at OUTPUT answers that way). A send OUTPUT refuses may fail (EPERM)."""
        family = socket.AF_INET6 if packet[0] >> 4 == 6 else socket.AF_INET
        if self._loopback is None:
            with netns.entered(self.server):
                self._loopback = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                               socket.htons(3))
                self._loopback.bind(("lo", 0))
        if family not in self._raw:
            with netns.entered(self.server):  # IPPROTO_RAW: the header is the packet's
                self._raw[family] = socket.socket(family, socket.SOCK_RAW,
                                                  socket.IPPROTO_RAW)
        drain(self._loopback)
        sent = (IPv6 if family == socket.AF_INET6 else IP)(packet)
        try:
            self._raw[family].sendto(packet, (sent.dst, 0))
        except PermissionError:
            pass
        end = time.monotonic() + _LOOPBACK_GRACE
        return [layer for frame in incoming(self._loopback, lambda: end)
                if (layer := network_layer(frame)) is not None and layer.dst == sent.src]

    def snmp(self, namespace: Optional[str] = None) -> dict[str, int]:
        """The server's (or another namespace's) /proc/net/snmp, as
        {"Ip:InDelivers": n, "Udp:NoPorts": n, ...}."""
        with netns.entered(namespace or self.server), \
                open("/proc/thread-self/net/snmp") as snmp:
            lines = [line.split() for line in snmp]
        counters = {}
        for header, values in zip(lines[::2], lines[1::2]):
            for name, value in zip(header[1:], values[1:]):
                counters[header[0] + name] = int(value)
        return counters

    def snmp6(self, namespace: Optional[str] = None) -> dict[str, int]:
        """/proc/net/snmp6 of the server (or another namespace): {"Ip6InDelivers": n}."""
        with netns.entered(namespace or self.server), \
                open("/proc/thread-self/net/snmp6") as snmp6:
            return {name: int(value) for name, value in (line.split() for line in snmp6)}

    def _unicast(self, namespace: str, ipv6: bool) -> int:
        """IPv4 (or IPv6 unicast) packets a namespace received: a neighbour's own IPv6
        chatter (listener reports, duplicate address detection) is multicast. An IPv6
        stack counts before it drops, even a disabled one (the client's)."""
        if not ipv6:
            return self.snmp(namespace)["Ip:InReceives"]
        counters = self.snmp6(namespace)
        return counters["Ip6InReceives"] - counters["Ip6InMcastPkts"]

    def delivered(self, ipv6: bool = False) -> int:
        """IPv4 (or IPv6) packets the server's stack delivered locally."""
        return self.snmp6()["Ip6InDelivers"] if ipv6 else self.snmp()["Ip:InDelivers"]

    def forwarded(self, ipv6: bool = False) -> int:
        """IPv4 (or IPv6) packets the far namespace received (0 without one)."""
        return self._unicast(self.far, ipv6) if self.far else 0

    def received(self, ipv6: bool = False) -> int:
        """IPv4 (or IPv6) packets the client received."""
        return self._unicast(self.client, ipv6)

    def close(self) -> None:
        for sock in (self.sock, self._loopback, *self._raw.values()):
            if sock is not None:
                sock.close()
        for link in self._links:
            link.close()
        if self._passthrough is not None:
            self._passthrough.close()
        for name in self.namespaces:
            netns.delete(name)
        self.namespaces.clear()

    def __enter__(self) -> "VethBed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
