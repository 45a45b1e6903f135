"""apply / status / list / save / detach on a real veth, with real packets, and the
guarantee that a failed apply leaves the running ruleset untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from scapy.layers.inet import IP, TCP

from bpfilter.runtime import deploy, state
from bpfilter.testbed import netns, SERVER_ADDR, VethBed
from bpfilter.cli import main
from bpfilter.codegen import Attach
from bpfilter.errors import InputError, KernelError
from bpfilter.loader.links import Link
from bpfilter.loader.xdp import XdpMode
from tests.conftest import EXAMPLES

HOST = (EXAMPLES / "host-firewall.v4").read_text()
CHAINS = (EXAMPLES / "user-chains.v4").read_text()


@pytest.fixture
def bed(kernel, build_root):
    with VethBed(build_root / "bed", prefix="bpft") as bed:
        yield bed


def _ssh_from_elsewhere(bed: VethBed) -> list:
    return bed.send(bed.frame(IP(src="192.0.2.44", dst=SERVER_ADDR) / TCP(dport=22, flags="S")))


def _cli(bed: VethBed, *args: str) -> subprocess.CompletedProcess:
    """bpfilter in a new process inside the server namespace, as a user would run it."""
    return netns.run("env", "COLUMNS=200", sys.executable, "-m", "bpfilter", *args,
                     netns=bed.server, check=False)


@pytest.mark.parametrize("attach", list(Attach), ids=[a.value for a in Attach])
def test_apply_swap_and_detach_with_real_packets(bed, build_root, attach):
    with netns.entered(bed.server):
        first = deploy.apply(HOST, "host-firewall.v4", "eth0", build_root / "a1",
                             attach=attach)
    assert not first.replaced
    assert (first.deployment.mode == state.TC_MODE) == (attach is Attach.TC)
    delivered = bed.delivered()
    replies = _ssh_from_elsewhere(bed)
    assert [r for r in replies if TCP in r and r[TCP].flags.R]  # REJECT tcp-reset
    assert bed.delivered() == delivered  # the RST is bpfilter's: the stack never saw it

    with netns.entered(bed.server):
        second = deploy.apply(CHAINS, "user-chains.v4", "eth0", build_root / "a2")
    assert second.replaced and second.deployment.prog_id != first.deployment.prog_id
    assert second.deployment.mode == first.deployment.mode  # where the first one ran
    # user-chains: 192.0.2.0/24 is in its BLOCKLIST chain, which drops it silently.
    assert _ssh_from_elsewhere(bed) == []
    assert bed.delivered() == delivered

    status = _cli(bed, "status")
    assert status.returncode == 0 and "user-chains.v4" in status.stdout, status.stderr
    assert f" {first.deployment.mode} " in status.stdout
    listing = _cli(bed, "list", "-v", "-x")
    assert "Chain INPUT (policy DROP 0 packets, 0 bytes)" in listing.stdout, listing.stdout
    assert "1     1     40  -j BLOCKLIST" in listing.stdout, listing.stdout
    saved = _cli(bed, "save", "-c").stdout
    assert "[1:40] -A INPUT -j BLOCKLIST" in saved
    assert "[1:40] -A BLOCKLIST -s 192.0.2.0/24 -j DROP" in saved
    assert _cli(bed, "detach", "-i", "eth0").returncode == 0
    # Nothing filters any more: the SYN reaches the stack, which answers with its own RST.
    assert bed.delivered() == delivered
    _ssh_from_elsewhere(bed)
    assert bed.delivered() == delivered + 1
    assert "runs no ruleset" in _cli(bed, "status").stdout


def test_failed_apply_leaves_the_running_ruleset_untouched(bed, build_root):
    with netns.entered(bed.server):
        running = deploy.apply(HOST, "host-firewall.v4", "eth0", build_root / "f1")
        paths = state.Paths("eth0", state.netns_id())
        pins_before = sorted(p.name for p in paths.pins.iterdir())
        with pytest.raises(InputError):
            deploy.apply(HOST.replace("-m length", "-m hashlimit"), "bad.v4", "eth0",
                         build_root / "f2")
        with pytest.raises(KernelError, match="detach it before"):
            deploy.apply(CHAINS, "chains.v4", "eth0", build_root / "f3", XdpMode.GENERIC)
        with pytest.raises(KernelError, match="detach it before applying at TC ingress"):
            deploy.apply(CHAINS, "chains.v4", "eth0", build_root / "f3", attach=Attach.TC)
        assert deploy.running_program_id(paths) == running.deployment.prog_id
        assert state.read(paths).source == "host-firewall.v4"
        assert sorted(p.name for p in paths.pins.iterdir()) == pins_before
    assert [r for r in _ssh_from_elsewhere(bed) if TCP in r and r[TCP].flags.R]
    result = _cli(bed, "apply", "-i", "eth0", "/dev/null/missing.v4")
    assert result.returncode == 2
    with netns.entered(bed.server):
        deploy.detach("eth0")


def test_a_failed_ingress_switch_puts_the_egress_program_back(bed, build_root, monkeypatch):
    """The egress program is switched first; if the ingress switch then fails, the old
    egress program runs again and the running ruleset is whole. The failure is injected
    into the ingress link's replacement."""
    locked = (EXAMPLES / "locked-down.v4").read_text()
    with netns.entered(bed.server):
        running = deploy.apply(locked, "locked-down.v4", "eth0", build_root / "e1")
        paths = state.Paths("eth0", state.netns_id())
        replace = deploy._replace_pinned

        def failing(path, prog_fd):
            if path == paths.link:
                raise KernelError("injected: the ingress switch failed")
            return replace(path, prog_fd)

        monkeypatch.setattr(deploy, "_replace_pinned", failing)
        with pytest.raises(KernelError, match="injected"):
            deploy.apply(locked.replace("--dport 25", "--dport 26"), "b.v4", "eth0",
                         build_root / "e2")
        egress = Link.open_pinned(str(paths.egress_link))
        try:
            assert egress.info().prog_id == running.deployment.egress_prog_id
        finally:
            egress.close()
        assert deploy.running_program_id(paths) == running.deployment.prog_id
        assert state.read(paths).source == "locked-down.v4"
        monkeypatch.undo()
        deploy.detach("eth0")


def test_offload_on_a_nic_without_it_is_a_clear_error(bed, build_root):
    with netns.entered(bed.server):
        result = CliRunner().invoke(main, ["apply", "-i", "eth0", "--mode", "offload",
                                           "-o", str(build_root / "off"),
                                           str(EXAMPLES / "host-firewall.v4")])
        assert result.exit_code == 1
        said = " ".join(result.output.split())
        assert "cannot offload" in said and "--mode native" in said
        assert list(state.deployments()) == []


def test_generic_fallback_is_announced(bed, build_root):
    with netns.entered(bed.server):
        report = deploy.apply(HOST, "host-firewall.v4", "lo", build_root / "lo")
        try:
            assert report.deployment.mode == "generic"
            assert "no native XDP" in report.fallback
        finally:
            deploy.detach("lo")


def test_address_changes_only_rewrite_maps(bed, build_root, capsys):
    """Adding or removing a blocked address keeps the program: an address line in a
    blocklist run is one hash entry added or deleted in place; other changes that compile
    to the same program write the other generation of its maps, made live in one update."""
    from examples.make_acl import acl

    base = acl(200)
    lines = base.splitlines(keepends=True)
    added = "".join(lines[:100] + ["-A INPUT -s 10.99.0.1/32 -p tcp -m tcp --dport 22 -j DROP\n"]
                    + lines[100:])
    syn = bed.frame(IP(src="10.99.0.1", dst=SERVER_ADDR) / TCP(dport=22, flags="S"))
    with netns.entered(bed.server):
        first = deploy.apply(base, "acl.v4", "eth0", build_root / "m1")
    assert bed.send(syn)  # not blocked yet: the stack answers with its RST
    with netns.entered(bed.server):
        update = deploy.apply(added, "acl.v4", "eth0", build_root / "m2")
    assert update.edited == 1 and update.deployment.prog_id == first.deployment.prog_id
    assert bed.send(syn) == []  # blocked, no reply
    with netns.entered(bed.server):
        paths = state.Paths("eth0", state.netns_id())
        with deploy.LiveCounters(paths, state.read(paths)) as live:
            # lines[:100] are 4 header lines and rules 0-95: the added rule is rule 96.
            assert live("filter", "INPUT", 95).packets == 0
            assert live("filter", "INPUT", 96).packets == 1
        removed = deploy.apply(base, "acl.v4", "eth0", build_root / "m3")
        assert removed.edited == 1 and removed.deployment.live_gen == 0
    assert bed.send(syn)
    saved = _cli(bed, "save", "-c").stdout
    assert "-s 10.99.0.1/32" not in saved
    # A /24 in a run of /32s is not an edit in place (the run's lookup is by /32): the
    # other generation is written (here into the trie, still the same program).
    network = "".join(lines[:100] + ["-A INPUT -s 10.99.0.0/24 -p tcp -m tcp --dport 22 -j DROP\n"]
                      + lines[100:])
    with netns.entered(bed.server):
        other = deploy.apply(network, "acl.v4", "eth0", build_root / "m3b")
    assert not other.edited and bed.send(syn) == []

    # Measured, not asserted: the same change on a 10,000-rule ACL.
    big = acl(10000)
    big_lines = big.splitlines(keepends=True)
    big_added = "".join(big_lines[:5000]
                        + ["-A INPUT -s 10.99.0.1/32 -p tcp -m tcp --dport 22 -j DROP\n"]
                        + big_lines[5000:])
    with netns.entered(bed.server):
        deploy.apply(big, "big.v4", "eth0", build_root / "m4")
        report = deploy.apply(big_added, "big.v4", "eth0", build_root / "m5")
        deploy.detach("eth0")
    assert report.edited == 1
    with capsys.disabled():
        print(f"\n10,000-rule ACL, one address added: live after {report.total_s * 1000:.0f} ms "
              f"(map update {report.switch_ns / 1e3:.0f} us), no recompile")


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_a_new_kube_service_only_rewrites_the_service_map(bed, build_root, mode):
    """kube-proxy adding a service (its dispatch rule, KUBE-SVC and KUBE-SEP chains; in
    nftables mode a verdict map element, service and endpoint chains) is rows of the
    service map only: the same program, the other generation of its maps written and
    made live; the new service's rule then counts its connection."""
    from examples.make_kube import cluster_ip, kube_nat, kube_nft

    make, name, table, chain = (kube_nat, "kube.v4", "nat", "KUBE-SERVICES") \
        if mode == "iptables" else (kube_nft, "kube.nft", "kube-proxy", "services")
    with netns.entered(bed.server):
        first = deploy.apply(make(20), name, "eth0", build_root / "k1")
        more = deploy.apply(make(21), name, "eth0", build_root / "k2")
    assert more.map_only and more.deployment.prog_id == first.deployment.prog_id
    bed.send(bed.frame(IP(src="192.0.2.7", dst=cluster_ip(20)) / TCP(dport=80, flags="S")))
    with netns.entered(bed.server):
        paths = state.Paths("eth0", state.netns_id())
        with deploy.LiveCounters(paths, state.read(paths)) as live:
            assert live(table, chain, 20).packets == 1
            assert live(table, chain, 19).packets == 0
        deploy.detach("eth0")


def test_the_cli_on_a_ruleset_with_every_table(bed, build_root):
    """examples/marks.v4 has raw, mangle and filter rules and an egress program: apply
    warns that XDP keeps the marks from the kernel, status checks both programs, list
    shows one table, detach names both programs."""
    rules = str(EXAMPLES / "marks.v4")
    applied = _cli(bed, "apply", rules, "-i", "eth0", "-o", str(build_root / "cli"))
    assert applied.returncode == 0, applied.stderr
    assert "warning: rules set packet marks" in " ".join(applied.stdout.split())
    status = _cli(bed, "status").stdout
    assert "(egress)" in status and "attached" in status, status
    raw = _cli(bed, "list", "-t", "raw").stdout
    assert "Chain PREROUTING (policy ACCEPT) (raw)" in raw, raw
    assert "-j NOTRACK" in raw and "mangle" not in raw and "Chain INPUT" not in raw
    detached = _cli(bed, "detach", "-i", "eth0")
    assert detached.returncode == 0 and "and egress program" in detached.stdout


def test_the_cli_on_an_nftables_ruleset(bed, build_root):
    """An nftables ruleset from stdin: apply, list in nft's words, save as nft text with
    its counters (which the kernel's nft accepts), detach."""
    applied = netns.run("sh", "-c", f"{sys.executable} -m bpfilter apply - -i eth0 -o "
                        f"{build_root / 'nft-cli'} < {EXAMPLES / 'host-firewall.nft'}",
                        netns=bed.server, check=False)
    assert applied.returncode == 0, applied.stderr
    assert "warning: rules set packet marks" in " ".join(applied.stdout.split())
    assert not _ssh_from_elsewhere(bed)  # 192.0.2.0/24 is the blocklist: dropped
    admin = bed.send(bed.frame(IP(src="203.0.113.5", dst=SERVER_ADDR) / TCP(dport=22,
                                                                           flags="S")))
    assert admin and TCP in admin[0]  # the server's stack answers: accepted
    listed = _cli(bed, "list", "-v", "-t", "filter").stdout
    assert "Chain input (policy DROP" in listed and "ct state related,established" in listed
    saved = _cli(bed, "save", "-c").stdout
    assert "counter packets" in saved and "table ip early" in saved, saved
    netns.run("nft", "-c", "-f", "-", netns=bed.server, input=saved)
    detached = _cli(bed, "detach", "-i", "eth0")
    assert detached.returncode == 0


def test_a_nat_ruleset_names_the_addressed_interfaces_that_run_none(kernel, build_root):
    """NAT's replies are translated only by programs of interfaces that run a ruleset:
    apply names the router's other interface until it runs one too."""
    with VethBed(build_root / "nat-bed", prefix="bpft", forward=True) as router:
        text = (EXAMPLES / "home-router.v4").read_text()
        with netns.entered(router.server):
            first = deploy.apply(text, "home-router.v4", "eth0", build_root / "n1")
            second = deploy.apply(text, "home-router.v4", "eth1", build_root / "n2")
            again = deploy.apply(text, "home-router.v4", "eth0", build_root / "n3")
    assert [w for w in first.warnings if "eth1" in w and "NAT" in w], first.warnings
    assert not [w for w in second.warnings + again.warnings if "NAT" in w]
