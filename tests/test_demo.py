"""End to end with real packets: the demo's veth pair, the ruleset applied in native XDP."""

from __future__ import annotations

from bpfilter.testbed import netns
from bpfilter.testbed.demo import host_firewall_probes, run_demo, verdict
from tests.conftest import EXAMPLES


def test_host_firewall_on_a_real_veth_pair(kernel, build_root):
    before = set(netns.run("ip", "netns", "list").stdout.split())
    result = run_demo(EXAMPLES / "host-firewall.v4", build_root / "demo",
                      host_firewall_probes(), lambda _msg: None)
    outcome = {obs.probe.what: (verdict(result.ruleset, obs.rules), obs.reply)
               for obs in result.observations}
    assert result.report.deployment.mode == "native"
    assert outcome["SSH from the admin network"][0] == "ACCEPT"
    assert outcome["SSH from elsewhere"] == ("REJECT (tcp-reset)", "TCP RST")
    assert outcome["UDP to a closed port"] == ("REJECT (icmp-port-unreachable)",
                                              "ICMP unreachable (code 3)")
    assert outcome["GRE"] == ("REJECT (icmp-proto-unreachable)", "ICMP unreachable (code 2)")
    assert outcome["ping"] == ("ACCEPT", "echo reply")
    for dropped in ("a NULL scan", "from the blocked range", "TTL 1", "oversized datagram"):
        assert outcome[dropped] == ("DROP", "nothing"), dropped
    assert sum(c.packets for c in result.counters.values()) >= len(host_firewall_probes())
    # The LOG before the REJECTs (5/min, burst 5) saw the TCP frames that reached it.
    assert result.logged and all(line.startswith("bpfilter reject: IN=eth0 OUT= ")
                                 and "PROTO=TCP" in line for line in result.logged)
    left = set(netns.run("ip", "netns", "list").stdout.split()) - before
    assert not [name for name in left if name.startswith("bpfd-")]  # the demo's own


def test_the_demo_on_an_nftables_ruleset(kernel, build_root):
    """The same frames through examples/host-firewall.nft: the deciding rules named in
    nft's words, across its two tables."""
    from bpfilter.testbed.demo import deciding, rule_label

    result = run_demo(EXAMPLES / "host-firewall.nft", build_root / "demo-nft",
                      host_firewall_probes(), lambda _msg: None)
    seen = {obs.probe.what: obs for obs in result.observations}
    assert verdict(result.ruleset, seen["SSH from the admin network"].rules) == "ACCEPT"
    blocked = seen["SSH from elsewhere"]  # 192.0.2.0/24 is the blocklist: log, then drop
    assert (verdict(result.ruleset, blocked.rules), blocked.reply) == ("DROP", "nothing")
    assert rule_label(result.ruleset, *deciding(result.ruleset, blocked.rules)) == \
        "counter drop"
    assert any(t == "early" for t, _c, _i in result.counters)
    assert any(line.startswith("blocked: IN=eth0 ") for line in result.logged)
