"""Bad input gets a clear error and exit 2, never a traceback; what the kernel refuses is
refused; what it takes is read the way it reads it. Each case here was accepted, read
differently, or crashed before (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bpfilter.cli import main
from bpfilter.testbed import netns

FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{}\nCOMMIT\n"
NAT = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
       ":POSTROUTING ACCEPT [0:0]\n{}\nCOMMIT\n")


def _nft(rule: str, family: str = "inet") -> bytes:
    return (f"table {family} t {{\n chain c {{\n  type filter hook input priority 0; "
            f"policy accept;\n  {rule}\n }}\n}}\n").encode()


def _compile(tmp_path, data: bytes, *extra: str, name: str = "rules.v4"):
    path = tmp_path / name
    path.write_bytes(data)
    return CliRunner().invoke(main, ["compile", str(path), "--emit", "c", "-o",
                                     str(tmp_path / "out"), *extra])


REFUSED = {
    # iptables-restore splits on spaces and tabs only, and refuses CRLF
    "crlf": FILTER.format("-A INPUT -p tcp -j ACCEPT").replace("\n", "\r\n").encode(),
    "vertical tab": FILTER.format("-A INPUT -p tcp\v--dport 22 -j ACCEPT").encode(),
    "form feed": FILTER.format("-A INPUT -p tcp\f--dport 22 -j ACCEPT").encode(),
    "next line": FILTER.format("-A INPUT -p tcp\x85--dport 22 -j ACCEPT").encode(),
    "line separator": FILTER.format("-A INPUT -p tcp --dport 22 -j ACCEPT\u2028").encode(),
    "no-break space": FILTER.format("-A INPUT -p tcp\xa0--dport 22 -j ACCEPT").encode(),
    "full-width digits": FILTER.format("-A INPUT -p tcp --dport \uff18\uff10").encode(),
    "reversed tcp ports": FILTER.format("-A INPUT -p tcp --sport 4:3").encode(),
    "reversed multiport": FILTER.format("-A INPUT -p tcp -m multiport --dports 5:1").encode(),
    # udp takes it and matches nothing: bpfilter once swapped it into 5-10
    "reversed udp ports": FILTER.format("-A INPUT -p udp --dport 10:5").encode(),
    "-p twice": FILTER.format("-A INPUT -p tcp -p udp -j ACCEPT").encode(),
    "-o in INPUT": FILTER.format("-A INPUT -o lo -j ACCEPT").encode(),
    # iptables compares level names with strcmp, and knows neither err nor warn
    "an upper-case log level": FILTER.format("-A INPUT -j LOG --log-level ALERT").encode(),
    "log level err": FILTER.format("-A INPUT -j LOG --log-level err").encode(),
    "--ctproto Tcp": FILTER.format("-A INPUT -m conntrack --ctproto Tcp").encode(),
    # addrtype's checkentry refuses it at every hook whose chains reach the rule
    "--limit-iface-out reached from INPUT": (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":C - [0:0]\n-A FORWARD -j C\n-A INPUT -j C\n"
        "-A C -m addrtype --dst-type LOCAL --limit-iface-out\nCOMMIT\n").encode(),
    "addrtype prefix of nothing": FILTER.format("-A INPUT -m addrtype --src-type LOCALS")
    .encode(),
    # the nat table: what libxt_NAT and the kernel refuse
    "DROP in nat": NAT.format("-A PREROUTING -j DROP").encode(),
    "DNAT port without a protocol": NAT.format(
        "-A PREROUTING -j DNAT --to-destination 1.2.3.4:80").encode(),
    "DNAT port 65536": NAT.format(
        "-A PREROUTING -p tcp -j DNAT --to-destination 1.2.3.4:65536").encode(),
    "--to-destination twice": NAT.format(
        "-A PREROUTING -j DNAT --to-destination 1.2.3.4 --to-destination 1.2.3.5").encode(),
    "DNAT without --to-destination": NAT.format("-A PREROUTING -j DNAT").encode(),
    "DNAT at INPUT": NAT.format("-A INPUT -j DNAT --to-destination 1.2.3.4").encode(),
    "DNAT in filter": FILTER.format("-A INPUT -j DNAT --to-destination 1.2.3.4").encode(),
    "DNAT to a host name": NAT.format(
        "-A PREROUTING -p tcp -j DNAT --to-destination host.example:80").encode(),
    "DNAT to a prefix": NAT.format(
        "-A PREROUTING -j DNAT --to-destination 1.2.3.4/24").encode(),
    "DNAT to an octal port": NAT.format(
        "-A PREROUTING -p tcp -j DNAT --to-destination 1.2.3.4:080").encode(),
    "SNAT without --to-source": NAT.format("-A POSTROUTING -j SNAT").encode(),
    "SNAT port range without a protocol": NAT.format(
        "-A POSTROUTING -j SNAT --to-source 1.1.1.1:1025-65535").encode(),
    "SNAT port 65536": NAT.format(
        "-A POSTROUTING -p tcp -j SNAT --to-source 1.1.1.1:1025-65536").encode(),
    "--to-source twice": NAT.format(
        "-A POSTROUTING -j SNAT --to-source 1.1.1.1 --to-source 2.2.2.2").encode(),
    "SNAT at PREROUTING": NAT.format("-A PREROUTING -j SNAT --to-source 1.1.1.1").encode(),
    "DNAT at POSTROUTING": NAT.format(
        "-A POSTROUTING -j DNAT --to-destination 1.1.1.1").encode(),
    "MASQUERADE at PREROUTING": NAT.format("-A PREROUTING -j MASQUERADE").encode(),
    "MASQUERADE in filter": FILTER.format("-A FORWARD -j MASQUERADE").encode(),
    "MASQUERADE port 65536": NAT.format(
        "-A POSTROUTING -p udp -j MASQUERADE --to-ports 1024-65536").encode(),
    "MASQUERADE port -1": NAT.format(
        "-A POSTROUTING -p udp -j MASQUERADE --to-ports -1").encode(),
    "SNAT port range reversed": NAT.format(
        "-A POSTROUTING -p tcp -j SNAT --to-source 1.1.1.1:1025-0x400").encode(),
    "CHECKSUM without --checksum-fill": ("*mangle\n:POSTROUTING ACCEPT [0:0]\n"
                                         "-A POSTROUTING -j CHECKSUM\nCOMMIT\n").encode(),
    "CHECKSUM in filter": FILTER.format("-A OUTPUT -j CHECKSUM --checksum-fill").encode(),
    "MASQUERADE ports without a protocol": NAT.format(
        "-A POSTROUTING -j MASQUERADE --to-ports 1024").encode(),
    "REDIRECT at POSTROUTING": NAT.format("-A POSTROUTING -j REDIRECT").encode(),
    "REDIRECT in filter": FILTER.format("-A INPUT -p tcp -j REDIRECT --to-ports 80").encode(),
    "REDIRECT port without a protocol": NAT.format(
        "-A PREROUTING -j REDIRECT --to-ports 3128").encode(),
    "REDIRECT to an address": NAT.format(
        "-A PREROUTING -p tcp -j REDIRECT --to-ports 1.2.3.4:80").encode(),
    "DNAT to a range of names": NAT.format(
        "-A PREROUTING -p tcp -j DNAT --to-destination 1.1.1.1:echo-ssh").encode(),
    "REDIRECT to a number-name range": NAT.format(
        "-A PREROUTING -p tcp -j REDIRECT --to-ports 10-ssh").encode(),
    "REDIRECT --random-fully": NAT.format(
        "-A PREROUTING -p tcp -j REDIRECT --random-fully").encode(),
    "REDIRECT port shift": NAT.format(
        "-A PREROUTING -p tcp -j REDIRECT --to-ports 42-1234/567").encode(),
    "DNAT shift without a range": NAT.format(
        "-A PREROUTING -p tcp -j DNAT --to-destination 1.1.1.1:1000/5").encode(),
    "DNAT shift base 0": NAT.format(
        "-A PREROUTING -p tcp -j DNAT --to-destination 1.1.1.1:1000-2000/0").encode(),
    "SNAT range with a bad end": NAT.format(
        "-A POSTROUTING -j SNAT --to-source 1.1.1.1-1.1.1.").encode(),
    # libxt_statistic's refusals (its own .t file's FAIL lines among them)
    **{f"statistic {options}": FILTER.format(f"-A INPUT -m statistic {options}").encode()
       for options in ("", "--mode random ! --probability 1.1", "--probability 1",
                       "--mode nth ! --every 5", "--mode nth ! --every 5 --packet 5",
                       "--mode random --every 3", "--mode nth --every 0 --packet 0",
                       "--mode often",
                       "--mode random --probability 0.5 --every 2 --packet 0",
                       "--mode nth --every 2 ! --packet 1")},
    # (the nat checks once read the chains a jump reaches before the jump was checked)
    "nat jump to an undeclared chain": NAT.format("-A PREROUTING -j NOPE").encode(),
    "chains nested 1,200 deep": ("*filter\n:INPUT ACCEPT [0:0]\n" + "".join(
        f":C{i} - [0:0]\n" for i in range(1200)) + "-A INPUT -j C0\n" + "".join(
        f"-A C{i} -j C{i + 1}\n" for i in range(1199)) + "COMMIT\n").encode(),
    "a loop of 3,000 chains": ("*filter\n:INPUT ACCEPT [0:0]\n" + "".join(
        f":C{i} - [0:0]\n" for i in range(3000)) + "-A INPUT -j C0\n" + "".join(
        f"-A C{i} -j C{(i + 1) % 3000}\n" for i in range(3000)) + "COMMIT\n").encode(),
}
NFT_REFUSED = {
    "negation with a mask": _nft("tcp flags & (fin|syn|rst|ack) ! syn accept"),
    "negation of a port": _nft("tcp dport ! 25 accept"),
    "tcp reset after udp": _nft("meta l4proto udp reject with tcp reset"),
    "protocol 256": _nft("ip protocol 256 accept", "ip"),
    "overlapping vmap": _nft("tcp dport vmap { 1-10 : accept, 5-20 : drop }"),
    "elements without commas": _nft("tcp dport { 443 80 } accept"),
    "a keyword as interface": _nft("iifname accept"),
    "icmpx in an ip table": _nft("reject with icmpx type admin-prohibited", "ip"),
    "l4proto without meta": _nft("l4proto tcp accept"),
    "a list on ports": _nft("tcp dport 22, 80 accept"),
    "a map in a set": _nft("tcp dport { 22 : accept } accept"),
    "upper case": _nft("meta protocol IP accept"),
    "an empty set": _nft("udp dport { } accept"),
    "crlf": _nft("tcp dport 22 accept").replace(b"\n", b"\r\n"),
    "nesting 2,000 deep": _nft("ip saddr " + "{ " * 2000 + "1.2.3.4" + " }" * 2000 + " accept"),
    "dnat in a filter chain": _nft("tcp dport 80 dnat to 1.2.3.4", "ip"),
    "ct status assured": _nft("ct status assured accept"),
    "numgen mod 0": _nft("numgen random mod 0 0 drop"),
    "comment keyword": _nft('comment comment comment "x"'),
    "two comments": _nft('accept comment "a" comment "b"'),
    "numgen offset overflow": _nft("numgen random mod 2 offset 4294967295 5 drop"),
    "numgen foo": _nft("numgen foo mod 2 0 drop"),
    "ct status negated": _nft("ct status != dnat accept"),
    "snat in a filter chain": _nft("snat to 1.2.3.4", "ip"),
    "masquerade at prerouting": (
        b"table ip t {\n chain c {\n  type nat hook prerouting priority dstnat; policy accept;"
        b"\n  masquerade\n }\n}\n"),
    "snat to a port without a protocol": (
        b"table ip t {\n chain c {\n  type nat hook postrouting priority srcnat; policy "
        b"accept;\n  snat to 1.2.3.4:80-90\n }\n}\n"),
    "dnat to a reversed range": (
        b"table ip t {\n chain c {\n  type nat hook prerouting priority dstnat; policy accept;"
        b"\n  dnat to 10.0.0.9-10.0.0.1\n }\n}\n"),
    "dnat to a port without a protocol": (
        b"table ip t {\n chain c {\n  type nat hook prerouting priority dstnat; policy accept;"
        b"\n  dnat to 1.2.3.4:80\n }\n}\n"),
}
JSON_REFUSED = {
    "nesting 3,000 deep": b'{"nftables": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    "an integer of 5,000 digits": b'{"nftables": [{"table": {"family": "ip", "name": "t", '
                                  b'"handle": ' + b"9" * 5000 + b"}}]}",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_iptables_input_the_kernel_refuses_is_refused(tmp_path, name):
    result = _compile(tmp_path, REFUSED[name])
    assert result.exit_code == 2, (name, result.output, result.exception)


@pytest.mark.parametrize("name", sorted(NFT_REFUSED))
def test_nft_input_the_kernel_refuses_is_refused(tmp_path, name):
    result = _compile(tmp_path, NFT_REFUSED[name], name="rules.nft")
    assert result.exit_code == 2, (name, result.output, result.exception)


@pytest.mark.parametrize("name", sorted(JSON_REFUSED))
def test_json_beyond_what_python_reads_is_a_clear_error(tmp_path, name):
    result = _compile(tmp_path, JSON_REFUSED[name], name="rules.json")
    assert result.exit_code == 2 and "not a JSON ruleset" in result.output, result.output


def test_a_latin1_comment_is_read_and_written_back_byte_for_byte(tmp_path):
    rules = FILTER.format('-A INPUT -m comment --comment "caf\xe9" -j ACCEPT').encode("latin-1")
    path = tmp_path / "latin1.v4"
    path.write_bytes(rules)
    result = subprocess.run([sys.executable, "-m", "bpfilter", "translate", str(path), "--to",
                             "iptables"], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert b'--comment "caf\xe9"' in result.stdout


@pytest.mark.parametrize("spelling,means", [
    ("-p tcp -m tcp --dport 026", "--dport 22"), ("-p tcp -m tcp --dport 0x16", "--dport 22"),
    ("-p udp -m udp --dport 026", "--dport 26"), ("-m length --length 010", "--length 8"),
    ("-m ttl --ttl-eq 010", "--ttl-eq 8"), ("-p 010", "-p egp"),
    ("-m mark --mark 010", "--mark 0x8"), ("-m limit --limit 010/sec", "--limit 10/sec"),
    ("-p tcp -m multiport --dports 010,0x10", "--dports 8,16"),
    ("-m tcp --dport 1 -p tcp", "-p tcp -m tcp --dport 1"),
    ("-m conntrack --ctproto TCP", "--ctproto 6"),
    ("-j LOG --log-level panic", "--log-level 0"), ("-j LOG --log-level 0x3", "--log-level 3"),
    ("-m addrtype --src-type loc,U", "--src-type UNSPEC,LOCAL"),
    ("-m addrtype ! --dst-type b --limit-iface-in", "! --dst-type BROADCAST --limit-iface-in"),
    ("-p tcp -j DNAT --to-destination 1.2.3.4:0x50", "--to-destination 1.2.3.4:80"),
    ("-p tcp -j DNAT --to-destination 1.2.3.4:ssh", "--to-destination 1.2.3.4:22"),
    ("-p udp -j DNAT --to-destination 1.2.3.4-1.2.3.4:53-53", "--to-destination 1.2.3.4:53"),
    ("-p tcp -j DNAT --to-destination :80 --persistent --random",
     "--to-destination :80 --random --persistent"),
    ("-p tcp -j SNAT --to-source 1.1.1.1:0x400-1025 --persistent --random-fully --random",
     "--to-source 1.1.1.1:1024-1025 --random --random-fully --persistent"),
    ("-p udp -j SNAT --to-source 1.1.1.1-1.1.1.1:53-53", "--to-source 1.1.1.1:53"),
    ("-j MASQUERADE --random-fully", "-j MASQUERADE --random-fully"),
    ("-p tcp -j MASQUERADE --to-ports 1024-1024", "--to-ports 1024"),
    ("-m conntrack --ctstate dnat,NEW,SNAT", "--ctstate NEW,SNAT,DNAT"),
    ("-p tcp -j REDIRECT --random --to-ports 0x50", "-j REDIRECT --to-ports 80 --random"),
    ("-p udp -j REDIRECT --to-ports 53-53", "-j REDIRECT --to-ports 53"),
    ("-p tcp -j REDIRECT --to-ports 42-1234 --random", "--to-ports 42-1234 --random"),
    ("-p tcp -j DNAT --to-destination 1.2.3.4:80-0x51", "--to-destination 1.2.3.4:80-81"),
    ("-m statistic --mode random --probability 0.3333", "--probability 0.33330000006"),
    ("-m statistic --mode random ! --probability 1e-3", "! --probability 0.00100000016"),
    ("-m statistic --probability 0.99999999999 --mode random", "--probability 1.00000000000"),
    ("-m statistic --mode nth --every 5 --packet 0", "--every 5 --packet 0"),
    ("-m statistic --mode random --probability nan", "--probability 0.00000000000"),
    ("-m statistic --mode random --probability 0x1p-2", "--probability 0.25000000000"),
    ("-m statistic --mode nth --packet 2 ! --every 3", "! --every 3 --packet 2")])
def test_numbers_and_orders_mean_what_they_mean_to_the_kernel(namespace, tmp_path, spelling,
                                                              means):
    """The kernel's iptables-save of the rule and bpfilter's say the same (octal and hex
    where iptables reads C numbers, decimal where it does not; -m before -p)."""
    chain = "PREROUTING" if "DNAT" in spelling or "REDIRECT" in spelling else "POSTROUTING" if "-j SNAT" in spelling \
        or "MASQUERADE" in spelling else "INPUT"
    target = "" if " -j " in f" {spelling}" else " -j ACCEPT"
    text = (FILTER if chain == "INPUT" else NAT).format(f"-A {chain} {spelling}{target}")
    scratch = namespace("bpft-num")
    netns.run("iptables-legacy-restore", netns=scratch, input=text)
    table = () if chain == "INPUT" else ("-t", "nat")
    kernel = [line for line in netns.run("iptables-legacy-save", *table, netns=scratch).stdout
              .split("\n") if line.startswith(f"-A {chain}")]
    path = tmp_path / "n.v4"
    path.write_text(text)
    ours = CliRunner().invoke(main, ["translate", str(path), "--to", "iptables"])
    assert ours.exit_code == 0, ours.output
    assert kernel == [line for line in ours.output.split("\n")
                      if line.startswith(f"-A {chain}")]
    assert means in kernel[0]


def test_an_error_on_a_huge_line_quotes_a_window_of_it(tmp_path):
    result = _compile(tmp_path, FILTER.format(
        "-A INPUT -m comment --comment " + "x" * 1_000_000 + " -j BOGUS").encode())
    assert result.exit_code == 2 and len(result.output) < 2000, len(result.output)


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    path = tmp_path / "r.v4"
    path.write_text(FILTER.format("-A INPUT -j ACCEPT"))
    result = CliRunner().invoke(main, ["compile", str(path), "--emit", "c", "-o",
                                       "/proc/no/such/folder"])
    assert result.exit_code == 1 and "cannot write" in result.output, result.output


@pytest.mark.parametrize("command", [["status"], ["list"], ["save"], ["conntrack"],
                                     ["log", "-n", "1"], ["gc"], ["detach", "-i", "lo"],
                                     ["apply", "x.v4", "-i", "lo"], ["compile", "x.v4"]])
def test_without_root_commands_say_they_need_it(kernel, command):
    result = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all",
                             sys.executable, "-m", "bpfilter", *command],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "needs root (CAP_BPF and CAP_NET_ADMIN" in \
        result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", [
    FILTER.format("-A INPUT -m hashlimit --hashlimit-upto 5/sec --hashlimit-name h -j DROP\n"
                  "-A INPUT -j ACCEPT"),
    FILTER.format("-A INPUT -p tcp -m set --match-set x src -j DROP\n-A INPUT -j ACCEPT")])
def test_ignore_unsupported_skips_rules_of_unknown_modules(tmp_path, text):
    result = _compile(tmp_path, text.encode(), "--ignore-unsupported")
    assert result.exit_code == 0, result.output
    assert "skipped:" in result.output and "differs from the input ruleset" in result.output
    result = _compile(tmp_path, text.encode(), "--ignore-unsupported", "--json")
    summary = json.loads(result.output[result.output.index("{"):])
    assert len(summary["skipped"]) == 1 and summary["chains"][0]["rules_compiled"] == 1
