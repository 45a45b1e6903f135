"""Fuzzing both front-ends with the kernel's own tools as the second opinion.

Rules from the examples and from iptables' own test suite (tests/peer_suites.py) are
mutated (words dropped, doubled, swapped, replaced by edge numbers, options inserted,
blanks and characters iptables does not treat as blanks slipped in) and read by bpfilter:
every input must end in a ruleset or an InputError (exit 0 or a clear exit 2), never
another exception. What bpfilter accepts is then loaded into the kernel by
iptables-legacy-restore or checked by `nft -c` in a scratch namespace: accepting what the
kernel refuses is a defect (a rule the kernel would refuse means something else to
bpfilter, or nothing). Refusing what the kernel takes is a gap, listed by issue 17, not a
failure here.

The peer suite lines come with the iptables source .ci/setup fetches; the counts are the
suite's budget (FUZZ_CASES, about 20 s)."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfilter.errors import InputError
from bpfilter.frontend import parse_ruleset, rule_text
from bpfilter.passes import validate
from bpfilter.testbed import netns
from tests.conftest import EXAMPLES, REQUIRE_KERNEL
from tests.peer_suites import cases, suite_dir

FUZZ_CASES = int(os.environ.get("BPFILTER_FUZZ_CASES", "2500"))
NFT_FUZZ_CASES = FUZZ_CASES // 2

NUMBERS = ["0", "1", "7", "22", "255", "256", "65535", "65536", "-1", "08", "010", "0x10",
           "0x", "+5", "\uff18", "1:0", "0:", ":5", "5:3", "4294967295", "4294967296",
           "1/sec", "0/sec", "99999/day", "1.2.3.4", "1.2.3.4/33", "::1", "::/129", ""]
WORDS = ["!", "-p", "tcp", "udp", "icmp", "ipv6-icmp", "all", "-m", "conntrack", "state",
         "--dport", "--sport", "--dports", "multiport", "--ctstate", "NEW", "INVALID", "-j",
         "ACCEPT", "DROP", "REJECT", "RETURN", "LOG", "MARK", "--set-mark", "--reject-with",
         "tcp-reset", "icmp-port-unreachable", "-i", "-o", "eth0", "eth+", "+", "-s", "-d",
         "10.0.0.0/8", "--syn", "--tcp-flags", "SYN,ACK", "ALL", "NONE", "--comment",
         '"a b"', '""', "--log-prefix", "--limit", "--limit-burst", "-f", "--mark",
         "--icmp-type", "echo-request", "--length", "--ttl-eq", "-g"]
# What iptables-restore does not split words at, and what it does.
CHARACTERS = ["\v", "\f", "\xa0", "\u2028", "\x85", "\r", "\xe9", '"', "\\", "\t", " ", "#"]
NFT_WORDS = ["ip", "ip6", "saddr", "daddr", "tcp", "udp", "dport", "sport", "flags", "&",
             "!=", "==", "!", "{", "}", ",", "-", "accept", "drop", "reject", "with",
             "reset", "icmp", "type", "meta", "l4proto", "nfproto", "ipv4", "ipv6",
             "protocol", "ct", "state", "new", "established", "vmap", ":", "counter",
             "limit", "rate", "log", "prefix", "iifname", '"eth0"', "mark", "set",
             "jump", "return", "syn", "ack", "fin", "|", "(", ")", "th", "icmpx"]


def _iptables_seeds() -> list[tuple[int, str]]:
    seeds = []
    for path in sorted(EXAMPLES.glob("*.v[46]")):
        family = 6 if path.suffix == ".v6" else 4
        seeds += [(family, line.split(" ", 2)[2]) for line in path.read_text().split("\n")
                  if line.startswith("-A ") and line.count(" ") >= 2]
    directory = suite_dir()
    if directory is not None:
        seeds += sorted({(c.family, c.rule) for c in cases(directory)
                         if c.table == "filter"})
    return seeds


def _nft_seeds() -> list[str]:
    rules = []
    for path in sorted(EXAMPLES.glob("*.nft")):
        for line in path.read_text().split("\n"):
            text = line.strip()
            if text and not text.startswith(("#", "table", "chain", "type", "set", "map",
                                             "elements", "}", "policy", "flags",
                                             "define")) and "@" not in text:
                rules.append(text)
    return rules


@st.composite
def _mutated(draw, words: list[str], vocabulary: list[str]) -> str:
    words = list(words)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "double", "pair", "negate", "swap", "number",
                                     "insert", "character", "case"]))
        at = draw(st.integers(0, max(0, len(words) - 1)))
        if kind == "drop" and words:
            del words[at]
        elif kind == "double" and words:
            words.insert(at, words[at])
        elif kind == "pair" and len(words) > 1:  # an option again, with its argument
            at = min(at, len(words) - 2)
            words[at:at] = words[at:at + 2]
        elif kind == "negate":  # before a value: a number, an address, a name
            values = [i for i, w in enumerate(words) if re.match(r"[\w.:]", w)] or [at]
            words.insert(draw(st.sampled_from(values)), "!")
        elif kind == "swap" and len(words) > 1:
            at = min(at, len(words) - 2)
            words[at], words[at + 1] = words[at + 1], words[at]
        elif kind == "number":
            numbered = [i for i, w in enumerate(words) if re.search(r"\d", w)] or [at]
            words[draw(st.sampled_from(numbered)) if words else 0:][:1] = [
                draw(st.sampled_from(NUMBERS))]
        elif kind == "insert":
            words.insert(at, draw(st.sampled_from(vocabulary)))
        elif kind == "character" and words:
            word = words[at]
            cut = draw(st.integers(0, len(word)))
            words[at] = word[:cut] + draw(st.sampled_from(CHARACTERS)) + word[cut:]
        elif kind == "case" and words:
            words[at] = words[at].swapcase()
    return " ".join(words)


def _read(text: str) -> bool:
    """bpfilter's answer: accepted (True), refused with a clear error (False)."""
    try:
        validate(parse_ruleset(text, "<fuzz>"))
    except InputError:
        return False
    return True  # any other exception fails the test, with the input shown


@pytest.fixture(scope="module")
def scratch(request):
    from tests.conftest import need_kernel

    need_kernel()
    name = netns.create(netns.unique_name("bpft-fuzz"))
    yield name
    netns.delete(name)


def _ruleset(family: int, rule: str) -> str:
    header = "# Generated by ip6tables-save\n" if family == 6 else ""
    return (f"{header}*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
            f":OUTPUT ACCEPT [0:0]\n-A INPUT {rule}\nCOMMIT\n")


def test_peer_suite_is_present():
    """CI fetches iptables' suite (.ci/setup); elsewhere the fuzz runs on the examples."""
    if suite_dir() is None and REQUIRE_KERNEL:
        pytest.fail("iptables' extensions/*.t are missing: .ci/setup fetches them "
                    "(apt-get source iptables)")


def test_iptables_suite_fail_lines_are_refused():
    """Every rule iptables' own suite says the kernel (or iptables) refuses."""
    directory = suite_dir()
    if directory is None:
        pytest.skip("no iptables suite (.ci/setup fetches it)")
    accepted = [f"{c.file}:{c.number} (IPv{c.family} {c.table} {c.chain}) {c.rule}"
                for c in cases(directory) if not c.ok and _read(c.ruleset())]
    assert not accepted, "\n".join(accepted)


# The suite's files whose every OK line bpfilter reads (issue 17 widens this list).
WHOLE_FILES = {
    "iptables.t", "libip6t_LOG.t", "libip6t_hl.t", "libip6t_icmp6.t", "libip6t_rt.t",
    "libip6t_standard.t", "libipt_DNAT.t", "libipt_LOG.t", "libipt_MASQUERADE.t",
    "libipt_REJECT.t", "libipt_SNAT.t", "libipt_icmp.t", "libipt_ttl.t", "libxt_CHECKSUM.t",
    "libxt_CONNMARK.t", "libxt_MARK.t", "libxt_NOTRACK.t", "libxt_comment.t",
    "libxt_connmark.t", "libxt_length.t", "libxt_limit.t", "libxt_mac.t", "libxt_recent.t",
    "libxt_state.t", "libxt_tos.t", "libxt_dscp.t", "libxt_ecn.t", "libxt_esp.t",
    "libxt_NFLOG.t",
    "libxt_statistic.t", "libxt_tcp.t", "libxt_udp.t"}


def test_iptables_suite_ok_lines_print_back():
    """Every OK line bpfilter reads prints back as the suite says iptables-save prints it
    (the same rule, as iptables understands it), and every OK line of WHOLE_FILES is read."""
    directory = suite_dir()
    if directory is None:
        pytest.skip("no iptables suite (.ci/setup fetches it)")
    wrong, missing = [], []
    for case in (c for c in cases(directory) if c.ok):
        if case.family == 6 and re.search(r"\d+\.\d+\.\d+\.\d+", case.rule):
            continue  # written for iptables: ip6tables refuses an IPv4 address
        where = f"{case.file}:{case.number} (IPv{case.family} {case.chain}) {case.rule}"
        try:
            ruleset = validate(parse_ruleset(case.ruleset(), "<suite>"))
        except InputError:
            if case.file in WHOLE_FILES:
                missing.append(where)
            continue
        ((table, chain, rule),) = list(ruleset.rules())
        printed = rule_text(chain.name, rule, table.family).removeprefix(f"-A {chain.name} ")
        expected = case.expected
        if case.family == 6:  # the suite writes iptables' mask; ip6tables prints its own
            expected = expected.replace("--mask 255.255.255.255", "--mask " + ":".join(
                ["ffff"] * 8))
        if printed != expected:
            wrong.append(f"{where}: printed {printed!r}, iptables-save {expected!r}")
    assert not wrong and not missing, "\n".join(wrong + missing)


SEEDS = _iptables_seeds()


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_iptables_front_end_fuzz(scratch, data):
    family, seed = data.draw(st.sampled_from(SEEDS), label="seed")
    rule = data.draw(_mutated(seed.split(" "), WORDS), label="rule")
    text = _ruleset(family, rule)
    if not _read(text):
        return
    restore = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
    kernel = netns.run(restore, netns=scratch, input=text, check=False)
    assert kernel.returncode == 0, (f"bpfilter accepts what {restore} refuses: {rule!r}\n"
                                    f"{kernel.stderr.strip()}")


NFT_SEEDS = _nft_seeds()


@settings(max_examples=NFT_FUZZ_CASES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_nft_front_end_fuzz(scratch, data):
    seed = data.draw(st.sampled_from(NFT_SEEDS), label="seed")
    rule = data.draw(_mutated(seed.split(" "), NFT_WORDS), label="rule")
    family = data.draw(st.sampled_from(["inet", "ip"]), label="family")
    text = (f"table {family} fuzz {{\n  chain c {{\n    type filter hook input priority 0; "
            f"policy accept;\n    {rule}\n  }}\n}}\n")
    if not _read(text):
        return
    kernel = netns.run("nft", "-c", "-f", "-", netns=scratch, input=text, check=False)
    assert kernel.returncode == 0, (f"bpfilter accepts what nft refuses: {rule!r}\n"
                                    f"{kernel.stderr.strip()}")
