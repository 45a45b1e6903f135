"""Network namespaces for the demo and the tests: create, enter, tear down."""

from __future__ import annotations

import ctypes
import json
import subprocess
import uuid
from contextlib import contextmanager
from typing import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run(*args: str, netns: str | None = None, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    result = subprocess.run(cmd, capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create(name: str) -> str:
    run("ip", "netns", "add", name)
    run("ip", "link", "set", "lo", "up", netns=name)
    return name


def delete(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run this thread inside namespace `name`; sockets opened here stay in it."""
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{name}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            _libc.setns(home.fileno(), CLONE_NEWNET)


def veth(name_a: str, ns_a: str, name_b: str, ns_b: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    tmp_a, tmp_b = unique_name("va")[:15], unique_name("vb")[:15]
    run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
    run("ip", "link", "set", tmp_a, "netns", ns_a, "name", name_a)
    run("ip", "link", "set", tmp_b, "netns", ns_b, "name", name_b)
    run("ip", "link", "set", name_a, "up", netns=ns_a)
    run("ip", "link", "set", name_b, "up", netns=ns_b)


def links(netns: str) -> list[dict]:
    """`ip -j link` of the namespace: ifindex, ifname, address, ..."""
    return json.loads(run("ip", "-j", "link", "show", netns=netns).stdout)


def link_info(netns: str, ifname: str) -> tuple[int, str]:
    """(ifindex, MAC address) of an interface."""
    link = next(l for l in links(netns) if l["ifname"] == ifname)
    return link["ifindex"], link["address"]


def interfaces(netns: str) -> list[tuple[int, str]]:
    """(ifindex, name) of every interface in the namespace."""
    return [(l["ifindex"], l["ifname"]) for l in links(netns)]


def sysctl(netns: str, key: str, value: str) -> None:
    run("sysctl", "-qw", f"{key}={value}", netns=netns)
