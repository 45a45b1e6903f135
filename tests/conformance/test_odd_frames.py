"""The frames nobody generates, against the kernel at XDP and TC: martian sources and
destinations, frames for another host's MAC, bad transport checksums, IP options in what
an ICMP error quotes, bursts past the kernel's ICMP rate limit, IPv6 link-local packets
routed back out. Deliveries, replies (and their bytes where they differ only there) and
every rule's counter must be the kernel's."""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfilter.runtime import deploy, state
from bpfilter.testbed import CLIENT_ADDR, CLIENT_ADDR6, SERVER_ADDR, netns
from tests.conformance.harness import _kind
from tests.kernel_oracle import counter_snapshot

RULES = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate INVALID -j LOG --log-prefix "invalid "
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -j REJECT --reject-with tcp-reset
-A INPUT -p udp -j REJECT --reject-with icmp-port-unreachable
-A INPUT -p icmp -j REJECT --reject-with icmp-host-prohibited
COMMIT
"""
FOREIGN_MAC = "02:00:00:00:00:99"


def _udp(src: str = CLIENT_ADDR, dst: str = SERVER_ADDR, **fields) -> IP:
    return IP(src=src, dst=dst, **fields) / UDP(sport=33333, dport=9) / Raw(b"q" * 20)


def _bad_checksum(packet):
    raw = bytearray(bytes(packet))
    raw[-1] ^= 0xFF  # the payload's last byte: the transport checksum no longer holds
    return IP(bytes(raw))


FRAMES = {
    "source 127.0.0.1": _udp("127.0.0.1"),
    "source 127.1.2.3": _udp("127.1.2.3"),
    "source: this host": _udp(SERVER_ADDR),
    "source 0.0.0.7": _udp("0.0.0.7"),
    "source multicast": _udp("224.0.0.9"),
    "source broadcast": _udp("255.255.255.255"),
    "destination 127.0.0.1": _udp(dst="127.0.0.1"),
    "destination 0.0.0.1": _udp(dst="0.0.0.1"),
    "tcp, bad checksum": _bad_checksum(IP(src=CLIENT_ADDR, dst=SERVER_ADDR) / TCP(
        sport=33334, dport=22, flags="S") / Raw(b"x" * 4)),
    "udp, bad checksum": _bad_checksum(_udp()),
    "udp, no checksum": IP(src=CLIENT_ADDR, dst=SERVER_ADDR) / UDP(sport=33335, dport=9,
                                                                   chksum=0) / Raw(b"z"),
    "icmp, bad checksum": _bad_checksum(IP(src=CLIENT_ADDR, dst=SERVER_ADDR) / ICMP(
        id=77) / Raw(b"p" * 8)),
    "ip options": _udp(options=[IPOption_RR(routers=["1.2.3.4"]), IPOption_NOP()]),
}


def _outcome(bed, packet, mac: str | None = None) -> tuple:
    ipv6 = IPv6 in packet
    before = bed.delivered(ipv6)
    frame = Ether(src=bed.client_mac, dst=mac or bed.server_mac) / packet
    replies = bed.send(bytes(frame))
    return (bed.delivered(ipv6) - before, tuple(sorted(_kind(r) for r in replies)),
            tuple(sorted(len(r) for r in replies)))


def _counters(pair) -> tuple[dict, dict]:
    kernel = counter_snapshot(netns.run("iptables-legacy-save", "-c",
                                        netns=pair.kernel.server).stdout)
    with netns.entered(pair.bpf.server):
        paths = state.Paths("eth0", state.netns_id())
        with deploy.LiveCounters(paths, state.read(paths)) as live:
            ours = {key: live(*key).packets for key in kernel}
    return kernel, ours


# README, known differences: the kernel writes its address into a Record Route option
# before INPUT and echoes the options in its error; bpfilter's error quotes the packet as
# it came, without options of its own (the same verdict and kind of reply, other bytes).
ECHOED_OPTIONS = "ip options"


def _check(pair) -> None:
    pair.load(RULES)
    for name, packet in FRAMES.items():
        kernel, ours = _outcome(pair.kernel, packet), _outcome(pair.bpf, packet)
        if name == ECHOED_OPTIONS:
            kernel, ours = kernel[:2], ours[:2]
        pair.tally(kernel, ours, {name})
        assert ours == kernel, f"{name}: kernel {kernel}, bpfilter {ours}"
    for name, mac in (("another host's MAC", FOREIGN_MAC),):
        kernel = _outcome(pair.kernel, _udp(), mac)
        ours = _outcome(pair.bpf, _udp(), mac)
        pair.tally(kernel, ours, {name})
        assert ours == kernel, f"{name}: kernel {kernel}, bpfilter {ours}"
    kernel, ours = _counters(pair)
    mine = {("raw", "PREROUTING"), ("filter", "INPUT")}  # the chains RULES has
    differ = {k: (kernel[k], ours[k]) for k in kernel if k[:2] in mine and kernel[k] != ours[k]}
    assert not differ, differ


def test_odd_frames_meet_the_kernels_fate(mirror):
    _check(mirror)


def test_odd_frames_meet_the_kernels_fate_at_tc(tc_mirror):
    _check(tc_mirror)


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_errors_are_rate_limited_as_the_kernel_does(mirror, family):
    """The kernel's defaults: per destination a burst of 6, then one a second (IPv4), a
    token bucket scaled by the route's prefix (IPv6); bpfilter's REJECT follows them."""
    v6 = family == 6
    keys = (["net.ipv6.icmp.ratelimit"] if v6 else ["net.ipv4.icmp_ratelimit"])
    servers = (mirror.kernel.server, mirror.bpf.server)
    for server in servers:
        for key in keys:
            netns.sysctl(server, key, "1000")
    rules = RULES if not v6 else ("# Generated by ip6tables-save\n*filter\n:INPUT ACCEPT "
                                  "[0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                                  "-A INPUT -p udp -j REJECT --reject-with "
                                  "icmp6-port-unreachable\nCOMMIT\n")
    # A source of its own, routed back as a /128 (/32): a fresh bucket on both sides, and
    # for IPv6 the full timeout (a shorter route halves it per 32 bits).
    source = "2001:db8:ff::99" if v6 else "100.64.0.99"
    for server in servers:
        netns.run("ip", "-6" if v6 else "-4", "route", "replace", source,
                  "via", CLIENT_ADDR6 if v6 else CLIENT_ADDR, "dev", "eth0", netns=server)
    try:
        mirror.load(rules)
        packet = (IPv6(src=source, dst="2001:db8:1::1") if v6 else
                  IP(src=source, dst=SERVER_ADDR)) / UDP(sport=33336, dport=9)
        counts = []
        for bed in (mirror.kernel, mirror.bpf):
            replies = sum(len(_outcome(bed, packet)[1]) for _ in range(12))
            counts.append(replies)
            time.sleep(1.1)  # a token comes back
            counts.append(len(_outcome(bed, packet)[1]))
        assert counts[2:] == counts[:2], f"kernel {counts[:2]}, bpfilter {counts[2:]}"
    finally:
        for server in servers:
            for key in keys:
                netns.sysctl(server, key, "0")


def test_ipv6_link_local_sources_are_not_forwarded(router):
    """ip6_forward() refuses a link-local source; the router must not take it to FORWARD
    (nor answer it) whatever its destination."""
    router.load("# Generated by ip6tables-save\n*filter\n:INPUT ACCEPT [0:0]\n"
                ":FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -j REJECT "
                "--reject-with icmp6-adm-prohibited\nCOMMIT\n")
    for dst in ("2001:db8:f::7", "2001:db8:ff::2"):  # on to the far end; back to the client
        packet = IPv6(src="fe80::1", dst=dst, hlim=64) / ICMPv6EchoRequest()
        kernel = _outcome(router.kernel, packet)
        ours = _outcome(router.bpf, packet)
        assert ours == kernel, f"to {dst}: kernel {kernel}, bpfilter {ours}"
