"""Parsing, the canonical round trip, and errors that name file, line and token."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bpfilter import ir
from bpfilter.cli import main
from bpfilter.errors import InputError
from bpfilter.frontend import combine, parse_ruleset, xtables_sections
from bpfilter.frontend.iptables.save import save
from bpfilter.passes import validate
from tests.conftest import EXAMPLES


def _words(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", sorted([*EXAMPLES.glob("*.v4"), *EXAMPLES.glob("*.v6")]),
                         ids=lambda p: p.name)
def test_examples_round_trip(path):
    text = path.read_text()
    assert _words(save(parse_ruleset(text, path.name))) == _words(text)


def test_conntrack_options_print_as_iptables_save_does():
    """The order and spelling iptables-legacy-save 1.8.9 printed for these rules."""
    text = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate NEW,RELATED --ctorigsrc 10.0.0.1 ! --ctorigdst 10.1.0.0/16 --ctreplsrc 1.2.3.4 --ctrepldst 5.6.0.0/16 --ctdir REPLY -j ACCEPT
-A INPUT -m conntrack --ctdir ORIGINAL -j DROP
-A INPUT -m conntrack ! --ctorigsrc 192.0.2.0/24 -j DROP
-A INPUT -p tcp -m state ! --state INVALID -j ACCEPT
-A INPUT -m conntrack --ctproto 6 ! --ctorigsrcport 1024:2000 --ctorigdstport 22 --ctreplsrcport 22 --ctrepldstport 80:81 -j ACCEPT
-A INPUT -m conntrack --ctstate NEW ! --ctproto 17 -j ACCEPT
COMMIT
"""
    given = text.replace("--ctstate NEW,RELATED --ctorigsrc 10.0.0.1",
                         "--ctdir REPLY --ctorigsrc 10.0.0.1/32 --ctstate related,new")
    given = given.replace("5.6.0.0/16 --ctdir REPLY", "5.6.0.0/16")
    assert _words(save(parse_ruleset(given))) == _words(text)


def test_round_trip_keeps_counters_and_spelling():
    text = """*filter
:INPUT DROP [12:3400]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [5:60]
:X - [0:0]
[3:180] -A INPUT -s 10.0.0.0/8 ! -i eth+ -p tcp -m tcp ! --sport 1:1023 --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT
[0:0] -A INPUT -p icmp -m icmp --icmp-type 3/4 -m limit --limit 2/min --limit-burst 9 -j LOG --log-prefix "it\\'s \\"x\\" " --log-level 7
[0:0] -A INPUT -m iprange --src-range 1.2.3.4-1.2.3.9 ! --dst-range 5.6.7.8-5.6.7.9 -m comment --comment "a b" -g X
[0:0] -A X -m mac --mac-source 0a:0b:0c:0d:0e:0f -m ttl ! --ttl-eq 5 -m length --length 60:1500 -j REJECT --reject-with icmp-admin-prohibited
COMMIT
"""
    assert _words(save(parse_ruleset(text), counters=True)) == _words(text)


def test_syn_and_implicit_protocol_module_are_canonicalised():
    text = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --syn --dport ssh -j ACCEPT\nCOMMIT\n"
    out = save(parse_ruleset(text))
    assert "-A INPUT -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT" in out


def test_typed_matches():
    rule = next(parse_ruleset(
        "*filter\n:INPUT ACCEPT [0:0]\n"
        "-A INPUT ! -s 10.1.0.0/16 -p udp -m multiport --dports 53,5353:5355 -j DROP\n"
        "COMMIT\n").rules())[2]
    assert rule.matches[0] == ir.AddressMatch("src", __import__("ipaddress").IPv4Network(
        "10.1.0.0/16"), negate=True)
    assert rule.find(ir.MultiportMatch).ports == (ir.Range(53, 53), ir.Range(5353, 5355))
    assert rule.origin.line == 3


BAD = {
    "truncated": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\n",
                  3, "not closed by COMMIT"),
    "missing COMMIT before next table": (
        "*filter\n:INPUT ACCEPT [0:0]\n*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n",
        3, "not closed by COMMIT"),
    "unknown match": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m frobnicate -j DROP\nCOMMIT\n",
                      3, "unknown or unsupported match module 'frobnicate'"),
    "unsupported match": (
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m set --match-set bad src -j DROP\nCOMMIT\n",
        3, "ipsets are not supported yet"),
    "bad direction": (
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctdir SIDEWAYS -j DROP\nCOMMIT\n",
        3, "not a direction"),
    "NAT state": (
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m state --state DNAT -j DROP\nCOMMIT\n",
        3, "unknown state 'DNAT'"),
    "unknown option": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --frob 1 -j DROP\nCOMMIT\n",
                       3, "unknown option"),
    "unknown target": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j TPROXY\nCOMMIT\n",
                       3, "target not supported yet"),
    "jump to missing chain": ("*filter\n:INPUT ACCEPT [0:0]\n\n-A INPUT -j NOWHERE\nCOMMIT\n",
                              4, "no chain 'NOWHERE'"),
    "loop": ("*filter\n:INPUT ACCEPT [0:0]\n:A - [0:0]\n:B - [0:0]\n-A INPUT -j A\n"
             "-A A -j B\n-A B -p tcp -j A\nCOMMIT\n", 7, "loop: A -> B -> A"),
    "chains nested too deep": (
        "*filter\n:INPUT ACCEPT [0:0]\n" + "".join(f":C{i} - [0:0]\n" for i in range(1, 9))
        + "-A INPUT -j C1\n" + "".join(f"-A C{i} -j C{i + 1}\n" for i in range(1, 8))
        + "COMMIT\n", 17, "chains nested more than 7 deep: 'C6'"),
    "undeclared chain": ("*filter\n:INPUT ACCEPT [0:0]\n-A FOO -j DROP\nCOMMIT\n",
                         3, "no chain 'FOO' declared"),
    "bad address": ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 10.0.0.300 -j DROP\nCOMMIT\n",
                    3, "not an IPv4 address"),
    "tcp-reset without -p tcp": (
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j REJECT --reject-with tcp-reset\nCOMMIT\n",
        3, "needs '-p tcp'"),
    "REJECT outside filter": (
        "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j REJECT\nCOMMIT\n",
        3, "REJECT is valid only in the filter table"),
    "NOTRACK outside raw": ("*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j NOTRACK\nCOMMIT\n",
                            3, "NOTRACK is valid only in the raw table"),
    "CT without --notrack": (
        "*raw\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j CT --zone 1\nCOMMIT\n",
        3, "only CT --notrack is supported yet"),
    "shifted CONNMARK": (
        "*mangle\n:INPUT ACCEPT [0:0]\n-A INPUT -j CONNMARK --set-mark 1 --left-shift-mark 2\n"
        "COMMIT\n", 3, "shifting marks is not supported yet"),
    "MARK without a value": ("*mangle\n:INPUT ACCEPT [0:0]\n-A INPUT -j MARK\nCOMMIT\n",
                             3, "MARK needs one of --set-xmark"),
    "DNAT at INPUT": ("*nat\n:INPUT ACCEPT [0:0]\n-A INPUT -j DNAT --to-destination 1.2.3.4"
                      "\nCOMMIT\n", 3, "DNAT is not valid at INPUT"),
    "REDIRECT at OUTPUT": ("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j REDIRECT "
                           "--to-ports 3128\nCOMMIT\n", 3, "REDIRECT at OUTPUT is not "
                           "compiled yet"),
    "MASQUERADE at INPUT": ("*nat\n:INPUT ACCEPT [0:0]\n-A INPUT -j MASQUERADE\nCOMMIT\n",
                            3, "MASQUERADE is not valid at INPUT"),
    "SNAT address range's end": ("*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j SNAT "
                                 "--to-source 1.2.3.4-1.2.3.\nCOMMIT\n", 3,
                                 "'1.2.3.' is not an IPv4 address"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_names_its_line(name):
    text, line, why = BAD[name]
    with pytest.raises(InputError) as caught:
        validate(parse_ruleset(text, "rules.v4"))
    assert caught.value.file == "rules.v4"
    assert caught.value.line == line
    assert why in str(caught.value)


def test_cli_exits_2_with_position_and_alternatives(tmp_path):
    rules = tmp_path / "rules.v4"
    rules.write_text("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -m hashlimit --hashlimit-upto 5/sec --hashlimit-name h\nCOMMIT\n")
    result = CliRunner().invoke(main, ["compile", str(rules), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{rules}:3:" in result.output
    assert "hashlimit" in result.output and "supported:" in result.output


def test_errors_keep_their_lines_whole_under_a_long_path(tmp_path):
    """A message is one line however long its file name, and the quoted rule stands over
    its caret (CI's checkout path once wrapped a message in the middle of a phrase)."""
    rules = tmp_path / ("d" * 70) / "rules.v4"
    rules.parent.mkdir()
    rule = "-A INPUT -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -m comment --comment " + \
        "x" * 40 + " -m hashlimit"
    rules.write_text(f"*filter\n:INPUT ACCEPT [0:0]\n{rule}\nCOMMIT\n")
    result = CliRunner().invoke(main, ["compile", str(rules), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    message, quoted, caret = result.output.splitlines()[:3]
    assert message.startswith(f"bpfilter: error: {rules}:3:") and "supported:" in message
    assert quoted == f"  3 | {rule}"
    assert quoted[caret.index("^"):].startswith("hashlimit")


def test_the_consoles_print_mac_addresses_as_they_are():
    """rich reads ':cd:' as an emoji code; a MAC address (demo's LOG lines, `list` of
    `-m mac` rules) must come out as it is."""
    from bpfilter.cli import console, err_console

    for out in (console, err_console):
        with out.capture() as captured:
            out.print("MAC=58:cd:26:dd:01", markup=False, highlight=False)
        assert "58:cd:26" in captured.get()


def test_ignore_unsupported_lists_each_skipped_rule(tmp_path, kernel):
    rules = tmp_path / "rules.v4"
    rules.write_text("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j REDIRECT\n"
                     "-A OUTPUT -p udp -j REDIRECT --to-ports 53\nCOMMIT\n"
                     "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n")
    result = CliRunner().invoke(main, ["compile", str(rules), "--ignore-unsupported",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert result.output.count("bpfilter: skipped:") == 2
    assert "2 rule(s) skipped" in result.output


def test_address_edits_are_recognised_from_the_changed_lines_only():
    from bpfilter.frontend.iptables.edits import address_edit

    head = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp -j ACCEPT\n"
    block = "".join(f"-A INPUT -s 10.0.0.{i}/32 -j DROP\n" for i in range(1, 5))
    old = head + block + "COMMIT\n"
    added = old.replace("-A INPUT -s 10.0.0.3/32", "-A INPUT -s 10.9.9.9/32 -j DROP\n"
                        "-A INPUT -s 10.0.0.3/32")
    edit = address_edit(old, added)
    assert (edit.table, edit.chain, edit.index, edit.direction) == ("filter", "INPUT", 3, "src")
    assert [str(n) for n in edit.added] == ["10.9.9.9/32"] and edit.removed == ()
    assert edit.before == edit.after == edit.rest == "-j DROP"
    removed = address_edit(added, old)
    assert [str(n) for n in removed.removed] == ["10.9.9.9/32"] and removed.index == 3
    assert address_edit(old, old.replace("10.0.0.2/32 -j DROP", "10.0.0.2/32 -j ACCEPT")) is None
    assert address_edit(old, old.replace("COMMIT", "-A INPUT -p tcp -j DROP\nCOMMIT")) is None
    other = address_edit(old, old.replace("COMMIT", "-A INPUT -s 10.0.0.9/32 -j ACCEPT\nCOMMIT"))
    assert other.before == "-j DROP" and other.rest == "-j ACCEPT"  # apply compiles this one


def test_marks_set_at_xdp_are_announced(tmp_path):
    """At XDP the kernel never sees a mark (no skb yet): compile says so, and not at TC."""
    rules = tmp_path / "marks.v4"
    rules.write_text("*mangle\n:PREROUTING ACCEPT [0:0]\n"
                     "-A PREROUTING -p tcp -j MARK --set-xmark 0x1/0xffffffff\nCOMMIT\n")
    at = {attach: CliRunner().invoke(main, ["compile", str(rules), "--emit", "c",
                                            "--attach", attach, "-o", str(tmp_path / attach)])
          for attach in ("xdp", "tc")}
    assert at["xdp"].exit_code == at["tc"].exit_code == 0, at["xdp"].output
    assert "warning: rules set packet marks (lines 3)" in " ".join(at["xdp"].output.split())
    assert "warning" not in at["tc"].output


def test_iptables_and_ip6tables_text_in_one():
    """`cat rules.v4 rules.v6`: each section by its header comment, its tables of its
    family, positions those of the whole text; save writes both headers back."""
    v4 = "# Generated by iptables-save v1.8.9\n*filter\n:INPUT DROP [0:0]\n" \
         "-A INPUT -s 192.0.2.1 -j ACCEPT\nCOMMIT\n"
    v6 = "# Generated by ip6tables-save v1.8.9\n*filter\n:INPUT ACCEPT [0:0]\n" \
         "-A INPUT -p tcp -j DROP\nCOMMIT\n"
    ruleset = parse_ruleset(v4 + v6, "both")
    assert [(t.key, t.family) for t in ruleset.tables] == [
        ("filter", ir.Family.IPV4), ("ip6 filter", ir.Family.IPV6)]
    assert ruleset.table("ip6 filter").chain("INPUT").rules[0].origin.line == 9
    assert [f for f, _text in xtables_sections(save(ruleset))] == [ir.Family.IPV4,
                                                                   ir.Family.IPV6]
    assert _words(save(parse_ruleset(save(ruleset)))) == _words(save(ruleset))
    with pytest.raises(InputError) as caught:
        parse_ruleset(v4 + v6.replace("-p tcp", "-p tcp --bogus"), "both")
    assert caught.value.line == 9


def test_files_combined_keep_their_family():
    """A .v6 file says it is IPv6 by its name alone: combined, it gets the header."""
    text, source = combine([("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", "a.v4"),
                            ("*filter\n:INPUT DROP [0:0]\nCOMMIT\n", "b.v6")])
    assert source == "a.v4 + b.v6"
    assert [t.family for t in parse_ruleset(text, source).tables] == [ir.Family.IPV4,
                                                                      ir.Family.IPV6]


def test_too_many_rules_that_stay_code_are_refused(tmp_path):
    """More functions than the kernel verifies (IPv6 rules that neither fold nor become
    classifier data): exit 2 naming the chain, before clang."""
    rules = "".join(f"-A INPUT -s 2001:db8::{i:x}/128 -p tcp -m tcp --dport {i % 900 + 1} "
                    "-j DROP\n" for i in range(7400))
    path = tmp_path / "big.v6"
    path.write_text("*filter\n:INPUT ACCEPT [0:0]\n" + rules + "COMMIT\n")
    result = CliRunner().invoke(main, ["compile", str(path), "--emit", "c", "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "too many rules stay code" in " ".join(result.output.split())
