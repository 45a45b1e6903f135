"""The egress half of connection tracking: a fixed program (templates/ct_egress.c) at TC
egress that records the host's own connections in the table the stage programs read.

It does not depend on the ruleset. It runs while the interface's ruleset reads the
connection state, as the kernel's conntrack hooks do while a rule needs them; the table
stays pinned through every swap, so flows survive a new ruleset (and, as in the kernel,
are not followed while a stateless one runs). It follows forwarded packets too: a
forwarded connection's answers may come in where no ruleset tracks them, and a packet
tracked twice (at the ingress that forwards it, then here) moves no state further.
`detach` removes the tracker, and the namespace's table with its last interface.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from bpfilter.build import build_source
from bpfilter.loader.libbpf import possible_cpus
from bpfilter.loader.links import Link, TcLink
from bpfilter.loader.objects import Map, Object
from bpfilter.resources import resource_dir
from bpfilter.state import Paths, remove_tree

PROGRAM = "bpfilter_ct_egress"
TABLE = "bf_conntrack"
SHARED_MAPS = (TABLE, "bf_ct_created")  # what every program reading the state shares


def ensure_tracker(paths: Paths, ifindex: int, build_dir: Path) -> Callable[[], None]:
    """Attach the tracker, over the pinned table or a new one; returns what undoes this
    call (the caller's apply may still fail)."""
    if paths.tracker_link.exists():
        return lambda: None
    source = (resource_dir("templates") / "ct_egress.c").read_text()
    path, _cached = build_source(PROGRAM, source, build_dir / "tracker")
    new_table = not paths.conntrack.exists()
    shared = {} if new_table else open_shared(paths)
    try:
        with Object(path, shared={n: m.fd for n, m in shared.items()}) as obj:
            link = TcLink.create(ifindex, obj.programs[PROGRAM].fd, egress=True)
            try:
                paths.pins.mkdir(parents=True, exist_ok=True)
                if new_table:
                    paths.conntrack.mkdir()
                    for name in SHARED_MAPS:
                        obj.map(name).pin(str(paths.conntrack / name))
                link.pin(str(paths.tracker_link))
            except BaseException:
                link.detach()
                (remove_tracker if new_table else stop_tracker)(paths)
                raise
            finally:
                link.close()
    finally:
        for table in shared.values():
            table.close()
    return (lambda: remove_tracker(paths)) if new_table else (lambda: stop_tracker(paths))


def open_shared(paths: Paths) -> dict[str, Map]:
    """The pinned maps by name; close them."""
    return {name: Map.open_pinned(str(paths.conntrack / name)) for name in SHARED_MAPS}


def stop_tracker(paths: Paths) -> None:
    """Stop following connections; the table stays."""
    if paths.tracker_link.exists():
        link = Link.open_pinned(str(paths.tracker_link))
        try:
            link.detach()
        finally:
            link.close()
        paths.tracker_link.unlink()


def remove_tracker(paths: Paths) -> None:
    """Stop following connections here; the namespace's table goes with the last
    interface bpfilter runs on."""
    stop_tracker(paths)
    others = [d for d in paths.pins.parent.iterdir()
              if d not in (paths.pins, paths.conntrack)] if paths.pins.parent.exists() else []
    if not others:
        remove_tree(paths.conntrack)


# struct bf_ct_key and struct bf_ct_entry (templates/conntrack.h); addresses in host order.
_KEY = struct.Struct("<IIHHI")
_ENTRY = struct.Struct("<QBBBBBB2x")
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp",
              socket.IPPROTO_ICMP: "icmp"}


@dataclass(frozen=True)
class Connection:
    """One live entry, oriented as `conntrack -L` shows it: from the side that opened it."""

    proto: str
    state: str  # the TCP state, or "-"
    timeout_s: int
    src: str
    dst: str
    sport: int  # for ICMP: the query's identifier
    dport: int  # for ICMP: the query's type
    replied: bool


@dataclass(frozen=True)
class TableUse:
    entries: int  # live or expired, until the LRU reuses them
    capacity: int
    evicted: int  # live connections the LRU pushed out to make room


def table_use(paths: Paths) -> TableUse:
    maps = open_shared(paths)
    try:
        table = maps[TABLE]
        entries = sum(1 for _ in table.keys())
        created = sum(struct.unpack("<Q", v)[0]
                      for v in maps["bf_ct_created"].lookup_percpu(struct.pack("<I", 0)))
        return TableUse(entries, table.max_entries, max(0, created - entries))
    finally:
        for m in maps.values():
            m.close()


def connections(paths: Paths) -> Iterator[Connection]:
    table = Map.open_pinned(str(paths.conntrack / TABLE))
    try:
        now = time.monotonic_ns()  # bpf_ktime_get_ns() counts CLOCK_MONOTONIC
        for key in list(table.keys()):
            value = table.lookup(key)
            if value is None:
                continue
            a0, a1, p0, p1, proto = _KEY.unpack(key)
            expires, orig, replied, tcp, *_ = _ENTRY.unpack(value)
            if expires <= now:
                continue
            ends = [(a0, p0), (a1, p1)]
            if proto == socket.IPPROTO_ICMP:  # endpoint 0 asked; the ports are id, type
                (src, sport), (dst, _) = ends
                dport = p1
            else:
                (src, sport), (dst, dport) = ends[orig], ends[1 - orig]
            yield Connection(_PROTOCOLS.get(proto, str(proto)),
                             TCP_STATES[tcp] if proto == socket.IPPROTO_TCP and tcp < 10
                             else "-", (expires - now) // 1_000_000_000,
                             str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)),
                             sport, dport, bool(replied))
    finally:
        table.close()


def flush(paths: Paths) -> int:
    """Forget every connection (`conntrack -F`); how many entries there were."""
    maps = open_shared(paths)
    try:
        keys = list(maps[TABLE].keys())
        for key in keys:
            maps[TABLE].delete(key)
        created = maps["bf_ct_created"]
        created.update(struct.pack("<I", 0), bytes(created.value_size * possible_cpus()))
        return len(keys)
    finally:
        for m in maps.values():
            m.close()
