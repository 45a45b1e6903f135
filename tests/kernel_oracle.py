"""The kernel's own iptables as the reference: same ruleset, same frames, real veths.

Namespace K holds the ruleset in iptables-legacy and owns 198.18.0.0/15 (a local route), so
every test frame is delivered locally and walks filter INPUT. Namespace S sends frames on
veths named like the interfaces rules mention and captures what K sends back. What K did
with a frame is read from its per-rule counters (the same counters bpfilter keeps), and
REJECT replies are captured on the wire.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass

from bpfilter import ir
from bpfilter.testbed import netns
from bpfilter.frontend import parse_ruleset

INTERFACES = ("eth0", "lan1", "wan0")
LOCAL_NET = "198.18.0.0/15"
GATEWAY = "169.254.1.1"
ETH_P_ALL = 0x0003


@dataclass
class KernelOutcome:
    counters: dict[tuple[str, str, int], int]  # packets per (table, chain, rule index)
    replies: list[bytes]


def counter_snapshot(text: str) -> dict[tuple[str, str, int], int]:
    snapshot = {}
    for table in parse_ruleset(text, "<iptables-save>").tables:
        for chain in table.chains:
            if chain.policy is not None:
                snapshot[(table.name, chain.name, -1)] = (chain.counters or ir.Counters()).packets
            for index, rule in enumerate(chain.rules):
                snapshot[(table.name, chain.name, index)] = rule.counters.packets
    return snapshot


class KernelOracle:
    def __init__(self, make_namespace):
        self.k = make_namespace("bpft-k")
        self.s = make_namespace("bpft-s")
        self.ifindex: dict[str, int] = {}
        self.kmac: dict[str, str] = {}
        self.sockets: dict[str, socket.socket] = {}
        for i, name in enumerate(INTERFACES):
            netns.veth(name, self.k, f"s{i}", self.s)
            self.ifindex[name], self.kmac[name] = netns.link_info(self.k, name)
        for key in ("all", "default", *INTERFACES):
            netns.sysctl(self.k, f"net.ipv4.conf.{key}.rp_filter", "0")
        # Deterministic replies: no per-peer ICMP rate limit (bpfilter has none yet).
        netns.sysctl(self.k, "net.ipv4.icmp_ratelimit", "0")
        _, smac = netns.link_info(self.s, "s0")
        run = lambda *a: netns.run(*a, netns=self.k)  # noqa: E731
        run("ip", "route", "add", "local", LOCAL_NET, "dev", "lo")
        run("ip", "route", "add", GATEWAY, "dev", "eth0")
        run("ip", "neigh", "add", GATEWAY, "lladdr", smac, "dev", "eth0", "nud", "permanent")
        run("ip", "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        with netns.entered(self.s):
            for i, name in enumerate(INTERFACES):
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                     socket.htons(ETH_P_ALL))
                sock.bind((f"s{i}", 0))
                sock.setblocking(False)
                self.sockets[name] = sock

    def load(self, ruleset_text: str) -> None:
        netns.run("iptables-legacy-restore", netns=self.k, input=ruleset_text)
        # A counting rule in raw PREROUTING tells when a frame has reached the IP layer.
        netns.run("iptables-legacy", "-t", "raw", "-A", "PREROUTING", netns=self.k)

    def counters(self) -> dict[tuple[str, str, int], int]:
        return counter_snapshot(netns.run("iptables-legacy-save", "-c", netns=self.k).stdout)

    def _drain(self) -> None:
        for sock in self.sockets.values():
            while True:
                try:
                    sock.recv(65535)
                except BlockingIOError:
                    break

    def send(self, iface: str, frame: bytes, wait_reply: float = 0.0) -> KernelOutcome:
        self._drain()
        before = self.counters()
        self.sockets[iface].send(frame)
        deadline = time.monotonic() + 2.0
        marker = ("raw", "PREROUTING", 0)
        after = self.counters()
        while after.get(marker) == before.get(marker) and time.monotonic() < deadline:
            time.sleep(0.002)
            after = self.counters()
        time.sleep(0.002)
        after = self.counters()
        replies = self._replies(wait_reply)
        delta = {key: after[key] - before.get(key, 0) for key in after
                 if key[0] != "raw" and after[key] != before.get(key, 0)}
        return KernelOutcome(delta, replies)

    def _replies(self, wait: float) -> list[bytes]:
        """IPv4 frames K sent out of any interface (its own chatter filtered by caller)."""
        frames = []
        deadline = time.monotonic() + wait
        socks = list(self.sockets.values())
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(socks, [], [], timeout)
            if not ready:
                return frames
            for sock in ready:
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    continue
                if addr[2] != socket.PACKET_OUTGOING and data[12:14] == b"\x08\x00":
                    frames.append(data)
