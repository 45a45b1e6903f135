"""Mirror namespaces: the kernel's iptables-legacy (or nftables, for an nftables ruleset)
on one server, bpfilter on the other, the same frames sent to both over real veths.

What is compared is what an outside observer sees: whether the server's stack delivered
the frame (Ip:InDelivers) and which replies came back (bpfilter's REJECT replies, or the
stack's own answers to accepted frames)."""

from __future__ import annotations

import functools
import os
import socket
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from pyroute2 import Conntrack

from bpfilter import ir
from bpfilter.runtime import conntable, deploy, state
from bpfilter.testbed import netns, SERVER_ADDR, VethBed
from bpfilter.codegen import Attach
from bpfilter.frontend import dialect, parse_ruleset, xtables_sections
from bpfilter.frontend.iptables.names import BUILTIN_CHAINS
from bpfilter.frontend.iptables.save import save
from bpfilter.passes.validate import COMPILED_TABLES
from tests.conftest import EXAMPLES
from tests.conformance.rulesets import kinds

# No shrinking: every case reloads rulesets and sends real frames, so shrinking takes
# minutes; the assertion already names the frame and prints the ruleset.
SETTINGS = dict(deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=list(HealthCheck))

# Generated rulesets and flows are the suite's budget (about 20 minutes on 2 cores):
# BPFILTER_CONFORMANCE_SCALE=3 makes three times as many of each, for a longer run.
SCALE = float(os.environ.get("BPFILTER_CONFORMANCE_SCALE", "1"))


def count(n: int) -> int:
    """How many generated cases a run of `n` (the suite's own size) makes."""
    return max(1, round(n * SCALE))


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    replies: tuple[str, ...]
    forwarded: bool = False  # the far namespace received it (beds that forward)


def _kind(reply: Packet) -> str:
    if IPv6 in reply and reply[IPv6].nh == 58:
        message = bytes(reply[IPv6].payload)
        return f"ICMPv6 {message[0]}/{message[1]}"
    if TCP in reply:
        return f"TCP {reply[TCP].flags}"
    if ICMP in reply:
        return f"ICMP {reply[ICMP].type}/{reply[ICMP].code}"
    return f"IP proto {reply[IPv6].nh if IPv6 in reply else reply.proto}"


def observe(bed: VethBed, frame: Ether) -> Outcome:
    return observe_replies(bed, frame)[0]


def observe_replies(bed: VethBed, frame: Ether) -> tuple[Outcome, list[IP]]:
    """The outcome, and the replies themselves (for a client that answers them)."""
    frame = frame.copy()
    frame.dst = bed.server_mac
    ipv6 = IPv6 in frame
    before, passed = bed.delivered(ipv6), _forwarded(bed, ipv6)
    replies = bed.send(bytes(frame))
    return (Outcome(bed.delivered(ipv6) > before, tuple(sorted(_kind(r) for r in replies)),
                    _forwarded(bed, ipv6) > passed), replies)


def observe_sent(bed: VethBed, packet: IP) -> Outcome:
    """The server sends the packet itself: did the client receive it, and which replies
    came back into the server."""
    received = functools.partial(bed.received, IPv6 in packet)
    before = _settled(received)
    replies = bed.send_from_server(bytes(packet))
    return Outcome(_settled(received) > before,
                   tuple(sorted(_kind(r) for r in replies)))


def _forwarded(bed: VethBed, ipv6: bool) -> int:
    """The far end handles a forwarded frame after the router, possibly after the
    router's ARP answer."""
    return _settled(functools.partial(bed.forwarded, ipv6)) if bed.far is not None else 0


def _settled(count: Callable[[], int]) -> int:
    """A counter of another namespace once it stops moving."""
    value = count()
    while True:
        time.sleep(0.005)
        again = count()
        if again == value:
            return value
        value = again


def whole(text: str) -> str:
    """The ruleset with every table bpfilter compiles: iptables-restore replaces only the
    tables its input has (a raw table of the previous ruleset would stay), while
    bpfilter's apply replaces the whole ruleset."""
    present = {t.name for t in parse_ruleset(text).tables} if text else set()
    empty = "".join(f"*{table}\n" + "".join(f":{chain} ACCEPT [0:0]\n"
                                             for chain in BUILTIN_CHAINS[table]) + "COMMIT\n"
                    for table in COMPILED_TABLES if table not in present)
    return text + empty


class MirrorPair:
    def __init__(self, build_dir: Path, attach: Attach = Attach.XDP, forward: bool = False):
        """`forward`: the servers route on to a far namespace (bpfilter then runs on both
        of its interfaces: FORWARD holds for packets coming in on either)."""
        self.build_dir = build_dir
        self.attach = attach
        self.ifaces = ("eth0", "eth1") if forward else ("eth0",)
        self.kernel = VethBed(build_dir / "kernel-bed", prefix="bpfc", forward=forward)
        try:
            self.bpf = VethBed(build_dir / "bpf-bed", prefix="bpfc", forward=forward)
        except BaseException:
            self.kernel.close()
            raise
        self.loads = 0
        self.agreement: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def load(self, text: str) -> None:
        # Each ruleset starts from no connections on both sides, whatever the ones before
        # it left behind.
        with netns.entered(self.kernel.server):
            table = Conntrack()
            try:
                table.flush()
            finally:
                table.close()
        with netns.entered(self.bpf.server):
            paths = state.Paths("eth0", state.netns_id())
            if paths.conntrack.exists():
                conntable.flush(paths)
        # The kernel side's three front-ends: the one the ruleset is for gets it, the others
        # are emptied (a ruleset replaces the whole previous one, as bpfilter's apply).
        kind = dialect(text)
        sections = xtables_sections(text) if kind.endswith("tables") else []
        netns.run("nft", "flush", "ruleset", netns=self.kernel.server)
        for restore, family in (("iptables-legacy-restore", ir.Family.IPV4),
                                ("ip6tables-legacy-restore", ir.Family.IPV6)):
            netns.run(restore, netns=self.kernel.server, input=whole("".join(
                section for its, section in sections if its is family)))
        if kind.startswith("nft"):
            netns.run("nft", *(("-j",) if kind == "nft-json" else ()), "-f", "-",
                      netns=self.kernel.server, input=text)
        with netns.entered(self.bpf.server):
            for iface in self.ifaces:
                deploy.apply(text, "<conformance>", iface, self.build_dir / "rules",
                             attach=self.attach)
        self.loads += 1

    def compare(self, frame: Ether, kinds: set[str]) -> tuple[Outcome, Outcome]:
        """A frame from the client to the server (or through it)."""
        return self.tally(observe(self.kernel, frame), observe(self.bpf, frame), kinds)

    def compare_sent(self, packet: IP, kinds: set[str]) -> tuple[Outcome, Outcome]:
        """A packet the server sends."""
        return self.tally(observe_sent(self.kernel, packet), observe_sent(self.bpf, packet),
                           kinds)

    def tally(self, kernel: Outcome, ours: Outcome,
               kinds: set[str]) -> tuple[Outcome, Outcome]:
        for kind in kinds | {"all cases"}:
            self.agreement[kind][0] += 1
            self.agreement[kind][1] += kernel == ours
        return kernel, ours

    def table(self) -> Table:
        table = Table(title=f"conformance with the kernel ({self.loads} rulesets, "
                            f"bpfilter at {self.attach.name})",
                      title_justify="left")
        for col in ("rules using", "cases", "agree", "%"):
            table.add_column(col, justify="left" if col == "rules using" else "right")
        for kind, (cases, agreed) in sorted(self.agreement.items(),
                                            key=lambda kv: (kv[0] != "all cases", kv[0])):
            table.add_row(kind, str(cases), str(agreed), f"{100 * agreed / cases:.1f}")
        return table

    def print_table(self) -> None:
        Console(width=100).print(self.table())

    def close(self) -> None:
        with netns.entered(self.bpf.server):
            for iface in self.ifaces:
                try:
                    deploy.detach(iface)
                except Exception:  # nothing was applied
                    pass
        self.kernel.close()
        self.bpf.close()


def check(pair: MirrorPair, text: str, ruleset, cases, sent: bool = False) -> None:
    """Every case meets the same fate on both sides: (interface, frame) cases sent to the
    server, or with `sent` IP packets the server sends itself."""
    used = kinds(ruleset)
    for case in cases:
        packet = case if sent else case[1]
        kernel, ours = (pair.compare_sent if sent else pair.compare)(packet, used)
        origin = "" if sent else f", from {packet.src}"
        hops = packet[IP].ttl if IP in packet else packet[IPv6].hlim
        assert ours == kernel, (f"{packet.summary()} (ttl {hops}, {len(packet)} "
                                f"bytes{origin}): kernel {kernel}, bpfilter {ours}\n"
                                f"ruleset:\n{text}")


def check_example(pair: MirrorPair, name: str, cases: Callable, count: int,
                  sent: bool = False, text: str | None = None) -> None:
    """An example from examples/ (or `text`, a rewriting of it) loaded on both sides, and
    `count` cases drawn from `cases(ruleset)`."""
    text = (EXAMPLES / name).read_text() if text is None else text
    ruleset = parse_ruleset(text, name)
    pair.load(text)

    @settings(max_examples=count, **SETTINGS)
    @given(cases(ruleset))
    def run(case):
        check(pair, text, ruleset, [case], sent)

    run()


def check_generated(pair: MirrorPair, data, strategy, cases: Callable, count: int,
                    sent: bool = False, render: Callable | None = save) -> None:
    """A ruleset drawn from `strategy` loaded on both sides as `render` writes it (or as
    drawn, text, without one), and `count` cases drawn from `cases(ruleset)` (within a
    test given `data=st.data()`)."""
    drawn = data.draw(strategy, label="ruleset")
    text = drawn if render is None else render(drawn)
    ruleset = parse_ruleset(text, "<generated>")
    pair.load(text)
    drawn = data.draw(st.lists(cases(ruleset), min_size=count, max_size=count),
                      label="cases")
    check(pair, text, ruleset, drawn, sent)


# With `forward`, the far host that listens (on port 80).
FAR_LISTENER = "203.0.113.2"


@contextmanager
def listening_pair(build_dir: Path, ruleset: Optional[str] = None, forward: bool = False,
                   attach: Attach = Attach.XDP) -> Iterator[MirrorPair]:
    """A mirror pair (running `ruleset`, if given) whose servers listen on port 22 (and,
    with `forward`, whose far hosts listen on FAR_LISTENER port 80): a SYN there gets a
    SYN/ACK (elsewhere a RST), so handshakes move the connections on. Never twice: a
    retransmission would land in a later frame's window."""
    pair = MirrorPair(build_dir, attach, forward=forward)
    listeners = []
    try:
        if ruleset is not None:
            pair.load(ruleset)
        for bed in (pair.kernel, pair.bpf):
            places = [(bed.server, SERVER_ADDR, 22)]
            if forward:
                places.append((bed.far, FAR_LISTENER, 80))
            for namespace, address, port in places:
                netns.sysctl(namespace, "net.ipv4.tcp_synack_retries", "0")
                with netns.entered(namespace):
                    listeners.append(socket.create_server((address, port)))
        yield pair
        pair.print_table()
    finally:
        for listener in listeners:
            listener.close()
        pair.close()


def compare_repeated(pair: MirrorPair, packet: IP, times: int, kind: str) -> None:
    """The same packet from the client `times` times to both servers, the same outcome
    each time: rules whose state moves with every packet (counts, numbers)."""
    for number in range(times):
        kernel, ours = pair.compare(Ether(src=pair.kernel.client_mac) / packet, {kind})
        assert ours == kernel, f"frame {number}: kernel {kernel}, bpfilter {ours}"


BURST_BATCH = 50  # frames sent at once: a veth's ring holds 256


def burst(bed: VethBed, packet: IP, times: int) -> None:
    """The packet from the client `times` times without waiting for answers (a rule's
    proportions), paced so that the veth drops none; returns once they have arrived."""
    frame = bed.frame(packet)
    for sent in range(times):
        bed.sock.send(frame)
        if sent % BURST_BATCH == BURST_BATCH - 1:
            time.sleep(0.005)
    time.sleep(0.3)
