"""The classifier pass and its tables, without the kernel: which rules become data, and
what the per-field bitsets say. (Verdicts are checked against the kernel in
tests/conformance and tests/test_programs.py.)"""

from __future__ import annotations

from bpfilter.codegen.classifier import PORTS, classifier_tables
from bpfilter.codegen.matchers import MatchContext
from bpfilter.frontend import parse_ruleset
from bpfilter.passes import classify, validate
from bpfilter.passes.fold import RuleItem, fold_chains
from examples.make_acl import acl


def _classified(text: str):
    ruleset = validate(parse_ruleset(text, "t.v4"))
    return classify.classify(ruleset, fold_chains(ruleset))


def _rules(chain: str, lines: list[str]) -> str:
    return "".join(f"-A {chain} {line}\n" for line in lines)


PORT_RULES = [f"-p tcp -m tcp --dport {1000 + i} -j ACCEPT" for i in range(40)]


def test_few_items_stay_code_and_folded_acls_too():
    items, result = _classified("*filter\n:INPUT ACCEPT [0:0]\n" + _rules("INPUT", PORT_RULES)
                                + "COMMIT\n")
    assert result.segments == ()
    items, result = _classified(acl(1000))  # 1,000 rules, folded into a few lookups
    assert result.segments == ()


def test_a_rule_the_classifier_cannot_take_splits_a_chain_into_segments():
    text = ("*filter\n:INPUT DROP [0:0]\n" + _rules("INPUT", PORT_RULES)
            + "-A INPUT -m mac --mac-source 02:00:00:00:00:01 -j ACCEPT\n"
            + _rules("INPUT", PORT_RULES) + "COMMIT\n")
    items, result = _classified(text)
    chain = items[("filter", "INPUT")]
    assert [type(i).__name__ for i in chain] == ["Segment", "RuleItem", "Segment"]
    assert [len(s.entries) for s in result.segments] == [40, 40]
    assert ("filter", "INPUT") not in dict(result.data_chains)


def test_jumps_into_a_chain_of_code_stay_code():
    text = ("*filter\n:INPUT DROP [0:0]\n:MAC - [0:0]\n:PLAIN - [0:0]\n"
            + _rules("INPUT", PORT_RULES + ["-p udp -j MAC", "-p udp -j PLAIN"] + PORT_RULES)
            + "-A MAC -m mac --mac-source 02:00:00:00:00:01 -j ACCEPT\n"
            + "-A PLAIN -p udp -m udp --dport 53 -j ACCEPT\nCOMMIT\n")
    items, result = _classified(text)
    data = dict(result.data_chains)
    assert ("filter", "PLAIN") in data and ("filter", "MAC") not in data
    jumps = [i.rule.target.chain for i in items[("filter", "INPUT")] if isinstance(i, RuleItem)]
    assert jumps == ["MAC"]  # the jump to PLAIN is an entry of the segment around it


def test_field_bitsets_follow_prefixes_negation_and_ranges():
    text = ("*filter\n:INPUT ACCEPT [0:0]\n"
            "-A INPUT -s 10.0.0.0/8 -j DROP\n"
            "-A INPUT ! -s 10.1.0.0/16 -j ACCEPT\n"
            "-A INPUT -p tcp -m tcp --dport 20:30 -j ACCEPT\n" + _rules("INPUT", PORT_RULES)
            + "COMMIT\n")
    classify_min = classify.CLASSIFY_MIN
    try:
        classify.CLASSIFY_MIN = 0
        items, result = _classified(text)
    finally:
        classify.CLASSIFY_MIN = classify_min
    n = len(result.entries)
    tables = classifier_tables(result, list(range(n)), [0] * n, MatchContext())
    saddr = {(addr >> 24, addr >> 16 & 0xFF, length): tables.bitsets[cls]
             for addr, length, cls in tables.saddr}
    assert saddr[(10, 1, 16)] & 0b11 == 0b01  # in 10/8, and in 10.1/16: the negation fails
    assert saddr[(10, 0, 8)] & 0b11 == 0b11
    assert saddr[(0, 0, 0)] & 0b11 == 0b10
    dport = tables.dport
    assert tables.bitsets[dport[25]] >> 2 & 1 and not tables.bitsets[dport[31]] >> 2 & 1
    assert len(dport) == PORTS + 1  # and the class of packets with no ports to read
    assert not tables.bitsets[dport[PORTS]] >> 2 & 1
    tcp_short = tables.bitsets[2]  # 8 to 19 bytes of TCP: too short for -m tcp
    assert tcp_short >> 2 & 1 and not tcp_short & 0b11


def test_a_range_read_after_the_header_match_stays_code():
    """The kernel drops a short TCP header at the tcp match, whatever a range after it
    says; a field constraint would make the classifier ignore the rule instead."""
    after = "-p tcp -m tcp --dport 22 -m iprange --src-range 10.0.0.1-10.0.0.9 -j ACCEPT"
    before = "-p tcp -m iprange --src-range 10.0.0.1-10.0.0.9 -m tcp --dport 22 -j ACCEPT"
    text = ("*filter\n:INPUT DROP [0:0]\n" + _rules("INPUT", PORT_RULES + [after, before]
                                                     + PORT_RULES) + "COMMIT\n")
    items, result = _classified(text)
    chain = items[("filter", "INPUT")]
    assert [type(i).__name__ for i in chain] == ["Segment", "RuleItem", "Segment"]
    assert [len(s.entries) for s in result.segments] == [40, 41]


def test_connection_states_are_entry_checks():
    lines = [f"-p tcp -m tcp --dport {1000 + i} -m conntrack --ctstate NEW -j ACCEPT"
             for i in range(70)]
    before = ["-m conntrack --ctstate NEW -p tcp -m tcp --dport 1 -j ACCEPT"]  # state first
    items, result = _classified("*filter\n:INPUT DROP [0:0]\n" + _rules("INPUT", before + lines)
                                + "COMMIT\n")
    (segment,) = result.segments
    assert len(segment.entries) == 70  # the one that reads the state before the header: code
    assert all(type(e.checks[-1]).__name__ == "ConntrackMatch" for e in segment.entries)


def test_an_empty_chain_a_classified_rule_jumps_to_compiles(tmp_path):
    """kube-proxy declares chains it leaves empty (KUBE-NODEPORTS) and jumps to them: an
    empty data chain is a segment of no entries, which a rule of code (here the MAC
    match's) calls as a function (whose C once took its first entry's line, and failed)."""
    from bpfilter.compiler import compile_ruleset

    text = ("*filter\n:INPUT DROP [0:0]\n:EMPTY - [0:0]\n"
            + _rules("INPUT", PORT_RULES + ["-p udp -j EMPTY"] + PORT_RULES
                     + ["-m mac --mac-source 02:00:00:00:00:01 -j EMPTY"]) + "COMMIT\n")
    items, result = _classified(text)
    assert [len(s.entries) for s in result.segments if s.chain == ("filter", "EMPTY")] == [0]
    assert "bf_classify" in compile_ruleset(text, "empty", tmp_path, emit="c").code.source


def test_kube_proxy_chains_are_inlined_within_the_kernels_functions(tmp_path, monkeypatch):
    """300 kube-proxy services (about 1,350 short KUBE-SVC/KUBE-SEP chains, all code
    without the service map, as any ruleset of short chains the map does not take): each
    a function, they would pass the kernel's 256 functions; inlined, the program keeps a
    few."""
    from bpfilter import compiler
    from bpfilter.codegen.program import MAX_CHAIN_FUNCTIONS
    from bpfilter.compiler import compile_ruleset
    from examples.make_kube import kube_nat

    monkeypatch.setattr(compiler, "find_services", lambda ruleset, folds: folds)
    source = compile_ruleset(kube_nat(300), "kube", tmp_path, emit="c").code.source
    functions = source.count("__noinline int bf_chain_")
    assert 0 < functions < MAX_CHAIN_FUNCTIONS // 4
    assert source.count("static __always_inline int bf_chain_") > 1000


def test_make_kube_writes_what_iptables_save_prints(kernel, namespace):
    from bpfilter.testbed import netns
    from examples.make_kube import kube_nat

    text = kube_nat(5)
    space = namespace()
    netns.run("iptables-legacy-restore", netns=space, input=text)
    saved = netns.run("iptables-legacy-save", "-t", "nat", netns=space).stdout
    assert [line for line in saved.splitlines() if not line.startswith("#")] == \
        text.splitlines()
