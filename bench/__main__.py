"""python -m bench: packets per second through each filter as the ruleset grows.

For every N and every contender a fresh pair of namespaces is made, the N-rule ACL is
loaded, and the in-kernel generator (bpfilter/testbed/traffic.py) sends the packet that matches
the last rule from the client. The receive path runs in the sender's context, so packets
per second of the generator call is the throughput of the whole receive path.
Every measurement is checked: the deciding rule counted every packet sent, no other rule
counted any, and the stack behind the filter saw none (or all, with no filter). A
contender that fails this gets no throughput figure, and the run exits 1.
Results: a table, JSON, and a PNG plot (when matplotlib is installed).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.table import Table
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from bench.contenders import (CONTENDERS, HOOKS, IPV6_RULESETS, NEW_FLOWS, RULESETS, Setup,
                              contenders)
from bpfilter.testbed import netns, SERVER_ADDR, SERVER_ADDR6
from bpfilter.compiler import compile_ruleset
from bpfilter.runtime.runner import LoadedRuleset
from bpfilter.testbed.traffic import Generator
from examples.make_kube import cluster_ip

console = Console()
PACKET = IP(src="192.0.2.1", dst=SERVER_ADDR) / UDP(sport=1234, dport=9)  # 64-byte frame
# For the rulesets whose packet the server routes on: to a host of the far network.
ROUTED = IP(src="198.51.100.9", dst="203.0.113.7") / UDP(sport=1234, dport=9)
PACKET6 = IPv6(src="2001:db8::1", dst=SERVER_ADDR6) / UDP(sport=1234, dport=9)  # 66 bytes


def _packet(ruleset: str, n: int) -> Packet:
    if ruleset in IPV6_RULESETS:
        return PACKET6
    if ruleset in NEW_FLOWS:  # to the last of N services (its source port below the flows')
        return IP(src="198.51.100.9", dst=cluster_ip(n - 1)) / UDP(sport=1000, dport=80)
    return ROUTED if HOOKS[ruleset] == "forward" else PACKET


def _mpps(setup: Setup, build: Path, seconds: float, packet: Packet,
          flows: bool = False) -> tuple[float, int, int]:
    """The median of three bursts, how many packets were sent in all, and in how many
    bursts. `flows`: every packet a new connection (templates/xdp_tx.c counts its source
    port and address up)."""
    bed = setup.bed
    frame = bed.frame(packet)
    with netns.entered(bed.client), Generator(build / "generator") as gen:
        def send(count: int):
            return gen.send(frame, bed.client_index, count, flows)

        bursts = [send(1000), send(2000)]  # the first a warm-up
        while bursts[-1].seconds < seconds / 8 and bursts[-1].packets < 1 << 26:
            bursts.append(send(bursts[-1].packets * 4))
        count = max(1000, int(bursts[-1].packets * (seconds / 3) / bursts[-1].seconds))
        measured = [send(count) for _ in range(3)]
    return (statistics.median(b.mpps for b in measured),
            sum(b.packets for b in bursts + measured), len(bursts + measured))


def _behind(setup: Setup, packet: Packet, forward: bool) -> tuple[int, int]:
    """Bench packets that got past the filter: the server sent them on (after the
    FORWARD hook; IPv4's ForwDatagrams counts before it, and the far end's veth may drop
    some at these rates), or its UDP found no socket for them; and packets its IP layer
    received at all (an overloaded stack drops some before IP: load, not a verdict)."""
    bed, v6 = setup.bed, IPv6 in packet
    if v6:
        snmp = bed.snmp6()
        return (snmp["Ip6OutForwDatagrams" if forward else "Udp6NoPorts"],
                snmp["Ip6InReceives"])
    snmp = bed.snmp()
    return snmp["Ip:OutTransmits" if forward else "Udp:NoPorts"], snmp["Ip:InReceives"]


def _wrong_verdict(setup: Setup, sent: int, passed: int, received: int,
                   decided: Optional[tuple[int, int]] = None) -> str:
    """Why the packets did not meet the fate they were meant to ('' when they did).
    `decided`: the least and most the deciding rule may count (all sent, by default)."""
    low, high = (sent, sent) if decided is None else decided
    if setup.passes:
        # A routed packet's ICMP error from the far end comes back and counts on both
        # sides; the link's own ND/MLD counts as received only, hence the small slack.
        if passed + received // 1000 >= received and passed:
            return ""
        return f"{received - passed} of {received} packets that reached IP went no further"
    if passed and not setup.forwards:
        return f"{passed} of {sent} packets got past the filter"
    if setup.tally is None:
        return ""
    tally = setup.tally()
    if not low <= tally.deciding <= high or tally.others:
        return (f"the deciding rule counted {tally.deciding} of {low}-{high} packets, "
                f"other rules {tally.others}")
    return ""


def _new_flows(setup: Setup, build: Path, seconds: float, packet: Packet
               ) -> tuple[dict, int, Optional[tuple[int, int]], str]:
    """kube: every packet a new connection, then one connection's packets. Under overload
    the server's veth ring drops packets before any filter sees them, more for the slower
    ones: the rate reported is the generator's times the share of new connections the
    service's rule counted (connections made per second), and at least half must reach
    it. The one connection's packets then add at least one count (its first) and at most
    one each: the kernel's NAT runs its chains again for some of that flow's later
    packets (measured: a first packet per generator burst and more, with or without a
    listener, its connection table holding the one entry; cause not found)."""
    mpps, sent, _bursts = _mpps(setup, build, seconds, packet, flows=True)
    first = None if setup.tally is None else setup.tally().deciding
    established, more, _bursts = _mpps(setup, build, seconds, packet)
    row = {"generator_mpps": mpps, "established_mpps": established}
    if first is None:
        return {**row, "mpps": mpps}, sent + more, None, ""
    share = first / sent
    row.update(mpps=mpps * min(1.0, share), reached_share=share)
    if not sent // 2 <= first <= sent:
        return row, sent + more, None, (f"the deciding rule counted {first} of {sent} new "
                                        "connections")
    return row, sent + more, (first + 1, first + more), ""


def _ns_per_packet(text: str, build: Path, bed, packet: Packet) -> float:
    """bpfilter's program alone, under BPF_PROG_TEST_RUN (no stack, no veth), loaded in
    the server's namespace, where the bench address is local (or routed on, through the
    server's eth0 where the packet comes in)."""
    frame = b"\x00" * 12 + (b"\x86\xdd" if IPv6 in packet else b"\x08\x00") + bytes(packet)
    compilation = compile_ruleset(text, "bench", build / "test-run", verify=False)
    with netns.entered(bed.server), LoadedRuleset(compilation) as loaded:
        program = loaded.program()
        return program.test_run(frame, ingress_ifindex=bed.server_index,
                                repeat=200_000).duration_ns


def _map_bytes(setup: Setup) -> int:
    """Memory of the bpfilter program's maps, as the kernel accounts it."""
    prog_id = setup.extra.get("prog_id")
    if prog_id is None:
        return 0
    show = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(int(prog_id))],
                          capture_output=True, text=True, check=True)
    total = 0
    for map_id in json.loads(show.stdout).get("map_ids", []):
        info = subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)],
                              capture_output=True, text=True, check=True)
        total += int(json.loads(info.stdout).get("bytes_memlock", 0))
    return total


def _plot(results: dict, sizes: list[int], path: Path, ruleset: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = {name: [(n, row[str(n)]["mpps"]) for n in sizes
                     if str(n) in row and row[str(n)]["verdict"] == "ok"]
              for name, row in results.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:  # every figure refused: nothing to draw on a log scale
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rules before the matching one (N)")
    ax.set_ylabel("Mpps, 64-byte UDP, one flow")
    ax.set_title(f"bpfilter against the kernel's filters: {ruleset} ruleset "
                 "(veth, in-kernel generator)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _measure(ruleset: str, ns: list[int], only: tuple[str, ...], seconds: float,
             build: Path, status) -> dict[str, dict[str, dict]]:
    found = contenders(ruleset)
    names = [n for n in found if not only or n in only]
    results: dict[str, dict[str, dict]] = {name: {} for name in names}
    for n in ns:
        for name in names:
            status.update(f"{ruleset}, N={n}: {name}")
            with found[name](build / f"{ruleset}-{name.split()[0]}-{n}", n) as setup:
                packet, forward = _packet(ruleset, n), HOOKS[ruleset] == "forward"
                passed, received = _behind(setup, packet, forward)
                new = ruleset in NEW_FLOWS
                problem = ""
                if new:
                    extra, sent, decided, problem = _new_flows(setup, build, seconds, packet)
                    mpps = extra.pop("mpps")
                else:
                    mpps, sent, _bursts = _mpps(setup, build, seconds, packet)
                    extra, decided = {}, None
                after = _behind(setup, packet, forward)
                wrong = problem or _wrong_verdict(setup, sent, after[0] - passed,
                                                  after[1] - received, decided)
                row = {"mpps": mpps, "packets": sent, "verdict": wrong or "ok", **extra,
                       **setup.extra}
                if name == "bpfilter XDP":
                    row["map_bytes"] = _map_bytes(setup)
                    row["ns_per_packet"] = _ns_per_packet(
                        RULESETS[ruleset](n), build / f"{ruleset}-{n}", setup.bed, packet)
            results[name][str(n)] = row
            if wrong:
                console.print(f"[red]{ruleset} N={n:>6} {name:<20} wrong verdict: {wrong}[/]")
            else:
                console.print(f"[dim]{ruleset} N={n:>6} {name:<20} {mpps:.3f} Mpps, "
                              f"{sent:,} packets, verdicts checked[/]")
    return results


def _print(ruleset: str, results: dict, ns: list[int]) -> None:
    names = list(results)
    what = {"acl": "the ACL: N blocked hosts, then the matching rule",
            "mixed": "mixed matches: N rules, then the matching rule",
            "forward": "a router: the ACL in FORWARD, the packet routed on",
            "acl6": "the ACL in IPv6 (the kernel's: ip6tables, nft ip6)",
            "kube": "kube-proxy: N services, every packet a new connection to the last one "
                    "(after the slash: one established connection's packets)"}[ruleset]
    table = Table(title=f"Mpps, 64-byte UDP, one flow; {what}", title_justify="left")
    table.add_column("N", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    ratios = [(other, label) for other, label in (("XDP drop-all", "bpfilter / drop-all"),
                                                  ("nft (one set)", "bpfilter / nft set"),
                                                  ("kube-proxy nft mode", "bpfilter / nft mode"),
                                                  ("iptables-legacy", "bpfilter / legacy"))
              if other in names and "bpfilter XDP" in names]
    for _other, label in ratios:
        table.add_column(label, justify="right")
    for n in ns:
        rows = {name: results[name][str(n)] for name in names}
        cells = [(f"{row['mpps']:.3f}" + (f" / {row['established_mpps']:.2f}"
                                           if "established_mpps" in row else ""))
                 if row["verdict"] == "ok" else "[red]wrong verdict[/]"
                 for row in rows.values()]
        for other, _label in ratios:
            if rows["bpfilter XDP"]["verdict"] != "ok" or rows[other]["verdict"] != "ok":
                cells.append("-")
                continue
            ratio = rows["bpfilter XDP"]["mpps"] / rows[other]["mpps"]
            cells.append(f"{100 * ratio:.0f}%" if other == "XDP drop-all" else f"{ratio:.1f}x")
        table.add_row(f"{n:,}", *cells)
    console.print(table)
    if "bpfilter XDP" in names:
        detail = Table(title=f"bpfilter per N ({ruleset})", title_justify="left")
        for col in ("N", "compile+load+attach", "ns/packet (test_run)", "map memory"):
            detail.add_column(col, justify="right")
        for n in ns:
            row = results["bpfilter XDP"][str(n)]
            detail.add_row(f"{n:,}", f"{row['load_s']:.2f} s",
                           f"{row.get('ns_per_packet', 0):.0f}",
                           f"{row.get('map_bytes', 0) / 1024:.0f} KiB")
        console.print(detail)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sizes", default="1,100,1000,10000", show_default=True,
              help="Comma-separated rule counts N.")
@click.option("--seconds", default=0.6, show_default=True,
              help="Time spent sending per measurement (3 runs, median).")
@click.option("--ruleset", "rulesets", multiple=True, type=click.Choice(sorted(RULESETS)),
              help="Which rulesets [default: all].")
@click.option("--only", multiple=True, type=click.Choice(sorted(CONTENDERS)),
              help="Measure only these contenders (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench/results"), show_default=True)
def main(sizes: str, seconds: float, rulesets: tuple[str, ...], only: tuple[str, ...],
         out: Path) -> None:
    """Throughput of bpfilter against iptables-legacy, iptables-nft and nftables."""
    ns = [int(s) for s in sizes.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    # A fresh object cache, so that bpfilter's load time includes compiling.
    os.environ["BPFILTER_CACHE"] = tempfile.mkdtemp(prefix="bpfilter-bench-cache-")
    build = Path(tempfile.mkdtemp(prefix="bpfilter-bench-"))
    results = {}
    with console.status("measuring…") as status:
        for ruleset in rulesets or tuple(RULESETS):
            results[ruleset] = _measure(ruleset, ns, only, seconds, build, status)
    for ruleset, found in results.items():
        _print(ruleset, found, ns)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"when": stamp, "kernel": platform.release(), "sizes": ns,
              "seconds": seconds, "results": results}
    json_path = out / f"throughput-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1))
    console.print(f"JSON: {json_path}")
    for ruleset, found in results.items():
        png = out / f"throughput-{stamp}-{ruleset}.png"
        if _plot(found, ns, png, ruleset):
            console.print(f"plot: {png}")
        else:
            console.print("[dim]no plot: pip install matplotlib[/]")
            break
    wrong = [(ruleset, name, n, row["verdict"]) for ruleset, found in results.items()
             for name, rows in found.items() for n, row in rows.items()
             if row["verdict"] != "ok"]
    for ruleset, name, n, why in wrong:
        console.print(f"[red]wrong verdict: {ruleset}, N={n}, {name}: {why}[/]")
    if wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
