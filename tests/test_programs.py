"""Behaviour of compiled programs that the differential test cannot reach, run in the
kernel with BPF_PROG_TEST_RUN: fragments, token buckets, LOG events, hotdrop, replies at
OUTPUT."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfilter import build
from bpfilter.codegen import program
from bpfilter.testbed import netns
from bpfilter.compiler import compile_ruleset
from bpfilter.errors import InputError
from bpfilter.runtime import conntable, hostview
from bpfilter.runtime.logs import LogEvent
from bpfilter.passes import classify
from bpfilter.runtime.runner import LoadedRuleset

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
LO = 1


@pytest.fixture(autouse=True)
def host(namespace):
    """Each test runs in a namespace that owns 198.18.0.0/15, as a server would: INPUT
    sees only packets for local destinations."""
    name = namespace("bpft-prog")
    netns.run("ip", "route", "add", "local", "198.18.0.0/15", "dev", "lo", netns=name)
    with netns.entered(name):
        yield name


def _load(text: str, build_root, name: str) -> LoadedRuleset:
    rules = "*filter\n:INPUT ACCEPT [0:0]\n" + text + "COMMIT\n"
    return LoadedRuleset(compile_ruleset(rules, name, build_root / name, verify=False))


def _run(loaded: LoadedRuleset, frame) -> int:
    program = loaded.program()
    return program.test_run(bytes(frame), ingress_ifindex=LO).retval


@pytest.fixture(params=["code", "data"])
def as_data(request, monkeypatch) -> bool:
    """Both ways a chain compiles: code, and classifier data (forced for these small
    rulesets, which would otherwise stay code)."""
    if request.param == "data":
        monkeypatch.setattr(classify, "CLASSIFY_MIN", 0)
        monkeypatch.setattr(classify, "SEGMENT_MIN", 1)
    return request.param == "data"


def _udp(**ip) -> Ether:
    return Ether() / IP(src="192.0.2.1", dst="198.18.0.1", **ip) / UDP(dport=53)


def test_later_fragments_are_left_to_the_kernel(kernel, build_root):
    with _load("-A INPUT -j DROP\n", build_root, "frag") as loaded:
        assert _run(loaded, _udp()) == XDP_DROP
        elsewhere = Ether() / IP(src="192.0.2.1", dst="203.0.113.9") / UDP(dport=53)
        assert _run(loaded, elsewhere) == XDP_PASS  # not local: never INPUT
        # The per-CPU memo of the last destination must follow the address, both ways.
        assert _run(loaded, elsewhere) == XDP_PASS
        assert _run(loaded, _udp()) == XDP_DROP
        assert _run(loaded, elsewhere) == XDP_PASS
        options = Ether() / IP(src="192.0.2.1", dst="198.18.0.1", options=b"\x01" * 4) / UDP()
        assert _run(loaded, options) == XDP_DROP  # checksum of a longer header still accepted
        later = Ether() / IP(src="192.0.2.1", dst="198.18.0.1", proto=17, frag=10) / Raw(b"x" * 8)
        assert _run(loaded, later) == XDP_PASS
        assert loaded.counters("filter", "INPUT", 0).packets == 3


def test_limit_is_a_token_bucket(kernel, build_root, as_data):
    rules = "-A INPUT -m limit --limit 1/hour --limit-burst 3 -j ACCEPT\n-A INPUT -j DROP\n"
    with _load(rules, build_root, f"limit-{as_data}") as loaded:
        verdicts = [_run(loaded, _udp()) for _ in range(6)]
    assert verdicts == [XDP_PASS] * 3 + [XDP_DROP] * 3


def test_log_sends_an_event_and_continues(kernel, build_root, as_data):
    rules = "-A INPUT -p udp -j LOG --log-prefix \"seen \"\n-A INPUT -j DROP\n"
    with _load(rules, build_root, f"log-{as_data}") as loaded:
        frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / _udp(ttl=33)[IP]
        assert _run(loaded, frame) == XDP_DROP
        events = loaded.map("bf_log").drain_ring()
    assert len(events) == 1
    event = LogEvent.from_bytes(events[0])
    rule = loaded.compilation.slots[("filter", "INPUT", 0)]
    assert (event.slot, event.ifindex, event.proto, event.ttl, event.dport) == (
        rule, LO, 17, 33, 53)
    assert str(event.src) == "192.0.2.1" and event.length == 28 and event.hook == "INPUT"
    assert event.line("seen ", {LO: "lo"}) == (
        "seen IN=lo OUT= MAC=02:00:00:00:00:02:02:00:00:00:00:01:08:00 SRC=192.0.2.1 "
        "DST=198.18.0.1 LEN=28 TOS=0x00 PREC=0x00 TTL=33 PROTO=UDP SPT=53 DPT=53 LEN=8 ")


def test_connection_states_as_code_and_as_data(kernel, build_root, as_data):
    """A new connection is remembered only once accepted and then follows nf_conntrack's
    TCP table (test_run sees one direction, so nothing is ESTABLISHED here)."""
    rules = ("-A INPUT -m conntrack --ctstate INVALID -j DROP\n"
             "-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT\n"
             "-A INPUT -m state ! --state NEW -j ACCEPT\n"
             "-A INPUT -j DROP\n")
    tcp = lambda port, flags: Ether() / IP(src="192.0.2.1", dst="198.18.0.1") / TCP(  # noqa: E731
        sport=4000, dport=port, flags=flags)
    with _load(rules, build_root, f"ct-{as_data}") as loaded:
        source = loaded.code.programs[0].source
        assert ("bf_classify(p, " in source) == as_data
        assert _run(loaded, tcp(22, "S")) == XDP_PASS  # NEW, accepted: remembered
        assert _run(loaded, tcp(22, "S")) == XDP_PASS  # a retransmission: still NEW
        assert _run(loaded, tcp(22, "A")) == XDP_DROP  # an ACK in SYN_SENT: INVALID
        assert _run(loaded, tcp(22, "SF")) == XDP_DROP  # INVALID flags
        assert _run(loaded, tcp(23, "S")) == XDP_DROP  # NEW, dropped: not remembered
        assert _run(loaded, tcp(23, "A")) == XDP_DROP  # picked up mid-stream: NEW again
        assert _run(loaded, tcp(23, "FA")) == XDP_DROP  # a FIN opens nothing: INVALID
        assert [loaded.counters("filter", "INPUT", i).packets for i in range(4)] == [3, 2, 0, 2]


@pytest.mark.parametrize("cut", [0, 7, 19])
def test_truncated_tcp_header_is_dropped_by_a_tcp_match(kernel, build_root, cut, as_data):
    rules = "-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT\n"
    with _load(rules, build_root, f"hotdrop{cut}-{as_data}") as loaded:
        short = Ether() / IP(src="192.0.2.1", dst="198.18.0.1", proto=6) / Raw(
            bytes(TCP(dport=80))[:cut])
        assert _run(loaded, short) == XDP_DROP
        assert _run(loaded, Ether() / IP(dst="198.18.0.1") / TCP(dport=80)) == XDP_PASS
        assert loaded.counters("filter", "INPUT", 0).packets == 1


def test_multiport_reads_only_the_ports(kernel, build_root, as_data):
    """multiport needs 4 bytes where the tcp match needs 20: a TCP packet with 6 bytes of
    header is matched on its ports, one with 2 is dropped when the rule is tried."""
    rules = "-A INPUT -p tcp -m multiport --dports 80 -j ACCEPT\n-A INPUT -j DROP\n"
    with _load(rules, build_root, f"multiport-short-{as_data}") as loaded:
        def short(dport: int, cut: int) -> Ether:
            return Ether() / IP(src="192.0.2.1", dst="198.18.0.1", proto=6) / Raw(
                bytes(TCP(sport=1, dport=dport))[:cut])
        assert _run(loaded, short(80, 6)) == XDP_PASS
        assert _run(loaded, short(81, 6)) == XDP_DROP
        assert _run(loaded, short(80, 2)) == XDP_DROP
        assert loaded.counters("filter", "INPUT", 0).packets == 1
        assert loaded.counters("filter", "INPUT", 1).packets == 1


def test_malformed_ip_is_left_to_the_kernel(kernel, build_root):
    with _load("-A INPUT -j DROP\n", build_root, "malformed") as loaded:
        bad = bytearray(bytes(_udp()))
        bad[24] ^= 0xFF  # IP header checksum
        assert _run(loaded, bytes(bad)) == XDP_PASS
        assert loaded.counters("filter", "INPUT", 0).packets == 0


@pytest.mark.parametrize("as_data", [False, True], ids=["code", "data"])
def test_long_chains_keep_return_and_goto_semantics_across_parts(kernel, build_root,
                                                                 monkeypatch, as_data):
    """Long chains become classifier data; as code (forced here) they are split into
    functions of a few rules. Jumps, gotos and RETURN must mean the same either way."""
    if not as_data:
        monkeypatch.setattr(classify, "CLASSIFY_MIN", 10**9)
    filler = "".join(f"-A {{chain}} -p tcp -m tcp --sport {i + 1} -j ACCEPT\n" for i in range(40))
    rules = ("*filter\n:INPUT DROP [0:0]\n:U - [0:0]\n:G - [0:0]\n"
             "-A INPUT -p udp -m udp --dport 1 -j U\n"
             "-A INPUT -p udp -m udp --dport 4 -g G\n"
             + filler.format(chain="INPUT")
             + "-A INPUT -p udp -m udp --dport 2 -j RETURN\n-A INPUT -p udp -j ACCEPT\n"
             + filler.format(chain="U") + "-A U -p udp -m udp --dport 1 -j RETURN\n"
             + filler.format(chain="G") + "-A G -j RETURN\n"
             "COMMIT\n")
    name = f"parts-{as_data}"
    with LoadedRuleset(compile_ruleset(rules, name, build_root / name)) as loaded:
        source = loaded.code.programs[0].source
        assert ("bf_classify(p, " in source) == as_data
        assert ("_part1" in source) != as_data
        run = lambda port: _run(loaded, Ether() / IP(dst="198.18.0.1") / UDP(dport=port))  # noqa: E731
        assert run(1) == XDP_PASS  # U returns, INPUT goes on to its last rule
        assert run(2) == XDP_DROP  # RETURN in a built-in chain: the policy
        assert run(3) == XDP_PASS
        assert run(4) == XDP_DROP  # -g from INPUT, then RETURN: INPUT's policy
        assert loaded.counters("filter", "INPUT", -1).packets == 2
        assert loaded.counters("filter", "U", 40).packets == 1
        assert loaded.counters("filter", "INPUT", 43).packets == 2


@pytest.mark.parametrize("as_data", [False, True], ids=["code", "data"])
def test_chains_nest_as_deep_as_the_call_stack_allows(kernel, build_root, monkeypatch,
                                                      as_data):
    """Seven chains on one path, each long enough to be split into parts, is the deepest
    the BPF call stack takes; classifier walks (three frames) only where they still fit:
    in the first four. State matches make the entry function's frame its largest, so the
    512 bytes of stack the frames share are tested at their fullest too."""
    if not as_data:
        monkeypatch.setattr(classify, "CLASSIFY_MIN", 10**9)
    filler = "".join(f"-A {{chain}} -p tcp -m tcp --sport {i + 1} -j ACCEPT\n"
                     for i in range(40))
    chains = ["INPUT"] + [f"C{i}" for i in range(1, 7)]
    rules = "".join(filler.format(chain=c) + f"-A {c} -p udp -j {callee}\n"
                    for c, callee in zip(chains, chains[1:]))
    text = ("*filter\n:INPUT DROP [0:0]\n" + "".join(f":{c} - [0:0]\n" for c in chains[1:])
            + "-A INPUT -m conntrack --ctstate INVALID --ctdir REPLY -j LOG\n"
            + rules + "-A C6 -p udp -m udp --dport 7 -j ACCEPT\nCOMMIT\n")
    name = f"deep-{as_data}"
    with LoadedRuleset(compile_ruleset(text, name, build_root / name)) as loaded:
        source = loaded.code.programs[0].source
        assert source.count("bf_classify(p, ") == (4 if as_data else 0)
        assert _run(loaded, Ether() / IP(dst="198.18.0.1") / UDP(dport=7)) == XDP_PASS
        assert _run(loaded, Ether() / IP(dst="198.18.0.1") / UDP(dport=8)) == XDP_DROP
        assert loaded.counters("filter", "C6", 0).packets == 1
        assert loaded.counters("filter", "INPUT", 0).packets == 0


def test_ipv4_nat_beside_ipv6_rejects_fits_the_stack_at_tc(kernel, build_root):
    """At TC with IPv6 rules the program's own frame is its largest (264 bytes), so the
    global functions it calls must not stack two deep where they are large: connection
    tracking's lookup and its ICMP-error path (bf_ct_related) are called one after the
    other, and so are INPUT's nat place and the new binding (with the 160 and 144 bytes
    of those, 528 bytes were refused). A dual-stack ruleset with ip NAT and ip6 REJECTs
    loads at both attach points."""
    text = """table ip nat {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		tcp dport 8080 dnat to 10.0.0.1-10.0.0.9:80
	}
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "eth1" snat to 198.18.0.50-198.18.0.57
	}
}
table ip6 f {
	chain i {
		type filter hook input priority 0; policy accept;
		ct state established accept
		ip6 saddr 2001:db8::/32 tcp dport 22 reject
	}
}
"""
    for attach in program.Attach:
        name = f"dual-nat-{attach.value}"
        compiled = compile_ruleset(text, name, build_root / name, attach=attach)
        assert compiled.code.programs


def test_folded_runs_keep_first_match_and_per_rule_counters(kernel, build_root):
    """A run of -s rules becomes one lookup, cut where prefixes overlap, so the rule that
    matches first is still the one that decides and counts."""
    hosts = "".join(f"-A INPUT -s 10.1.0.{i}/32 -p udp -j DROP\n" for i in range(1, 11))
    rules = (hosts + "-A INPUT -s 10.1.0.0/24 -p udp -j DROP\n"  # overlaps: a new run
             + "".join(f"-A INPUT -s 10.2.{i}.0/24 -p udp -j DROP\n" for i in range(8))
             + "-A INPUT -s 10.2.8.1/32 -p udp -j DROP\n"  # mixed lengths: the LPM trie
             + "-A INPUT -p udp -j ACCEPT\n")
    with _load(rules, build_root, "fold") as loaded:
        source = loaded.code.programs[0].source
        assert source.count("prefixes in one lookup") == 2
        send = lambda src: _run(loaded, Ether() / IP(src=src, dst="198.18.0.1") / UDP())  # noqa: E731
        assert send("10.1.0.7") == XDP_DROP
        assert send("10.1.0.99") == XDP_DROP
        assert "bf_exact_lookup" in source and "bf_prefix_lookup" in source
        assert send("10.2.8.1") == XDP_DROP
        assert send("10.2.8.2") == XDP_PASS
        assert send("10.3.0.1") == XDP_PASS
        counts = [loaded.counters("filter", "INPUT", i).packets for i in range(21)]
    assert counts[6] == 1 and counts[10] == 1 and counts[19] == 1 and counts[20] == 2
    assert sum(counts) == 5


TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7


@pytest.mark.parametrize("rule, verdict", [
    ("-s 198.19.0.0/16", TC_ACT_SHOT),  # refuses the host's ICMP error too, silently
    ("-s 198.19.0.0/16 -p udp", TC_ACT_REDIRECT),  # the error is not UDP: it goes back
])
def test_a_reject_at_output_sends_its_reply_through_output(kernel, build_root, rule, verdict):
    """The kernel's REJECT at OUTPUT makes a packet of this host's own, from this host's
    address, which walks OUTPUT before it goes back in through lo."""
    from bpfilter.codegen.program import EGRESS

    rules = f":OUTPUT ACCEPT [0:0]\n-A OUTPUT {rule} -j REJECT --reject-with icmp-host-prohibited\n"
    sent = Ether() / IP(src="198.19.0.1", dst="192.0.2.1") / UDP(dport=53)
    with _load(rules, build_root, f"out-reject-{verdict}") as loaded:
        assert loaded.program(EGRESS).test_run(bytes(sent)).retval == verdict


def _load_text(text: str, build_root, name: str, attach=None) -> LoadedRuleset:
    from bpfilter.codegen import Attach

    return LoadedRuleset(compile_ruleset(text, name, build_root / name, verify=False,
                                         attach=attach or Attach.XDP))


MARKS = """*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p udp -j MARK --set-xmark 0x5/0xff
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -m mark --mark 0x5/0xf -j ACCEPT
-A INPUT -j DROP
COMMIT
"""


@pytest.mark.parametrize("attach", ["xdp", "tc"])
def test_a_mark_set_in_mangle_is_read_in_filter_and_given_to_the_stack_at_tc(
        kernel, build_root, attach):
    from bpfilter.codegen import Attach

    tcp = Ether() / IP(src="192.0.2.1", dst="198.18.0.1") / TCP(dport=22)
    with _load_text(MARKS, build_root, f"marks-{attach}", Attach(attach)) as loaded:
        program = loaded.program()
        passed = program.test_run(bytes(_udp()), ingress_ifindex=LO, mark=0x100)
        dropped = program.test_run(bytes(tcp), ingress_ifindex=LO, mark=0x100)
    if attach == "xdp":
        assert (passed.retval, dropped.retval) == (XDP_PASS, XDP_DROP)
    else:
        assert (passed.retval, dropped.retval) == (0, 2)  # TC_ACT_OK, TC_ACT_SHOT
        assert passed.mark == 0x105  # (0x100 & ~0xff) ^ 0x5: the stack routes by it


def test_notrack_keeps_packets_out_of_the_connection_table(kernel, build_root):
    """raw's rules run before connection tracking: they see no connection (INVALID), and
    a packet they NOTRACK is UNTRACKED for the rest and never remembered."""
    text = """*raw
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p udp -m conntrack --ctstate INVALID -j NOTRACK
COMMIT
*filter
:INPUT DROP [0:0]
-A INPUT -p udp -m state --state UNTRACKED -j ACCEPT
-A INPUT -p tcp -m conntrack --ctstate NEW -j ACCEPT
COMMIT
"""
    syn = Ether() / IP(src="192.0.2.1", dst="198.18.0.1") / TCP(dport=22, flags="S")
    with _load_text(text, build_root, "notrack") as loaded:
        assert _run(loaded, _udp()) == XDP_PASS
        assert len(list(loaded.map("bf_conntrack").keys())) == 0
        assert _run(loaded, syn) == XDP_PASS
        assert len(list(loaded.map("bf_conntrack").keys())) == 1


def test_ipv6_runs_fold_into_one_lookup_with_exact_counters(kernel, build_root, host):
    """An ip6tables blocklist becomes one lookup in bf_prefixes6, and each packet counts
    on its own rule, as ip6tables' linear walk would: a host, a /120 beside the hosts, the
    addresses just outside both, and a packet of the other direction's run."""
    netns.run("ip", "-6", "route", "add", "local", "2001:db8:1::/48", "dev", "lo", netns=host)
    hosts = [f"2001:db8:abcd::{i:x}" for i in range(1, 20)]
    rules = "".join(f"-A INPUT -s {h}/128 -j DROP\n" for h in hosts)
    rules += "-A INPUT -s 2001:db8:abcd::100/120 -j DROP\n"
    rules += "".join(f"-A INPUT -d 2001:db8:1::{i:x}/128 -j REJECT\n" for i in range(1, 10))
    text = "# ip6tables-save\n*filter\n:INPUT ACCEPT [0:0]\n" + rules + "COMMIT\n"
    with LoadedRuleset(compile_ruleset(text, "acl6", build_root / "acl6", verify=False)) \
            as loaded:
        assert loaded.code.source.count("bf_prefix6_lookup(p, ") == 2

        def verdict(src: str, dst: str = "2001:db8:1::99") -> int:
            frame = Ether() / IPv6(src=src, dst=dst) / UDP(dport=53)
            return _run(loaded, frame)

        assert verdict("2001:db8:abcd::7") == XDP_DROP
        assert verdict("2001:db8:abcd::1ff") == XDP_DROP
        assert verdict("2001:db8:abcd::14") == XDP_PASS
        assert verdict("2001:db8:abcd::200") == XDP_PASS
        assert verdict("2001:db8:ff::1", "2001:db8:1::3") == XDP_TX
        counts = [loaded.counters("ip6 filter", "INPUT", i).packets for i in range(29)]
    assert counts == [0] * 6 + [1] + [0] * 12 + [1] + [0] * 2 + [1] + [0] * 6


@pytest.mark.parametrize("count", [2047, 2048, 2049, 4097])
def test_classified_chains_are_exact_past_every_scan_window(kernel, build_root, count):
    """A step of the classifier's walk scans 32 words of 64 entries. A window scanned
    without a hit once made the next window's first entry a candidate, tried without its
    field test: past 2,048 rules, packets no rule matched were taken by rule 2,049 (and a
    DROP policy let in what the next window's ACCEPT said). Exact counters at every
    window's first and last entries, and for packets no rule matches."""
    rules = "".join(f"-A INPUT -p udp -m udp --dport {1024 + i} -j DROP\n"
                    for i in range(count))
    rules += "-A INPUT -s 192.0.2.99/32 -p tcp -m tcp --dport 9999 -j ACCEPT\n"
    text = "*filter\n:INPUT DROP [0:0]\n" + rules + "COMMIT\n"
    with LoadedRuleset(compile_ruleset(text, f"windows{count}", build_root / f"w{count}",
                                       verify=False)) as loaded:
        assert "bf_classify(p, " in loaded.code.programs[0].source
        udp = lambda port: Ether() / IP(src="192.0.2.1", dst="198.18.0.1") / UDP(dport=port)  # noqa: E731
        syn = lambda src: Ether() / IP(src=src, dst="198.18.0.1") / TCP(dport=9999, flags="S")  # noqa: E731
        aimed = sorted({0, 63, 64, 2047, 2048, count - 1} & set(range(count)))
        for i in aimed:
            assert _run(loaded, udp(1024 + i)) == XDP_DROP
        assert _run(loaded, udp(10)) == XDP_DROP  # the policy
        assert _run(loaded, syn("192.0.2.7")) == XDP_DROP  # the policy, not the ACCEPT
        assert _run(loaded, syn("192.0.2.99")) == XDP_PASS
        counts = {i: loaded.counters("filter", "INPUT", i).packets for i in range(count + 1)}
        assert {i: n for i, n in counts.items() if n} == {**{i: 1 for i in aimed}, count: 1}
        assert loaded.counters("filter", "INPUT", -1).packets == 2


def test_walks_longer_than_bpf_loop_runs_are_refused(tmp_path):
    """Every rule of a long chain jumping into another long chain: a packet could need
    more classifier steps than bpf_loop() runs, and a walk cut short drops the packet."""
    sub = "".join(f"-A SUB -p tcp -m tcp --sport {i + 1} -j ACCEPT\n" for i in range(1500))
    jumps = "".join(f"-A INPUT -p tcp -m tcp --dport {i + 1} -j SUB\n" for i in range(2000))
    text = "*filter\n:INPUT ACCEPT [0:0]\n:SUB - [0:0]\n" + jumps + sub + "COMMIT\n"
    with pytest.raises(InputError, match=r"classifier steps in chain 'INPUT'.*bpf_loop"):
        compile_ruleset(text, "deep.v4", tmp_path, emit="c")
    fewer = text.replace(jumps, jumps[: jumps.index("--dport 1001 ")].rsplit("\n", 1)[0] + "\n")
    compile_ruleset(fewer, "ok.v4", tmp_path, emit="c")  # 1,000 jumps: 4.5 million steps


def _veths(host: str, **addresses) -> list[int]:
    """Veth pairs in the test's namespace, both ends up, each named one with its address
    (None: none); their ifindexes."""
    found = []
    for name, address in addresses.items():
        netns.run("ip", "link", "add", name, "type", "veth", "peer", f"{name}p", netns=host)
        if address:
            netns.run("ip", "addr", "add", address, "dev", name, netns=host)
        for end in (name, f"{name}p"):
            netns.run("ip", "link", "set", end, "up", netns=host)
        found.append(netns.link_info(host, name)[0])
    return found


def _router(host: str) -> list[int]:
    """The namespace as a router: lan0 (192.0.2.254/24) and far0 (10.99.0.1/24)."""
    netns.sysctl(host, "net.ipv4.ip_forward", "1")
    return _veths(host, lan0="192.0.2.254/24", far0="10.99.0.1/24")


@pytest.mark.parametrize("entries", [3, 2], ids=["as-built", "mutated-to-2x"])
def test_every_connection_the_table_holds_keeps_its_nat_binding(kernel, build_root, host,
                                                                monkeypatch, entries):
    """A forwarded connection with DNAT and SNAT holds three bf_nat entries (original, mid
    and reply tuple), so bf_nat is three times the connection table. 50,000 such
    connections (150,000 entries: past 2 x 65,536) keep the first one's binding both ways;
    built with bf_nat at two per connection, the same run loses it (the check sees the
    limit)."""
    lan, far = _router(host)
    if entries != 3:
        headers = program.runtime_headers()
        assert "3 * BF_CT_MAX" in headers["nat.h"]
        headers["nat.h"] = headers["nat.h"].replace("3 * BF_CT_MAX", f"{entries} * BF_CT_MAX")
        monkeypatch.setattr(build, "runtime_headers", lambda: headers)
    rules = ("*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
             "-A PREROUTING -d 198.18.0.1/32 -p udp -j DNAT --to-destination 10.99.0.2:53\n"
             "-A POSTROUTING -o far0 -j SNAT --to-source 10.99.0.1\nCOMMIT\n")
    name = f"nat-{entries}x"
    first = Ether() / IP(src="192.0.2.1", dst="198.18.0.1") / UDP(sport=1024, dport=5353,
                                                                   chksum=0)
    query = bytearray(bytes(first))
    sport = len(query) - 8  # the UDP header's first field
    with LoadedRuleset(compile_ruleset(rules, name, build_root / name, verify=False)) \
            as loaded:
        ingress = loaded.program()
        for port in range(1024, 1024 + 50_000):  # UDP without a checksum: only the port
            query[sport:sport + 2] = port.to_bytes(2, "big")
            assert ingress.test_run(bytes(query), ingress_ifindex=lan).retval == XDP_PASS

        def rewritten(frame, ifindex: int) -> tuple[str, str, int, int]:
            out = IP(ingress.test_run(bytes(frame), ingress_ifindex=ifindex).data[14:])
            return out.src, out.dst, out[UDP].sport, out[UDP].dport

        reply = Ether() / IP(src="10.99.0.2", dst="10.99.0.1") / UDP(sport=53, dport=1024,
                                                                     chksum=0)
        kept = (rewritten(first, lan), rewritten(reply, far))
    expected = (("192.0.2.1", "10.99.0.2", 1024, 53), ("10.99.0.2", "192.0.2.1", 53, 1024))
    assert (kept == expected) == (entries == 3)


def test_redirect_follows_the_incoming_interfaces_first_address(kernel, build_root, host):
    """REDIRECT sends to the first IPv4 address of the interface the packet came in by, as
    the host has it now: with none the kernel drops the packet; an address added later
    (and a new first one after the old is gone) is where the next connection goes."""
    (lan,) = _veths(host, lan0=None)
    rules = ("*nat\n:PREROUTING ACCEPT [0:0]\n"
             "-A PREROUTING -p udp -j REDIRECT --to-ports 53\nCOMMIT\n")
    with LoadedRuleset(compile_ruleset(rules, "redirect", build_root / "redirect",
                                       verify=False)) as loaded:
        ingress = loaded.program()

        def sent(sport: int) -> tuple[int, str, int]:
            frame = Ether() / IP(src="192.0.2.1", dst="203.0.113.9") / UDP(sport=sport,
                                                                          dport=5353)
            result = ingress.test_run(bytes(frame), ingress_ifindex=lan)
            out = IP(result.data[14:])
            return result.retval, out.dst, out[UDP].dport

        def follow() -> None:  # what the watcher does on each address change
            hostview.write({name: loaded.map(name) for name in hostview.MAPS},
                           hostview.read(), [])

        assert sent(1000)[0] == XDP_DROP
        for address in ("192.0.2.254/24", "10.7.0.1/16"):
            netns.run("ip", "addr", "add", address, "dev", "lan0", netns=host)
        follow()
        assert sent(1001) == (XDP_PASS, "192.0.2.254", 53)
        netns.run("ip", "addr", "del", "192.0.2.254/24", "dev", "lan0", netns=host)
        follow()
        assert sent(1002) == (XDP_PASS, "10.7.0.1", 53)
        assert sent(1001) == (XDP_PASS, "192.0.2.254", 53)  # bound: the connection keeps it


def test_masqueraded_connections_go_with_their_address(kernel, build_root, host):
    """nf_nat_masquerade forgets the connections MASQUERADE gave an address when the
    address goes (the watcher does it for bpfilter, from its views before and after): the
    flow's next datagram starts a new connection, under the address the interface has
    now; until then it kept the old one."""
    lan, _far = _router(host)
    netns.sysctl(host, "net.ipv4.conf.far0.promote_secondaries", "1")
    rules = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o far0 -j MASQUERADE\nCOMMIT\n"
    datagram = bytes(Ether() / IP(src="192.0.2.1", dst="10.99.0.2") / UDP(sport=1000,
                                                                          dport=53))
    with LoadedRuleset(compile_ruleset(rules, "masq", build_root / "masq",
                                       verify=False)) as loaded:
        def source() -> str:  # the datagram forwarded, as it leaves
            assert loaded.program().test_run(datagram, ingress_ifindex=lan).retval == XDP_PASS
            out = loaded.program("bf_egress").test_run(datagram, ingress_ifindex=lan).data
            return IP(out[14:]).src

        assert source() == "10.99.0.1"
        before = hostview.read()
        netns.run("ip", "addr", "add", "10.99.0.7/24", "dev", "far0", netns=host)
        netns.run("ip", "addr", "del", "10.99.0.1/24", "dev", "far0", netns=host)
        gone = hostview.addresses(before) - hostview.addresses(hostview.read())
        assert gone == {int(ipaddress.IPv4Address("10.99.0.1"))}
        assert source() == "10.99.0.1"  # bound: the watcher has not told the table yet
        table, bindings = loaded.map("bf_conntrack"), loaded.map("bf_nat")
        assert conntable.forget_masqueraded(table, bindings, gone) == 1
        assert source() == "10.99.0.7"
        # The interface set down keeps its address and local route, but its MASQUERADE
        # connections go (NETDEV_DOWN), as the watcher reads it.
        before = hostview.addresses(hostview.read(), hostview.down_links())
        netns.run("ip", "link", "set", "far0", "down", netns=host)
        after = hostview.addresses(hostview.read(), hostview.down_links())
        assert before - after == {int(ipaddress.IPv4Address("10.99.0.7"))}
        netns.run("ip", "link", "set", "far0", "up", netns=host)
        assert hostview.addresses(hostview.read(), hostview.down_links()) == before
