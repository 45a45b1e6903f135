"""The filters bench/ compares, each set up on a fresh testbed server with the same
N-rule ACL: N rules a test packet does not match, then the one it does (`-p udp -j DROP`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from bpfilter import deploy, netns
from bpfilter.build import build_source
from bpfilter.loader.links import XdpLink
from bpfilter.loader.objects import Object
from bpfilter.loader.xdp import XdpMode
from bpfilter.resources import resource_dir
from bpfilter.testbed import VethBed
from examples.make_acl import acl


def blocked(i: int) -> str:
    """The i-th address of the ACL, as examples/make_acl.py writes it."""
    return f"192.168.{i // 250}.{i % 250 + 1}"


def nft_linear(n: int) -> str:
    rules = "".join(f"    ip saddr {blocked(i)} tcp dport 22 drop\n" for i in range(n))
    return ("table ip bench {\n  chain input {\n"
            "    type filter hook input priority filter; policy accept;\n"
            f"{rules}    meta l4proto udp drop\n  }}\n}}\n")


def nft_set(n: int) -> str:
    elements = ", ".join(blocked(i) for i in range(n))
    return ("table ip bench {\n  set blocked { type ipv4_addr; "
            f"elements = {{ {elements} }} }}\n  chain input {{\n"
            "    type filter hook input priority filter; policy accept;\n"
            "    ip saddr @blocked tcp dport 22 drop\n    meta l4proto udp drop\n  }\n}\n")


class Setup:
    """A contender on a bed: `extra` holds what it measured while setting up."""

    def __init__(self, bed: VethBed):
        self.bed = bed
        self.extra: dict[str, float] = {}


@contextmanager
def _kernel_filter(build: Path, n: int, load: Callable[[str, int], None]) -> Iterator[Setup]:
    with VethBed(build, prefix="bench", server_xdp=True) as bed:
        start = time.perf_counter()
        load(bed.server, n)
        setup = Setup(bed)
        setup.extra["load_s"] = time.perf_counter() - start
        yield setup


def _restore(tool: str) -> Callable[[str, int], None]:
    return lambda ns, n: netns.run(tool, netns=ns, input=acl(n))


def _nft(text: Callable[[int], str]) -> Callable[[str, int], None]:
    return lambda ns, n: netns.run("nft", "-f", "-", netns=ns, input=text(n))


@contextmanager
def bpfilter_xdp(build: Path, n: int) -> Iterator[Setup]:
    with VethBed(build, prefix="bench") as bed:
        with netns.entered(bed.server):
            report = deploy.apply(acl(n), f"acl-{n}", "eth0", build / f"acl-{n}")
        setup = Setup(bed)
        setup.extra["load_s"] = report.total_s
        setup.extra["prog_id"] = report.deployment.prog_id
        try:
            yield setup
        finally:
            with netns.entered(bed.server):
                deploy.detach("eth0")


@contextmanager
def xdp_drop_all(build: Path, n: int) -> Iterator[Setup]:
    with VethBed(build, prefix="bench") as bed:
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
def stack_only(build: Path, n: int) -> Iterator[Setup]:
    with VethBed(build, prefix="bench", server_xdp=True) as bed:
        yield Setup(bed)


CONTENDERS: dict[str, Callable[[Path, int], object]] = {
    "XDP drop-all": xdp_drop_all,
    "bpfilter XDP": bpfilter_xdp,
    "iptables-legacy": lambda b, n: _kernel_filter(b, n, _restore("iptables-legacy-restore")),
    "iptables-nft": lambda b, n: _kernel_filter(b, n, _restore("iptables-nft-restore")),
    "nft (linear rules)": lambda b, n: _kernel_filter(b, n, _nft(nft_linear)),
    "nft (one set)": lambda b, n: _kernel_filter(b, n, _nft(nft_set)),
    "no filter (stack)": stack_only,
}
NOT_BUILT: dict[str, Optional[str]] = {"bpfilter TC": "TC attach is not built yet"}
