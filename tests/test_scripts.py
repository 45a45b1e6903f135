"""Output for scripts: piped, nothing is cut with "…" or wrapped; --json on status, list,
save, conntrack, log and compile parses and holds the documented keys (README: JSON
output). Each command runs as a user runs it: its own process, its stdout a pipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP

from bpfilter.testbed import SERVER_ADDR, VethBed

# A long comment and a long source path: what 80 columns used to cut or wrap.
COMMENT = "this rule accepts ssh from the network of the administrators, as a long comment says"
RULES = f"""*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p udp -m udp --dport 9 -j LOG --log-prefix "udp9 "
-A INPUT -p udp -m udp --dport 7 -j ACCEPT
-A INPUT -s 192.0.2.0/24 -p tcp -m tcp --dport 22 -m comment --comment "{COMMENT}" -j ACCEPT
COMMIT
"""


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    from tests.conftest import need_kernel

    need_kernel()
    root = tmp_path_factory.mktemp("scripts")
    rules = root / ("a-directory-whose-name-is-long-enough-to-push-the-source-column-past-"
                    "eighty") / "rules.v4"
    rules.parent.mkdir()
    rules.write_text(RULES)
    with VethBed(root / "bed", prefix="bpfs") as bed:
        assert _run(bed, "apply", str(rules), "-i", "eth0").returncode == 0
        bed.send(bed.frame(IP(src="192.0.2.7", dst=SERVER_ADDR) / TCP(dport=22, flags="S")))
        bed.send(bed.frame(IP(src="192.0.2.7", dst=SERVER_ADDR) / UDP(dport=9)))
        bed.send(bed.frame(IP(src="192.0.2.7", dst=SERVER_ADDR) / UDP(sport=5000, dport=7)))
        bed.rules = rules
        try:
            yield bed
        finally:
            _run(bed, "detach", "-i", "eth0")


def _run(bed: VethBed, *args: str) -> subprocess.CompletedProcess:
    """stdout is a pipe here, as in a script; no COLUMNS given."""
    return subprocess.run(["ip", "netns", "exec", bed.server, sys.executable, "-m",
                           "bpfilter", *args], capture_output=True, text=True)


def test_piped_output_is_never_cut_or_wrapped(bed):
    for args in (["status"], ["list", "-v"], ["conntrack"], ["compile", str(bed.rules),
                                                             "-o", str(bed.rules.parent)]):
        out = _run(bed, *args)
        assert out.returncode == 0, (args, out.stderr)
        assert "…" not in out.stdout and "┃" not in out.stdout, (args, out.stdout)
    status = _run(bed, "status").stdout
    assert str(bed.rules) in status  # the whole source path, on its line
    listed = _run(bed, "list", "-v").stdout
    assert any(COMMENT in line and "--dport 22" in line for line in listed.split("\n"))


def test_json_of_every_command_parses(bed):
    status = json.loads(_run(bed, "status", "--json").stdout)
    assert status["ok"] and status["rulesets"][0]["iface"] == "eth0"
    assert {"prog_id", "egress_prog_id", "sha256", "state", "source"} <= set(
        status["rulesets"][0])
    assert status["watchers"][0]["following"]
    listed = json.loads(_run(bed, "list", "--json").stdout)
    chains = {c["chain"]: c for c in listed["rulesets"][0]["tables"][0]["chains"]}
    assert chains["INPUT"]["policy"] == "DROP"
    assert [r["packets"] for r in chains["INPUT"]["rules"]] == [0, 1, 1, 1]
    saved = json.loads(_run(bed, "save", "-c", "--json").stdout)
    assert saved["rulesets"][0]["format"] == "iptables-save"
    assert "[1:40] -A INPUT -s 192.0.2.0/24" in saved["rulesets"][0]["text"]
    conntrack = json.loads(_run(bed, "conntrack", "--json").stdout)
    assert conntrack["capacity"] > 0
    # (the SYN's connection, answered only by a RST, is gone at once, as in the kernel)
    assert [(c["proto"], c["sport"], c["dport"]) for c in conntrack["connections"]] == [
        ("udp", 5000, 7)]
    logged = [json.loads(line) for line in _run(bed, "log", "--json").stdout.splitlines()]
    assert [(e["prefix"], e["chain"], e["rule"]) for e in logged] == [("udp9 ", "INPUT", 2)]
    assert "DPT=9" in logged[0]["line"]
    compiled = json.loads(_run(bed, "compile", str(bed.rules), "-o",
                               str(Path(bed.rules.parent) / "out"), "--json").stdout)
    assert compiled["programs"][0]["program"] == "bf_ingress"
    assert compiled["chains"][0]["rules_compiled"] == 4 and compiled["skipped"] == []
