"""The filters bench/ compares, each set up on a fresh testbed server with the same
N-rule ACL: N rules a test packet does not match, then the one it does (`-p udp -j DROP`).
The `forward` ruleset is the ACL in FORWARD, on a server that routes the packet on to a
far network (testbed `forward=True`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from bpfilter import deploy, netns
from bpfilter.build import build_source
from bpfilter.codegen import Attach
from bpfilter.loader.links import XdpLink
from bpfilter.loader.objects import Object
from bpfilter.loader.xdp import XdpMode
from bpfilter.resources import resource_dir
from bpfilter.testbed import VethBed
from examples.make_acl import acl


def blocked(i: int) -> str:
    """The i-th address of the ACL, as examples/make_acl.py writes it."""
    return f"192.168.{i // 250}.{i % 250 + 1}"


def mixed(n: int) -> str:
    """A ruleset shaped like real ones, N rules (in all chains) before the one the test
    packet matches:
    blocklist runs (which bpfilter folds), service ports, ICMP types, interfaces, rate
    limits and user chains, none of which match the bench's UDP packet from 192.0.2.1."""
    rules, chains = [], [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                         ":OUTPUT ACCEPT [0:0]"]
    i = 0
    while len(rules) < n:
        kind = i % 10
        if kind < 5:  # a run of 20 blocked hosts
            rules += [f"-A INPUT -s 10.{i % 250}.{j}.{i // 250 % 250 + 1}/32 -j DROP"
                      for j in range(20)]
        elif kind == 5:
            rules.append(f"-A INPUT -p tcp -m tcp --dport {1000 + i % 60000} -j ACCEPT")
        elif kind == 6:
            port = 1000 + i % 60000  # the bench packet goes to port 9
            rules.append(f"-A INPUT -p udp -m multiport --dports {port},"
                         f"{port + 1}:{port + 3} -j ACCEPT")
        elif kind == 7:
            rules.append(f"-A INPUT -p icmp -m icmp --icmp-type {i % 2 * 8} -m limit "
                         "--limit 10/sec -j ACCEPT")
        elif kind == 8:
            rules.append(f"-A INPUT -i lan{i % 16} -p udp -m udp --sport 53 -j ACCEPT")
        else:
            chain = f"SVC{len(chains)}"
            chains.append(f":{chain} - [0:0]")
            rules.append(f"-A INPUT -s 172.16.{i % 250}.0/24 -j {chain}")
            rules.append(f"-A {chain} -p tcp -m tcp --dport 22 -j ACCEPT")
            rules.append(f"-A {chain} -j RETURN")
        i += 1
    body = sorted(rules[:n], key=lambda r: not r.startswith("-A INPUT"))
    return "\n".join(["*filter", *chains, *body, "-A INPUT -p udp -j DROP", "COMMIT"]) + "\n"


def routed(n: int) -> str:
    """The ACL in FORWARD, for a packet the server routes on."""
    return acl(n).replace("-A INPUT ", "-A FORWARD ")


RULESETS: dict[str, Callable[[int], str]] = {"acl": acl, "mixed": mixed, "forward": routed}
# The hook each ruleset's packet walks: the server receives it, or routes it on.
HOOKS = {"acl": "input", "mixed": "input", "forward": "forward"}


def nft_linear(n: int, hook: str = "input") -> str:
    rules = "".join(f"    ip saddr {blocked(i)} tcp dport 22 drop\n" for i in range(n))
    return (f"table ip bench {{\n  chain {hook} {{\n"
            f"    type filter hook {hook} priority filter; policy accept;\n"
            f"{rules}    meta l4proto udp drop\n  }}\n}}\n")


def nft_set(n: int, hook: str = "input") -> str:
    elements = ", ".join(blocked(i) for i in range(n))
    return ("table ip bench {\n  set blocked { type ipv4_addr; "
            f"elements = {{ {elements} }} }}\n  chain {hook} {{\n"
            f"    type filter hook {hook} priority filter; policy accept;\n"
            "    ip saddr @blocked tcp dport 22 drop\n    meta l4proto udp drop\n  }\n}\n")


class Setup:
    """A contender on a bed: `extra` holds what it measured while setting up."""

    def __init__(self, bed: VethBed):
        self.bed = bed
        self.extra: dict[str, float] = {}


@contextmanager
def _kernel_filter(build: Path, n: int, load: Callable[[str, int], None],
                   forward: bool) -> Iterator[Setup]:
    with VethBed(build, prefix="bench", server_xdp=True, forward=forward) as bed:
        start = time.perf_counter()
        load(bed.server, n)
        setup = Setup(bed)
        setup.extra["load_s"] = time.perf_counter() - start
        yield setup


def _restore(tool: str, ruleset: Callable[[int], str]) -> Callable[[str, int], None]:
    return lambda ns, n: netns.run(tool, netns=ns, input=ruleset(n))


def _nft(text: Callable[[int, str], str], hook: str) -> Callable[[str, int], None]:
    return lambda ns, n: netns.run("nft", "-f", "-", netns=ns, input=text(n, hook))


@contextmanager
def _bpfilter(build: Path, n: int, ruleset: Callable[[int], str],
              attach: Attach, forward: bool) -> Iterator[Setup]:
    # At TC, the server needs an XDP program for veth to take the generator's frames.
    with VethBed(build, prefix="bench", server_xdp=attach is Attach.TC,
                 forward=forward) as bed:
        with netns.entered(bed.server):
            report = deploy.apply(ruleset(n), f"bench-{n}", "eth0", build / f"rules-{n}",
                                  attach=attach)
        setup = Setup(bed)
        setup.extra["load_s"] = report.total_s
        setup.extra["prog_id"] = report.deployment.prog_id
        try:
            yield setup
        finally:
            with netns.entered(bed.server):
                deploy.detach("eth0")


@contextmanager
def xdp_drop_all(build: Path, n: int, forward: bool = False) -> Iterator[Setup]:
    with VethBed(build, prefix="bench", forward=forward) as bed:
        source = (resource_dir("templates") / "xdp_drop.c").read_text()
        path, _cached = build_source("bpfilter_xdp_drop", source, build / "drop")
        with Object(path) as obj, netns.entered(bed.server):
            link = XdpLink.create(bed.server_index, obj.programs["bpfilter_xdp_drop"].fd,
                                  XdpMode.NATIVE)
            try:
                yield Setup(bed)
            finally:
                link.close()


@contextmanager
def stack_only(build: Path, n: int, forward: bool = False) -> Iterator[Setup]:
    with VethBed(build, prefix="bench", server_xdp=True, forward=forward) as bed:
        yield Setup(bed)


def contenders(ruleset: str) -> dict[str, Callable[[Path, int], object]]:
    """The contenders for one of RULESETS. nftables gets the ACLs in its own syntax,
    linear and as a set; the mixed ruleset has no nft translation yet (iptables-nft
    stands for the nf_tables back-end there)."""
    text, hook = RULESETS[ruleset], HOOKS[ruleset]
    forward = hook == "forward"
    found: dict[str, Callable[[Path, int], object]] = {
        "XDP drop-all": lambda b, n: xdp_drop_all(b, n, forward),
        "bpfilter XDP": lambda b, n: _bpfilter(b, n, text, Attach.XDP, forward),
        "bpfilter TC": lambda b, n: _bpfilter(b, n, text, Attach.TC, forward),
        "iptables-legacy": lambda b, n: _kernel_filter(
            b, n, _restore("iptables-legacy-restore", text), forward),
        "iptables-nft": lambda b, n: _kernel_filter(
            b, n, _restore("iptables-nft-restore", text), forward),
    }
    if ruleset != "mixed":
        found["nft (linear rules)"] = lambda b, n: _kernel_filter(
            b, n, _nft(nft_linear, hook), forward)
        found["nft (one set)"] = lambda b, n: _kernel_filter(b, n, _nft(nft_set, hook),
                                                             forward)
    found["no filter (stack)"] = lambda b, n: stack_only(b, n, forward)
    return found


CONTENDERS = contenders("acl")
