"""bench/ still runs end to end (tiny sizes, short bursts). Speed is not asserted here:
bench/ measures it, these machines are too noisy for timed tests."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bench.__main__ import main
from bench.contenders import RULESETS, contenders
from examples.make_acl import acl
from bpfilter.frontend import parse_ruleset


def test_bench_measures_every_contender(kernel, tmp_path):
    result = CliRunner().invoke(main, ["--sizes", "1,10", "--seconds", "0.05",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (report,) = tmp_path.glob("throughput-*.json")
    data = json.loads(report.read_text())
    assert set(data["results"]) == set(RULESETS)
    for ruleset, results in data["results"].items():
        assert set(results) == set(contenders(ruleset))
        for name, rows in results.items():
            assert all(rows[n]["mpps"] > 0 for n in ("1", "10")), (ruleset, name)
            assert all(rows[n]["verdict"] == "ok" for n in ("1", "10")), (ruleset, name)
        assert results["bpfilter XDP"]["10"]["ns_per_packet"] > 0


def test_mixed_ruleset_is_what_it_says(namespace, tmp_path):
    ruleset = parse_ruleset(RULESETS["mixed"](200), "mixed")
    table = ruleset.table("filter")
    assert sum(len(chain.rules) for chain in table.chains) == 201  # N, then the match
    assert table.chain("INPUT").rules[-1].target.verdict.value == "DROP"
    assert len([c for c in table.chains if not c.builtin]) >= 1
    # The bench packet walks every rule and meets the last one: nothing earlier matches.
    from scapy.layers.l2 import Ether

    from bench.__main__ import PACKET
    from bpfilter.compiler import compile_ruleset
    from bpfilter.runtime.runner import LoadedRuleset

    from bpfilter.testbed import netns

    host = namespace("bpft-bench")
    netns.run("ip", "route", "add", "local", "198.18.0.0/15", "dev", "lo", netns=host)
    compilation = compile_ruleset(RULESETS["mixed"](200), "mixed", tmp_path, verify=False)
    with netns.entered(host), LoadedRuleset(compilation) as loaded:
        program = loaded.program()
        program.test_run(bytes(Ether() / PACKET), ingress_ifindex=1)
        hits = [key for key in compilation.slots if loaded.counters(*key).packets]
    assert hits == [("filter", "INPUT", len(table.chain("INPUT").rules) - 1)], hits


def test_bench_refuses_throughput_that_a_wrong_rule_gave(kernel, tmp_path, monkeypatch):
    """A rule ahead of the deciding one takes the packet (same verdict: DROP): the
    contenders' counters show it, the run prints no figure for them and exits 1."""
    def shadowed(n: int) -> str:
        return acl(n).replace("-A INPUT ", "-A INPUT -p udp -m udp --dport 9 -j DROP\n"
                              "-A INPUT ", 1)
    monkeypatch.setitem(RULESETS, "acl", shadowed)
    result = CliRunner().invoke(main, ["--sizes", "10", "--seconds", "0.05", "--ruleset",
                                       "acl", "--only", "bpfilter XDP", "--only",
                                       "iptables-legacy", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    (report,) = tmp_path.glob("throughput-*.json")
    rows = json.loads(report.read_text())["results"]["acl"]
    for name in ("bpfilter XDP", "iptables-legacy"):
        assert rows[name]["10"]["verdict"].startswith("the deciding rule counted 0 of"), name
    assert "wrong verdict: acl, N=10, bpfilter XDP" in result.output
