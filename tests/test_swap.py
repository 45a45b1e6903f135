"""Swapping rulesets under continuous traffic: every packet gets the old or the new
verdict, none is lost or misclassified. Traffic comes from the in-kernel generator."""

from __future__ import annotations

import socket
import statistics
import threading

from scapy.layers.inet import IP, TCP, UDP

from bpfilter.runtime import deploy
from bpfilter.testbed import netns, SERVER_ADDR, VethBed
from bpfilter.testbed.traffic import Generator
from examples.make_acl import acl
from tests.conftest import EXAMPLES

# Both rulesets accept X and drop Y; B is 1,000 rules long, so each swap changes program.
RULES_A = ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 192.0.2.99/32 -j DROP\n"
           "-A INPUT -p udp -m udp --sport 53 -j ACCEPT\nCOMMIT\n")
RULES_B = acl(998).replace("-A INPUT -p udp -j DROP\n",
                           "-A INPUT -s 192.0.2.99/32 -j DROP\n"
                           "-A INPUT -p udp -m udp --sport 53 -j ACCEPT\n")
SWAPS = 20
BURST = 2000


def test_swaps_under_load_lose_and_misclassify_nothing(kernel, build_root, capsys):
    with VethBed(build_root / "swap", prefix="bpft") as bed:
        flow_x = bed.frame(IP(src="192.0.2.53", dst=SERVER_ADDR) / UDP(sport=53, dport=7))
        flow_y = bed.frame(IP(src="192.0.2.99", dst=SERVER_ADDR) / TCP(dport=80, flags="S"))
        with netns.entered(bed.server):
            deploy.apply(RULES_A, "a.v4", "eth0", build_root / "swap-a")
            deploy.apply(RULES_B, "b.v4", "eth0", build_root / "swap-b")  # warm the cache
        before = bed.snmp()
        sent = {"x": 0, "y": 0}
        stop = threading.Event()

        def traffic() -> None:
            with netns.entered(bed.client), Generator(build_root / "gen") as gen:
                ifindex = socket.if_nametoindex("eth0")
                while not stop.is_set():
                    sent["x"] += gen.send(flow_x, ifindex, BURST).packets
                    sent["y"] += gen.send(flow_y, ifindex, BURST).packets

        sender = threading.Thread(target=traffic)
        sender.start()
        switches, totals = [], []
        try:
            with netns.entered(bed.server):
                for i in range(SWAPS):
                    rules, name = (RULES_A, "a.v4") if i % 2 else (RULES_B, "b.v4")
                    report = deploy.apply(rules, name, "eth0", build_root / f"swap-{name}")
                    switches.append(report.switch_ns / 1e6)
                    totals.append(report.total_s)
        finally:
            stop.set()
            sender.join()
        after = bed.snmp()
        with netns.entered(bed.server):
            deploy.detach("eth0")
    udp = sum(after[k] - before[k] for k in ("Udp:InDatagrams", "Udp:NoPorts", "Udp:InErrors"))
    tcp = after["Tcp:InSegs"] - before["Tcp:InSegs"]
    with capsys.disabled():
        print(f"\nswap under load: {SWAPS} swaps, {sent['x']} accepted + {sent['y']} dropped "
              f"packets sent, {udp} delivered, {tcp} leaked; switch median "
              f"{statistics.median(switches):.2f} ms max {max(switches):.2f} ms, apply "
              f"median {statistics.median(totals):.2f} s")
    assert sent["x"] > 0 and sent["y"] > 0
    assert udp == sent["x"], "accepted packets were lost"
    assert tcp == 0, "dropped packets got through"


def test_swap_time_of_the_1000_rule_example(kernel, build_root, capsys):
    """Measured, not asserted: the closing note reports these numbers."""
    acl_text = (EXAMPLES / "acl-1000.v4").read_text()
    host_text = (EXAMPLES / "host-firewall.v4").read_text()
    with VethBed(build_root / "swaptime", prefix="bpft") as bed, netns.entered(bed.server):
        deploy.apply(host_text, "host.v4", "eth0", build_root / "st-host")
        switches, totals = [], []
        for _ in range(5):
            report = deploy.apply(acl_text, "acl-1000.v4", "eth0", build_root / "st-acl")
            switches.append(report.switch_ns / 1e6)
            totals.append(report.total_s)
            deploy.apply(host_text, "host.v4", "eth0", build_root / "st-host")
        deploy.detach("eth0")
    with capsys.disabled():
        print(f"\nacl-1000 swap: switch median {statistics.median(switches):.2f} ms, max "
              f"{max(switches):.2f} ms; whole apply (compiled objects cached) median "
              f"{statistics.median(totals):.2f} s, max {max(totals):.2f} s")
    assert len(switches) == 5
