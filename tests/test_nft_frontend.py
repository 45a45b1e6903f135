"""The nftables front-end and the translations: same rules as iptables' own translator
reads them, round trips through `translate`, and errors with line and column."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from click.testing import CliRunner

from bpfilter import ir
from bpfilter.testbed import netns
from bpfilter.cli import main
from bpfilter.errors import InputError
from bpfilter.frontend import dialect, parse_ruleset
from bpfilter.frontend.iptables.save import save
from bpfilter.frontend.nft.save import save_nft
from bpfilter.passes import validate
from bpfilter.passes.xtables import to_xtables
from tests.conftest import EXAMPLES

IPTABLES_EXAMPLES = sorted(EXAMPLES.glob("*.v4"))
# Examples iptables-restore-translate 1.8.9 gets wrong: it drops kube-proxy's `-p tcp -m
# tcp` before `DNAT --to-destination A:p`, and the kernel's nft refuses its translation;
# it leaves libvirt's CHECKSUM out (a comment line).
# ufw's `-m recent` becomes an nft meter, which bpfilter's nft front-end does not read.
MISTRANSLATED = {"kube-proxy.v4", "libvirt.v4", "ufw.v4"}
# Examples bpfilter refuses to say in nft, and why (test_translate_to_nft_round_trips).
NOT_NFT = {"kube-proxy.v4": "--ctstate SNAT and DNAT translate alone",
           "libvirt.v4": "nft has no checksum statement",
           "ufw.v4": r"no nft dynamic sets yet \(-m recent\)"}


def _plain(ruleset: ir.Ruleset) -> list:
    """Rules as (table, chain, matches, target), with what only spelling tells apart
    (-m state or conntrack, NOTRACK or CT, nft's field-by-field header reads) made equal,
    and the matches as a set: nft's translator moves `-p` before the addresses."""
    def plain(match):
        if isinstance(match, ir.ConntrackMatch):
            return dataclasses.replace(match, module="conntrack")
        if hasattr(match, "partial_header"):
            return dataclasses.replace(match, partial_header=False)
        if isinstance(match, ir.LimitMatch):
            return dataclasses.replace(match, bucket=None)
        if isinstance(match, ir.NumgenMatch):  # a draw is named by where its rule is
            return dataclasses.replace(match, draw=match.draw and "shared")
        return match

    def target(t):
        return ir.NotrackTarget() if isinstance(t, ir.NotrackTarget) else t

    return [(table.name, chain.name, frozenset(map(plain, rule.matches)), target(rule.target))
            for table, chain, rule in ruleset.rules()]


def _translated(text: str) -> str:
    return netns.run("iptables-restore-translate", "-f", "/dev/stdin", input=text).stdout


@pytest.mark.parametrize("path", [p for p in IPTABLES_EXAMPLES if p.name not in MISTRANSLATED],
                         ids=lambda p: p.name)
def test_reads_iptables_restore_translate_as_iptables_rules(kernel, path):
    """iptables' own translation of each example reads to the example's rules."""
    text = path.read_text()
    if path.name == "acl-1000.v4":
        text = "\n".join(text.splitlines()[:60]) + "\nCOMMIT\n"
    assert _plain(parse_ruleset(_translated(text))) == _plain(parse_ruleset(text))


@pytest.mark.parametrize("path", IPTABLES_EXAMPLES, ids=lambda p: p.name)
def test_translate_to_nft_round_trips(kernel, namespace, path):
    """`translate --to nft` prints what the kernel's nft accepts, and reads back to the
    same rules (or refuses, naming why, what nft cannot say)."""
    ruleset = parse_ruleset(path.read_text(), path.name)
    if path.name in NOT_NFT:
        with pytest.raises(InputError, match=NOT_NFT[path.name]):
            save_nft(ruleset)
        return
    text = save_nft(ruleset)
    netns.run("nft", "-c", "-f", "-", netns=namespace(), input=text)
    assert _plain(parse_ruleset(text)) == _plain(ruleset)


def test_translate_to_iptables_regroups_tables(kernel, namespace):
    """nft tables of any name become iptables' raw and filter tables by priority, and
    iptables-restore accepts the result."""
    text = """table ip early {
    chain pre { type filter hook prerouting priority raw; policy accept;
        udp dport 53 notrack }
}
table ip fw {
    chain in { type filter hook input priority 0; policy drop;
        ct state established accept
        tcp dport { 22, 80 } jump web
        log prefix "dropped: " drop }
    chain web { ip saddr 10.0.0.0/8 accept }
}
"""
    result = CliRunner().invoke(main, ["translate", "-", "--to", "iptables"], input=text)
    assert result.exit_code == 0, result.output
    netns.run("iptables-legacy-restore", "--test", netns=namespace(), input=result.output)
    ruleset = parse_ruleset(result.output)
    assert [t.name for t in ruleset.tables] == ["raw", "filter"]
    assert ruleset.table("filter").chain("INPUT").policy is ir.Verdict.DROP
    assert [c.name for c in ruleset.table("filter").chains][:3] == ["INPUT", "web", "in.1"]


def test_nat_chains_translate_both_ways(kernel, namespace):
    """nft's nat chains at dstnat and srcnat become iptables' nat table and back; the
    kernel's nft lists the translation as written, and iptables-restore takes the other."""
    text = """table ip nat {
	chain pre {
		type nat hook prerouting priority -100; policy accept;
		iifname "eth1" tcp dport 2222 counter dnat to 100.64.0.2:22
		iifname "eth1" tcp dport 8080 counter dnat to 100.64.0.10-100.64.0.19:80-81 persistent
		iifname "eth0" tcp dport 80 counter redirect to :3128
		iifname "eth0" udp dport 53 counter redirect random
	}
	chain post {
		type nat hook postrouting priority 100; policy accept;
		oifname "eth1" ip protocol tcp counter snat to 198.18.0.50:2000-2999 random,persistent
		oifname "eth1" udp dport 53 counter masquerade to :1024-65535 fully-random
		oifname "eth2" counter snat to 198.18.0.50-198.18.0.57
		oifname "eth1" counter masquerade
	}
}
"""
    space = namespace()
    netns.run("nft", "-f", "-", netns=space, input=text)
    listed = netns.run("nft", "list", "ruleset", netns=space).stdout
    assert _plain(parse_ruleset(listed)) == _plain(parse_ruleset(text))
    result = CliRunner().invoke(main, ["translate", "-", "--to", "iptables"], input=text)
    assert result.exit_code == 0, result.output
    netns.run("iptables-legacy-restore", "--test", netns=namespace(), input=result.output)
    assert "-A POSTROUTING -o eth1 -p tcp -j SNAT --to-source 198.18.0.50:2000-2999 " \
           "--random --persistent" in result.output
    assert "-A PREROUTING -i eth1 -p tcp -m tcp --dport 8080 -j DNAT --to-destination " \
           "100.64.0.10-100.64.0.19:80-81 --persistent" in result.output
    back = CliRunner().invoke(main, ["translate", "-", "--to", "nft"], input=result.output)
    assert back.exit_code == 0, back.output
    assert _plain(parse_ruleset(back.output)) == _plain(parse_ruleset(result.output))
    assert "type nat hook postrouting priority 100" in back.output


def test_ct_status_is_ctstate_snat_dnat_both_ways(kernel, namespace):
    """`ct status dnat` and `snat,dnat` (either bit) are --ctstate DNAT and SNAT,DNAT;
    the kernel's nft lists the translation back as written."""
    text = """table ip f {
	chain fwd {
		type filter hook forward priority 0; policy drop;
		ct status dnat counter accept
		ct status snat,dnat counter accept
	}
}
"""
    result = CliRunner().invoke(main, ["translate", "-", "--to", "iptables"], input=text)
    assert result.exit_code == 0, result.output
    assert "-A FORWARD -m conntrack --ctstate DNAT -j ACCEPT\n" \
           "-A FORWARD -m conntrack --ctstate SNAT,DNAT -j ACCEPT" in result.output
    back = CliRunner().invoke(main, ["translate", "-", "--to", "nft", "--family", "ipv4"],
                              input=result.output)
    space = namespace()
    netns.run("nft", "-f", "-", netns=space, input=back.output)
    listed = netns.run("nft", "list", "ruleset", netns=space).stdout
    assert [r[2:] for r in _plain(parse_ruleset(listed))] == \
        [r[2:] for r in _plain(parse_ruleset(text))]


def test_numgen_prints_back_as_the_kernel_lists_it(kernel, namespace):
    """numgen compared with a set, a bound, a negation: bpfilter's nft output of it is
    what the kernel's nft lists back; a numgen verdict map (one draw for several rules)
    and any numgen in iptables' words are refused, never changed."""
    text = """table ip t {
	chain c {
		type filter hook input priority 0; policy accept;
		numgen inc mod 2 offset 3 { 3, 4 } drop
		numgen random mod 10 < 3 drop
		numgen inc mod 5 != 2 accept
	}
}
"""
    ours = CliRunner().invoke(main, ["translate", "-", "--to", "nft"], input=text)
    assert ours.exit_code == 0, ours.output
    space = namespace()
    netns.run("nft", "-f", "-", netns=space, input=ours.output)
    listed = netns.run("nft", "list", "ruleset", netns=space).stdout
    assert [r[2:] for r in _plain(parse_ruleset(listed))] == \
        [r[2:] for r in _plain(parse_ruleset(text))]
    for refused, to in ((text, "iptables"), (text.replace(
            "numgen inc mod 5 != 2 accept", "numgen random mod 2 vmap { 0 : accept, 1 : drop }"),
            "nft")):
        result = CliRunner().invoke(main, ["translate", "-", "--to", to], input=refused)
        assert result.exit_code == 2 and "numgen" in result.output, result.output


def test_statistic_translates_as_iptables_translate_says_it(kernel, namespace):
    """-m statistic random is nft's `meta random & 2147483647 < N` (iptables-translate's
    words, read back to the same match), nth is `numgen inc mod N P`; the kernel's nft
    takes both."""
    text = ("*filter\n:INPUT ACCEPT [0:0]\n"
            "-A INPUT -m statistic --mode random --probability 0.25 -j DROP\n"
            "-A INPUT -m statistic --mode random ! --probability 0.5 -j ACCEPT\n"
            "-A INPUT -m statistic --mode nth --every 3 --packet 1 -j DROP\nCOMMIT\n")
    nft = CliRunner().invoke(main, ["translate", "-", "--to", "nft", "--family", "ipv4"],
                             input=text)
    assert nft.exit_code == 0, nft.output
    assert "meta random & 2147483647 < 536870912" in nft.output
    assert "meta random & 2147483647 >= 1073741824" in nft.output
    assert "numgen inc mod 3 1" in nft.output
    netns.run("nft", "-c", "-f", "-", netns=namespace(), input=nft.output)
    back = [r for r in _plain(parse_ruleset(nft.output))]
    assert [r[2:] for r in back[:2]] == [r[2:] for r in _plain(parse_ruleset(text))[:2]]


def test_dialect_by_content_and_stdin(kernel, tmp_path):
    text = (EXAMPLES / "host-firewall.nft").read_text()
    assert dialect(text) == "nft"
    assert dialect((EXAMPLES / "marks.v4").read_text()) == "iptables"
    result = CliRunner().invoke(main, ["compile", "-", "--emit", "c", "-o",
                                       str(tmp_path)], input=text)
    assert result.exit_code == 0, result.output
    assert "filter/input" in (tmp_path / "bf_ingress.c").read_text()


def test_sets_maps_and_statements_become_rules():
    ruleset = validate(parse_ruleset((EXAMPLES / "host-firewall.nft").read_text()))
    table = ruleset.table("filter")
    rules = table.chain("input").rules
    # `tcp dport vmap { 22 : jump ssh, 80 : accept, 443 : accept, 23 : drop }`
    vmap = [r for r in rules if r.origin.line == 23]
    assert [r.target for r in vmap] == [ir.JumpTarget("ssh"),
                                        ir.VerdictTarget(ir.Verdict.ACCEPT),
                                        ir.VerdictTarget(ir.Verdict.ACCEPT),
                                        ir.VerdictTarget(ir.Verdict.DROP)]
    # `ip saddr @blocklist log ... drop`: one rule per element, to one chain of both
    blocked = [r for r in rules if r.origin.line == 21]
    assert len(blocked) == 3 and len({r.target for r in blocked}) == 1
    body = table.chain(blocked[0].target.chain)
    assert [type(r.target) for r in body.rules] == [ir.LogTarget, ir.VerdictTarget]
    early = ruleset.table("early").chain("pre")
    assert (early.hook, early.priority, early.before_tracking) == (ir.Hook.PREROUTING,
                                                                   -300, True)


def test_overlapping_concatenations_run_statements_once():
    """Elements of a set of concatenations may overlap: their rules go to the statement
    by goto from a chain of their own, so a packet in two of them logs once."""
    text = """table ip t {
  chain c { type filter hook input priority 0;
    ip saddr . tcp dport { 10.0.0.0/8 . 22, 10.1.0.0/16 . 20-30 } log prefix "x" }
}"""
    chain = parse_ruleset(text).table("t")
    first = chain.chain("c").rules
    assert len(first) == 1 and isinstance(first[0].target, ir.JumpTarget)
    choices = chain.chain(first[0].target.chain).rules
    assert [r.target.goto for r in choices] == [True, True]
    assert len({r.target.chain for r in choices}) == 1


@pytest.mark.parametrize("elements, accepted", [
    ("10.0.0.1 . 80 : accept, 10.0.0.2 . 80 : drop", True),  # kube-proxy's service-ips
    ("10.0.0.1 . 20-30 : accept, 10.0.0.2 . 25 : drop", True),
    ("10.0.0.1 . 20-30 : accept, 10.0.0.1 . 25 : drop", False),  # nft: "File exists"
])
def test_a_concatenation_overlaps_only_where_its_other_fields_agree(elements, accepted):
    """As nft 1.0.6 on these machines: only the last field of a concatenation forms
    intervals (a map of 2,500 services to port 80 was refused before)."""
    text = ("table ip t {\n chain c { type filter hook input priority 0;\n"
            f"  ip saddr . tcp dport vmap {{ {elements} }}\n }}\n}}\n")
    if accepted:
        parse_ruleset(text)
    else:
        with pytest.raises(InputError, match="conflicting intervals"):
            parse_ruleset(text)


BAD = {
    "family bridge": ("table bridge f {\n  chain c { type filter hook input priority 0; }\n"
                      "}\n", 1, 7, "family bridge are not supported yet"),
    "address without family in inet": ("table inet f {\n chain c {\n  ct original saddr "
                                       "10.0.0.1 drop\n }\n}\n", 3, 15,
                                       "the address needs its family"),
    "family never true": ("table ip f {\n chain c {\n  meta nfproto ipv6 drop\n }\n}\n",
                          3, 16, "never true in a table of family ip"),
    "unknown expression": ("table ip f {\n  chain c {\n    meta skuid 0 drop\n  }\n}\n",
                           3, 5, "'meta skuid' is not supported"),
    "byte limit": ("table ip f {\n chain c {\n  limit rate 10 kbytes/second drop\n }\n}\n",
                   3, 14, "rate expected as N/unit (packets)"),
    "nat chain": ("table ip n {\n chain p { type nat hook input priority 100; }\n"
                  " chain p { masquerade }\n}\n", 3, 12, "masquerade is not valid at INPUT"),
    "masquerade in ip6": ("table ip6 n {\n chain p { type nat hook postrouting priority 100; "
                          "}\n chain p { masquerade }\n}\n", 3, 12, "IPv6 NAT"),
    "device hook": ("table ip f {\n chain c { type filter hook ingress priority 0; }\n}\n",
                    2, 29, "hook not supported"),
    "unclosed": ("table ip f {\n chain c {\n  tcp dport 22 accept\n", 3, 0, "not closed"),
    "variable": ("table ip f {\n chain c {\n  ip saddr $admins accept\n }\n}\n", 3, 12,
                 "variables are not supported"),
    "match after statement": ("table ip f {\n chain c {\n  counter log tcp dport 22 drop\n"
                              " }\n}\n", 3, 15, "a match after a statement"),
    "unknown set": ("table ip f {\n chain c {\n  ip saddr @nope drop\n }\n}\n", 3, 12,
                    "no set 'nope'"),
    "bad address": ("add table ip f\nadd chain ip f c\nadd rule ip f c ip saddr 10.0.0.300 drop\n",
                    3, 26, "an IPv4 address"),
    "jump to missing chain": ("table ip f {\n chain c {\n  jump nowhere\n }\n}\n", 3, 3,
                              "no chain 'nowhere'"),
    "goto after statement": ("table ip f {\n chain c {\n  log goto d\n }\n chain d { }\n}\n",
                             3, 3, "return or goto after another statement"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_nft_input_names_line_and_column(name):
    text, line, column, why = BAD[name]
    with pytest.raises(InputError) as caught:
        validate(parse_ruleset(text, "rules.nft"))
    assert (caught.value.file, caught.value.line) == ("rules.nft", line), str(caught.value)
    assert caught.value.column == column, str(caught.value)
    assert why in str(caught.value)


def test_cli_reports_nft_errors_with_exit_2(tmp_path):
    path = tmp_path / "bad.nft"
    path.write_text(BAD["unknown expression"][0])
    result = CliRunner().invoke(main, ["compile", str(path), "--emit", "c"])
    assert result.exit_code == 2
    assert "bad.nft:3:5" in result.output and "meta skuid" in result.output


def test_translate_refuses_what_the_other_side_cannot_say():
    result = CliRunner().invoke(main, ["translate", str(EXAMPLES / "host-firewall.nft"),
                                       "--to", "iptables"])
    assert result.exit_code == 2
    assert "iptables takes -s once in a rule" in " ".join(result.output.split())
    text = "*mangle\n:INPUT ACCEPT [0:0]\n" \
        "-A INPUT -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff\nCOMMIT\n"
    result = CliRunner().invoke(main, ["translate", "-", "--to", "nft"], input=text)
    assert result.exit_code == 2 and "cannot be said in nft" in " ".join(result.output.split())


def test_to_xtables_refuses_two_base_chains_at_one_place():
    text = """table ip a { chain i { type filter hook input priority 0; } }
table ip b { chain i { type filter hook input priority 0; } }"""
    with pytest.raises(InputError, match="a second base chain at INPUT"):
        to_xtables(parse_ruleset(text))
    assert "-A" not in save(to_xtables(parse_ruleset(text.splitlines()[0])))


# Not edge.nft: nft 1.0.6's JSON leaves out a netdev chain's device (bpfilter then says
# that it needs one).
NFT_RULESETS = {"host-firewall.nft": lambda: (EXAMPLES / "host-firewall.nft").read_text(),
                "dual-stack.nft": lambda: (EXAMPLES / "dual-stack.nft").read_text(),
                "kube-proxy.nft": lambda: (EXAMPLES / "kube-proxy.nft").read_text(),
                **{p.name: (lambda p=p: _translated(p.read_text()))
                   for p in IPTABLES_EXAMPLES
                   if p.name != "acl-1000.v4" and p.name not in MISTRANSLATED}}


@pytest.mark.parametrize("name", sorted(NFT_RULESETS))
def test_nft_json_reads_as_the_text_does(kernel, namespace, name):
    """The kernel's own `nft -j list ruleset` of each ruleset reads to the rules its
    text does (as many of each: the kernel lists a set's elements in its own order)."""
    text = NFT_RULESETS[name]()
    space = namespace()
    netns.run("nft", "-f", "-", netns=space, input=text)
    document = netns.run("nft", "-j", "list", "ruleset", netns=space).stdout
    assert dialect(document) == "nft-json"
    assert Counter(_plain(parse_ruleset(document, "ruleset.json"))) == \
        Counter(_plain(parse_ruleset(text)))


def test_inet_rules_hold_for_the_family_they_name(kernel, namespace):
    """In an inet table `ip ...` and `icmp ...` make a rule IPv4's (nft's implicit `meta
    nfproto ipv4`), `ip6 ...` and `icmpv6 ...` IPv6's, the rest holds for both; bare
    `reject` is icmpx's. translate keeps the table inet (nft accepts it, it reads back to
    the same rules); iptables has no inet table."""
    text = (EXAMPLES / "dual-stack.nft").read_text()
    ruleset = parse_ruleset(text, "dual-stack.nft")
    (table,) = ruleset.tables
    assert table.family is None and table.key == "inet filter"
    families = {rule.origin.line: rule.find(ir.FamilyMatch) for rule in
                table.chain("input").rules}
    lines = {words: number for number, words in enumerate(text.splitlines(), 1)}
    line = next(n for w, n in lines.items() if "ip saddr @blocklist4" in w)
    assert families[line] == ir.FamilyMatch(ir.Family.IPV4)
    line = next(n for w, n in lines.items() if "icmpv6 type echo-request" in w)
    assert families[line] == ir.FamilyMatch(ir.Family.IPV6)
    line = next(n for w, n in lines.items() if "tcp dport { 80, 443 }" in w)
    assert families[line] is None
    assert table.chain("input").rules[-1].target == ir.RejectTarget(
        ir.RejectWith.ICMPX_ADMIN_PROHIBITED)
    runner = CliRunner()
    nft = runner.invoke(main, ["translate", str(EXAMPLES / "dual-stack.nft"), "--to", "nft"])
    assert nft.exit_code == 0 and "table inet filter" in nft.output, nft.output
    netns.run("nft", "-c", "-f", "-", netns=namespace(), input=nft.output)
    assert _plain(parse_ruleset(nft.output)) == _plain(ruleset)
    refused = runner.invoke(main, ["translate", str(EXAMPLES / "dual-stack.nft"), "--to",
                                   "iptables"])
    assert refused.exit_code == 2 and "inet table" in refused.output


def test_nft_json_errors_point_into_the_json(tmp_path):
    document = ('{"nftables": [{"table": {"family": "ip", "name": "t"}},\n'
                ' {"chain": {"family": "ip", "table": "t", "name": "c", "type": "filter", '
                '"hook": "input", "prio": 0, "policy": "accept"}},\n'
                ' {"rule": {"family": "ip", "table": "t", "chain": "c", "expr": '
                '[{"match": {"op": "==", "left": {"fib": {"result": "type"}}, '
                '"right": "local"}}, {"drop": null}]}}]}\n')
    with pytest.raises(InputError) as caught:
        parse_ruleset(document, "ruleset.json")
    assert (caught.value.line, caught.value.column) == (3, 2), str(caught.value)
    assert "fib" in str(caught.value)
    with pytest.raises(InputError, match="not valid JSON"):
        parse_ruleset('{"nftables": [}', "ruleset.json")


def test_a_set_of_elements_keeps_one_limit(tmp_path):
    """One nft rule is one token bucket, however many IR rules its set becomes."""
    from bpfilter.compiler import compile_ruleset

    text = """table ip t {
  chain c { type filter hook input priority 0;
    ip saddr { 192.0.2.1, 192.0.2.2, 192.0.2.3 } limit rate 1/second accept
    ip saddr { 192.0.2.1, 192.0.2.2 } limit rate 1/second accept }
}"""
    compilation = compile_ruleset(text, "t.nft", tmp_path, emit="c")
    assert len(compilation.code.limits) == 2


V6 = EXAMPLES / "host-firewall.v6"


def test_ip6tables_reads_as_its_own_translator_and_ours_print_it(kernel, namespace):
    """ip6tables-save text: read as ip6tables-restore-translate's nft reads; printed in
    nft (which the kernel's nft takes) and back in ip6tables-save text (which
    ip6tables-restore takes), each reading to the same rules."""
    text = V6.read_text()
    rules = _plain(parse_ruleset(text, V6.name))
    theirs = netns.run("ip6tables-restore-translate", "-f", str(V6)).stdout
    assert _plain(parse_ruleset(theirs)) == rules
    runner = CliRunner()
    nft = runner.invoke(main, ["translate", str(V6), "--to", "nft"])
    assert nft.exit_code == 0, nft.output
    assert "table ip6 filter" in nft.output and "icmpv6 type nd-neighbor-solicit" in nft.output
    space = namespace()
    netns.run("nft", "-c", "-f", "-", netns=space, input=nft.output)
    assert _plain(parse_ruleset(nft.output)) == rules
    back = runner.invoke(main, ["translate", "-", "--to", "iptables"], input=nft.output)
    assert back.exit_code == 0, back.output
    netns.run("ip6tables-legacy-restore", "--test", netns=space, input=back.output)
    assert dialect(back.output) == "ip6tables"
    assert _plain(parse_ruleset(back.output)) == rules


def test_both_families_compile_into_one_program(tmp_path):
    """`compile rules.v4 rules.v6`: one program whose base chains each run for their own
    family's packets."""
    result = CliRunner().invoke(main, ["compile", str(EXAMPLES / "host-firewall.v4"),
                                       str(V6), "--emit", "c", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ip6 filter" in result.output
    source = (tmp_path / "bf_ingress.c").read_text()
    assert "#define BF_IPV6 1" in source
    assert "if (p->family == 4) {" in source and "if (p->family == 6) {" in source


def test_several_files_must_be_iptables_save_text(tmp_path):
    result = CliRunner().invoke(main, ["compile", str(V6), str(EXAMPLES / "edge.nft"),
                                       "--emit", "c", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "nftables ruleset holds both families" in " ".join(result.output.split())


BAD6 = {
    "icmp in ip6tables": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p icmp -m icmp "
                          "--icmp-type 8 -s ::1 -j DROP\nCOMMIT\n", 3, "an IPv4 match"),
    "-f in ip6tables": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s ::/0 -f -j DROP\nCOMMIT\n",
                        3, "ip6tables has no -f"),
    "IPv4 reject in ip6tables": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -d ::1 -j REJECT "
                                 "--reject-with icmp-host-prohibited\nCOMMIT\n", 3,
                                 "unknown reject type for this family"),
    "ip in an ip6 table": ("table ip6 t {\n chain c {\n  ip saddr 10.0.0.1 drop\n }\n}\n", 3,
                           "'ip' in a table of family ip6"),
    "IPv4 address in an ip6 table": ("table ip6 t {\n chain c {\n  ip6 saddr 10.0.0.1 drop\n"
                                     " }\n}\n", 3, "an IPv6 address"),
    "nfproto in netdev": ("table netdev t {\n chain c {\n  type filter hook ingress device"
                          " eth0 priority 0;\n  meta nfproto ipv4 drop\n }\n}\n", 4,
                          "nfproto is netdev"),
    "not an EtherType": ("table netdev t {\n chain c {\n  type filter hook ingress device"
                         " eth0 priority 0;\n  ether type 0x10 drop\n }\n}\n", 4,
                         "an EtherType expected"),
    "netdev without device": ("table netdev t {\n chain c {\n  type filter hook ingress "
                              "priority 0;\n }\n}\n", 3, "needs its device"),
    "ingress in an ip table": ("table ip t {\n chain c {\n  type filter hook ingress "
                               "priority 0;\n }\n}\n", 3, "hook not supported in a ip"),
}


@pytest.mark.parametrize("name", sorted(BAD6))
def test_bad_ipv6_input_names_its_line(name):
    text, line, why = BAD6[name]
    with pytest.raises(InputError) as caught:
        parse_ruleset(text, "rules.v6")
    assert caught.value.line == line and why in str(caught.value), str(caught.value)
