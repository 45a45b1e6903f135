"""`bpfilter demo`: an example ruleset on a throwaway veth pair, with real packets.

Two namespaces are joined by a veth pair (bpfilter.testbed); the ruleset is applied on the
server side exactly as `bpfilter apply` does it; the client sends a scripted set of
frames; what each frame met (the rule, the verdict, the reply), what LOG rules logged and
the per-rule counters are shown; everything is removed again, also on failure or Ctrl-C.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Packet

from bpfilter import ir
from bpfilter.runtime import deploy, state
from bpfilter.testbed import netns, SERVER_ADDR, VethBed
from bpfilter.frontend import parse_ruleset, rule_words
from bpfilter.runtime.logs import Logged, LogReader


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
    rules: list[tuple[str, str, int]]  # (table, chain, rule index or -1) that counted it
    reply: str


@dataclass
class DemoResult:
    ruleset: ir.Ruleset
    report: deploy.ApplyReport
    observations: list[Observation]
    counters: dict[tuple[str, str, int], ir.Counters]
    logged: list[str]  # LOG's lines, as `bpfilter log` prints them


def run_demo(rules_path: Path, build_dir: Path, probes: list[Probe],
             say: Callable[[str], None]) -> DemoResult:
    text = rules_path.read_bytes().decode("utf-8", "surrogateescape")
    ruleset = parse_ruleset(text, str(rules_path))
    with VethBed(build_dir) as bed:
        say(f"namespaces {bed.client} -> {bed.server}, veth eth0 <-> eth0")
        with netns.entered(bed.server):
            report = deploy.apply(text, str(rules_path), "eth0", build_dir / "server")
            say(f"applied {rules_path} on {bed.server}/eth0: program "
                f"{report.deployment.prog_id}, {report.deployment.mode} XDP")
            try:
                paths = state.Paths("eth0", state.netns_id())
                with deploy.LiveCounters(paths, report.deployment) as live:
                    keys = [(t, c, i) for t, c, i, _s in report.deployment.slots]
                    observations = []
                    for probe in probes:
                        before = {k: live(*k).packets for k in keys}
                        replies = bed.send(bed.frame(probe.packet))
                        after = {k: live(*k).packets for k in keys}
                        counted = [k for k in keys if after[k] != before[k]]
                        observations.append(Observation(probe, counted,
                                                        _describe(replies)))
                    totals = {k: live(*k) for k in keys}
                logged: list[Logged] = []
                with LogReader([(paths, report.deployment, ruleset)],
                               logged.append) as reader:
                    reader.consume()
                names = dict(socket.if_nameindex())
            finally:
                deploy.detach("eth0")
                say("detached; removing the namespaces")
    return DemoResult(ruleset, report, observations, totals,
                      [entry.line(names) for entry in logged])


def _describe(replies: list[IP]) -> str:
    for reply in replies:
        if TCP in reply and reply[TCP].flags.R:
            return "TCP RST"
        if ICMP in reply:
            kind = {0: "echo reply", 3: "ICMP unreachable"}.get(reply[ICMP].type,
                                                                "ICMP")
            return f"{kind} (code {reply[ICMP].code})" if reply[ICMP].type == 3 else kind
        if TCP in reply:
            return f"TCP {reply[TCP].flags}"
    return "nothing"


def _target(ruleset: ir.Ruleset, key: tuple[str, str, int]):
    table, chain, index = key
    c = ruleset.table(table).chain(chain)
    return c.policy if index < 0 else c.rules[index].target


def deciding(ruleset: ir.Ruleset, rules: list[tuple[str, str, int]]) -> tuple[str, str, int]:
    """The rule that decided: one that dropped or rejected the frame (nothing runs after
    it), else the last counted one that accepted it (a verdict or a policy; an accepted
    frame goes on to the next table's chains), else the last counted."""
    def ends(key, kinds) -> bool:
        target = _target(ruleset, key)
        verdict = target.verdict if isinstance(target, ir.VerdictTarget) else target
        return isinstance(target, ir.RejectTarget) or verdict in kinds

    dropped = [k for k in rules if ends(k, (ir.Verdict.DROP,))]
    accepted = [k for k in rules if ends(k, (ir.Verdict.ACCEPT,))]
    return (dropped or accepted or rules)[-1]


def verdict(ruleset: ir.Ruleset, rules: list[tuple[str, str, int]]) -> str:
    """What the deciding rule did with the frame."""
    if not rules:
        return "left to the kernel"
    target = _target(ruleset, deciding(ruleset, rules))
    if isinstance(target, ir.Verdict):
        return target.value
    if isinstance(target, ir.VerdictTarget):
        return target.verdict.value
    if isinstance(target, ir.RejectTarget):
        return f"REJECT ({target.with_.value})"
    return type(target).__name__


def rule_label(ruleset: ir.Ruleset, table: str, chain: str, index: int) -> str:
    """The rule in its ruleset's words (iptables' or nft's)."""
    t = ruleset.table(table)
    c = t.chain(chain)
    if index < 0:
        return f"policy {c.policy.value} of {chain}"
    return rule_words(t, chain, c.rules[index])
