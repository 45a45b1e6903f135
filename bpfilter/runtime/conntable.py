"""The connection table: one per network namespace, pinned apart from any ruleset.

Every program of every interface whose ruleset reads the connection state uses it (a
forwarded connection's packets come in on one interface, its answers on another): the
ingress program tracks what comes in, the egress one what the host sends and forwards.
Pinned on its own, it survives every swap, so flows outlive a ruleset; as the kernel's
conntrack hooks, nothing follows connections while a stateless ruleset runs. It goes
with the namespace's last ruleset.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from bpfilter.errors import KernelError
from bpfilter.loader.libbpf import possible_cpus
from bpfilter.loader.netfilter import NFPROTO_IPV4, NFPROTO_IPV6, defrag_link
from bpfilter.loader.objects import Map
from bpfilter.runtime.runner import CONNTRACK_MAPS, LoadedRuleset
from bpfilter.runtime.state import Paths, remove_tree

TABLE = "bf_conntrack"
BINDINGS = "bf_nat"  # templates/nat.h
# The netfilter links that make the kernel reassemble (follow_defrag).
DEFRAG_LINKS = {"defrag4": NFPROTO_IPV4, "defrag6": NFPROTO_IPV6}


def open_shared(paths: Paths) -> dict[str, Map]:
    """The pinned maps by name (none yet: {}); close them. A table another version of
    bpfilter pinned, with entries of another layout, is refused: the verifier would
    refuse the programs anyway, with a message that does not say why."""
    if not paths.conntrack.exists():
        return {}
    missing = [name for name in CONNTRACK_MAPS if not (paths.conntrack / name).exists()]
    if missing:
        raise _another_version(paths, "it has no " + ", ".join(missing))
    maps = {name: Map.open_pinned(str(paths.conntrack / name)) for name in CONNTRACK_MAPS}
    table = maps[TABLE]
    sizes = (table.key_size, table.value_size, maps[BINDINGS].value_size)
    if sizes != (_KEY.size, _ENTRY.size, _BINDING.size):
        for m in maps.values():
            m.close()
        raise _another_version(
            paths, "{}-byte keys, {}-byte entries, {}-byte bindings; this one uses {}, {} "
                   "and {}".format(*sizes, _KEY.size, _ENTRY.size, _BINDING.size))
    return maps


def _another_version(paths: Paths, why: str) -> KernelError:
    return KernelError(
        f"the connection table pinned at {paths.conntrack} was made by another version of "
        f"bpfilter ({why}): its connections cannot carry over. Detach the rulesets that use "
        "it (bpfilter status lists them), then apply again.")


def pin_table(paths: Paths, loaded: LoadedRuleset) -> Callable[[], None]:
    """Make a loaded ruleset's connection table the namespace's, if it has none yet;
    returns what undoes this (the caller's apply may still fail)."""
    if paths.conntrack.exists():
        return lambda: None
    paths.conntrack.mkdir(parents=True)
    try:
        for name in CONNTRACK_MAPS:
            loaded.map(name).pin(str(paths.conntrack / name))
    except BaseException:
        remove_tree(paths.conntrack)
        raise
    return lambda: remove_table(paths)


def follow_defrag(paths: Paths, tracking: bool) -> None:
    """The kernel reassembles fragments before PREROUTING while some rule of the
    namespace needs connection tracking; so do bpfilter's namespaces, while some ruleset
    reads the connection state (`tracking`): a later fragment the program leaves to the
    kernel then waits there for its first fragment and shares its fate (dropped: never
    reassembled). Without such a ruleset, fragments go their own ways, judged one by one."""
    home = paths.pins.parent / ":defrag"
    if not tracking:
        remove_tree(home)
        return
    home.mkdir(parents=True, exist_ok=True)
    for name, family in DEFRAG_LINKS.items():
        if not (home / name).exists():
            link = defrag_link(family)
            try:
                link.pin(str(home / name))
            finally:
                link.close()


def remove_table(paths: Paths) -> None:
    """The namespace's table goes with the last interface bpfilter runs on."""
    others = [d for d in paths.pins.parent.iterdir()
              if d not in (paths.pins, paths.conntrack)] if paths.pins.parent.exists() else []
    if not others:
        remove_tree(paths.conntrack)


# struct bf_ct_key and struct bf_ct_entry (templates/conntrack.h); addresses in host order,
# four words each (an IPv4 address in the first).
_KEY = struct.Struct("<4I4IHHBB2x")
_ENTRY = struct.Struct("<QBBBBBBBBIH2xIII" + "IIIIBB2x" * 2 + "4x")
_MARK = 9  # the field's place in _ENTRY
# struct bf_nat_entry: per endpoint view, as_dst, as_src, view_port, dst_port, src_port, todo,
# masq
_END = "IIIHHHBB"
_BINDING = struct.Struct("<" + _END * 2)
_TO, _FROM = 1, 2  # enum bf_nat_end_todo
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp",
              socket.IPPROTO_ICMP: "icmp", socket.IPPROTO_ICMPV6: "icmpv6"}


def _address(words: tuple[int, ...], family: int) -> str:
    if family == 6:
        return str(ipaddress.IPv6Address(sum(w << (96 - 32 * i) for i, w in enumerate(words))))
    return str(ipaddress.IPv4Address(words[0]))


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
    mark: int = 0  # CONNMARK's
    dnat: Optional[str] = None  # where DNAT sends it (address:port), as conntrack -L's reply
    snat: Optional[str] = None  # the source SNAT gives it (address:port)


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
    bindings = Map.open_pinned(str(paths.conntrack / BINDINGS))
    try:
        now = time.monotonic_ns()  # bpf_ktime_get_ns() counts CLOCK_MONOTONIC
        for key in list(table.keys()):
            value = table.lookup(key)
            if value is None:
                continue
            fields = _KEY.unpack(key)
            a0, a1 = _address(fields[0:4], fields[11]), _address(fields[4:8], fields[11])
            p0, p1, proto = fields[8:11]
            fields = _ENTRY.unpack(value)
            (expires, orig, replied, tcp), mark = fields[:4], fields[_MARK]
            if expires <= now:
                continue
            ends = [(a0, p0), (a1, p1)]
            orig = _opener(proto, orig)
            (src, sport), (dst, dport) = ends[orig], ends[1 - orig]
            yield Connection(_PROTOCOLS.get(proto, str(proto)),
                             TCP_STATES[tcp] if proto == socket.IPPROTO_TCP and tcp < 10
                             else "-", (expires - now) // 1_000_000_000, src, dst,
                             sport, dport, bool(replied), mark,
                             *_nat(bindings, key, proto, orig))
    finally:
        table.close()
        bindings.close()


def _opener(proto: int, orig: int) -> int:
    """Which endpoint of a key opened its connection (the entry's `orig`; of an ICMP
    query's, endpoint 0 asked: its ports are the id and the type)."""
    return 0 if proto in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6) else orig


def _binding_ends(value: bytes, orig: int) -> tuple[tuple, tuple]:
    """A binding's ends (_END's fields): the opener's, then the other."""
    fields = _BINDING.unpack(value)
    ends = (fields[0:8], fields[8:16])
    return ends[orig], ends[1 - orig]


def _nat(bindings: Map, key: bytes, proto: int, orig: int) -> tuple[Optional[str], ...]:
    """The new destination and source of a connection NAT bound (its original tuple's
    entry: endpoint `orig` of its key opened it), as conntrack -L's reply tuple shows
    them."""
    value = bindings.lookup(key)
    if value is None:
        return None, None
    client, server = _binding_ends(value, orig)
    ports = proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP)  # ICMP: id

    def shown(address: int, port: int) -> str:
        text = str(ipaddress.IPv4Address(address))
        return f"{text}:{port}" if ports else text

    view, _as_dst, as_src, view_port, _dst_port, src_port, _todo, _masq = client
    snat = shown(as_src, src_port) if (as_src, src_port) != (view, view_port) else None
    view, as_dst, _as_src, view_port, dst_port, _src_port, todo, _masq = server
    dnat = shown(as_dst, dst_port) if todo & _TO else None
    return dnat, snat


def forget_masqueraded(table: Map, bindings: Map, addresses: set[int]) -> int:
    """nf_nat_masquerade's address event: the connections MASQUERADE gave one of
    `addresses` (host order), gone from the host, are forgotten, so that their next
    packets start new ones under an address the host has. How many."""
    gone = 0
    for key in list(table.keys()):
        value = bindings.lookup(key)
        if value is None:
            continue
        orig = _opener(_KEY.unpack(key)[10],
                       _ENTRY.unpack(table.lookup(key) or bytes(_ENTRY.size))[1])
        client, _server = _binding_ends(value, orig)
        _view, _as_dst, as_src, *_rest, masq = client
        if masq and as_src in addresses:
            table.delete(key)
            gone += 1
    return gone


def forget_masqueraded_at(paths: Paths, addresses: set[int]) -> int:
    """forget_masqueraded() in the namespace's pinned table, if it has one."""
    if not addresses or not paths.conntrack.exists():
        return 0
    maps = open_shared(paths)
    try:
        return forget_masqueraded(maps[TABLE], maps[BINDINGS], addresses)
    finally:
        for m in maps.values():
            m.close()


def flush(paths: Paths) -> int:
    """Forget every connection (`conntrack -F`); how many entries there were."""
    maps = open_shared(paths)
    try:
        keys = list(maps[TABLE].keys())
        for key in keys:
            maps[TABLE].delete(key)
        for name in (BINDINGS, "bf_nat_src"):
            for key in list(maps[name].keys()):
                maps[name].delete(key)
        created = maps["bf_ct_created"]
        created.update(struct.pack("<I", 0), bytes(created.value_size * possible_cpus()))
        return len(keys)
    finally:
        for m in maps.values():
            m.close()
