"""`bpfilter demo`: an example ruleset on a throwaway veth pair, with real packets.

Two namespaces (client, server) are joined by a veth pair; the ruleset is compiled, loaded
and attached at XDP (native) on the server side; the client sends a scripted set of
frames; what each frame met (the rule, the verdict, the reply) and the per-rule counters
are shown; everything is removed again, also on failure or Ctrl-C.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from bpfilter import ir, netns
from bpfilter.compiler import Compilation, compile_ruleset
from bpfilter.frontend.iptables.save import rule_text
from bpfilter.loader.xdp import XdpMode, xdp_attach, xdp_detach
from bpfilter.runner import LoadedRuleset

SERVER_ADDR, CLIENT_ADDR = "198.18.0.1", "198.18.0.2"
PASS_ALL = "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"


@dataclass(frozen=True)
class Probe:
    what: str
    packet: Packet


def host_firewall_probes() -> list[Probe]:
    dst = SERVER_ADDR
    return [
        Probe("SSH from the admin network", IP(src="203.0.113.5", dst=dst) / TCP(dport=22, flags="S")),
        Probe("SSH from elsewhere", IP(src="192.0.2.44", dst=dst) / TCP(dport=22, flags="S")),
        Probe("HTTPS from anywhere", IP(src="192.0.2.44", dst=dst) / TCP(dport=443, flags="S")),
        Probe("a NULL scan", IP(src="192.0.2.44", dst=dst) / TCP(dport=80, flags="")),
        Probe("DNS answer", IP(src="192.0.2.53", dst=dst) / UDP(sport=53, dport=40000)),
        Probe("UDP to a closed port", IP(src="192.0.2.44", dst=dst) / UDP(sport=40000, dport=9999)),
        Probe("GRE", IP(src="192.0.2.44", dst=dst, proto=47) / b"\x00\x00\x08\x00"),
        Probe("ping", IP(src="192.0.2.44", dst=dst) / ICMP(type=8)),
        Probe("from the blocked range", IP(src="198.51.100.15", dst=dst) / UDP(sport=40000, dport=9999)),
        Probe("TTL 1", IP(src="192.0.2.44", dst=dst, ttl=1) / UDP(sport=40000, dport=9999)),
        Probe("oversized datagram", IP(src="192.0.2.44", dst=dst) / UDP(sport=40000) / (b"x" * 1450)),
    ]


@dataclass
class Observation:
    probe: Probe
    rules: list[tuple[str, int]]  # (chain, rule index or -1 for policy) that counted it
    reply: str


class Demo:
    def __init__(self, rules_path: Path, build_dir: Path, say: Callable[[str], None]):
        self.rules_path = rules_path
        self.build_dir = build_dir
        self.say = say
        self.namespaces: list[str] = []
        self.attached: list[tuple[str, int]] = []
        self.loaded: LoadedRuleset | None = None
        self.passthrough: LoadedRuleset | None = None
        self.sock: socket.socket | None = None

    def run(self, probes: list[Probe]) -> tuple[Compilation, list[Observation]]:
        try:
            return self._run(probes)
        finally:
            self.cleanup()

    def _run(self, probes: list[Probe]):
        text = self.rules_path.read_text()
        self.say(f"compiling {self.rules_path}")
        compilation = compile_ruleset(text, str(self.rules_path), self.build_dir)
        server = self._namespace("bpfd-server")
        client = self._namespace("bpfd-client")
        self.say(f"namespaces {client} -> {server}, veth eth0 <-> eth0")
        netns.veth("eth0", server, "eth0", client)
        netns.run("ip", "addr", "add", f"{SERVER_ADDR}/15", "dev", "eth0", netns=server)
        netns.run("ip", "addr", "add", f"{CLIENT_ADDR}/15", "dev", "eth0", netns=client)
        # The client is the server's gateway, so the server's own replies (to ACCEPTed
        # frames) find a neighbour.
        netns.run("ip", "route", "add", "default", "via", CLIENT_ADDR, netns=server)
        for key in ("all", "default", "eth0"):
            netns.sysctl(server, f"net.ipv4.conf.{key}.rp_filter", "0")
        server_index, server_mac = netns.link_info(server, "eth0")
        client_index, client_mac = netns.link_info(client, "eth0")
        self.loaded = LoadedRuleset(compilation, netns.interfaces(server))
        program = next(iter(self.loaded.stages.values())).program
        self._attach(server, server_index, program.fd)
        self.say(f"attached {program.name} (XDP native) to {server}/eth0")
        # veth hands XDP_TX frames (REJECT replies) only to a peer that runs XDP itself:
        # give the client an empty ruleset, which passes everything.
        self.passthrough = LoadedRuleset(compile_ruleset(
            PASS_ALL, "<pass-through>", self.build_dir / "pass-through"))
        self._attach(client, client_index,
                     next(iter(self.passthrough.stages.values())).program.fd)
        with netns.entered(client):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            self.sock.bind(("eth0", 0))
        observations = []
        for probe in probes:
            frame = Ether(src=client_mac, dst=server_mac) / probe.packet
            observations.append(self._probe(probe, bytes(frame)))
        return compilation, observations

    def _counters(self) -> dict[tuple[str, int], int]:
        return {(chain, index): self.loaded.counters(table, chain, index).packets
                for (table, chain, index) in self.loaded.compilation.slots
                if table == "filter"}

    def _probe(self, probe: Probe, frame: bytes) -> Observation:
        while select.select([self.sock], [], [], 0)[0]:
            self.sock.recv(65535)
        before = self._counters()
        self.sock.send(frame)
        replies = []
        deadline = time.monotonic() + 0.3
        while (wait := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], wait)[0]:
                break
            data, addr = self.sock.recvfrom(65535)
            if addr[2] != socket.PACKET_OUTGOING and IP in Ether(data):
                replies.append(Ether(data)[IP])
        after = self._counters()
        rules = [key for key in after if after[key] != before.get(key)]
        return Observation(probe, rules, _describe(replies, probe.packet))

    def _attach(self, namespace: str, ifindex: int, prog_fd: int) -> None:
        with netns.entered(namespace):
            xdp_attach(ifindex, prog_fd, XdpMode.NATIVE)
        self.attached.append((namespace, ifindex))

    def _namespace(self, prefix: str) -> str:
        name = netns.create(netns.unique_name(prefix))
        self.namespaces.append(name)
        return name

    def cleanup(self) -> None:
        if self.sock is not None:
            self.sock.close()
        for namespace, index in self.attached:
            with netns.entered(namespace):
                xdp_detach(index, XdpMode.NATIVE)
        self.attached.clear()
        for loaded in (self.loaded, self.passthrough):
            if loaded is not None:
                loaded.close()
        for name in self.namespaces:
            netns.delete(name)
        self.namespaces.clear()


def _describe(replies: list[IP], sent: IP) -> str:
    for reply in replies:
        if reply.dst != sent.src:
            continue
        if TCP in reply and reply[TCP].flags.R:
            return "TCP RST"
        if ICMP in reply:
            kind = {0: "echo reply", 3: "ICMP unreachable"}.get(reply[ICMP].type,
                                                                "ICMP")
            return f"{kind} (code {reply[ICMP].code})" if reply[ICMP].type == 3 else kind
        if TCP in reply:
            return f"TCP {reply[TCP].flags}"
    return "nothing"


def verdict(ruleset: ir.Ruleset, rules: list[tuple[str, int]]) -> str:
    """What the deciding (last counted) rule did with the frame."""
    if not rules:
        return "left to the kernel"
    chain, index = rules[-1]
    c = ruleset.table("filter").chain(chain)
    target = c.policy if index < 0 else c.rules[index].target
    if isinstance(target, ir.Verdict):
        return target.value
    if isinstance(target, ir.VerdictTarget):
        return target.verdict.value
    if isinstance(target, ir.RejectTarget):
        return f"REJECT ({target.with_.value})"
    return type(target).__name__


def rule_label(ruleset: ir.Ruleset, chain: str, index: int) -> str:
    table = ruleset.table("filter")
    c = table.chain(chain)
    if index < 0:
        return f"policy {c.policy.value} of {chain}"
    return rule_text(chain, c.rules[index])
