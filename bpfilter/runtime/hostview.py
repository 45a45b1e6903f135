"""What a running program reads of the host it runs on, kept equal to the kernel's.

The programs decide INPUT against FORWARD, and tell martian sources, by the `local` table's
routes (bf_local, bf_local6), and match `-i`/`-o` patterns by interface index (bf_ifmatch).
Addresses, local routes and interfaces change while a ruleset runs; `sync` reads them
from the kernel and writes into a ruleset's maps only what differs, then bumps the epoch
that invalidates the programs' per-CPU memo (bf_memo: the last local lookups, the last
MAC). The loader fills new programs the same way, and the watcher (runtime/watcher.py) calls `sync` on every change.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bpfilter import ir
from bpfilter.errors import KernelError
from bpfilter.loader.objects import Map
from bpfilter.runtime.state import Deployment, Paths

RT_TABLE_LOCAL, RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST = 255, 2, 3, 4
IFF_UP = 0x1
# The routes of the `local` table the kernel delivers to INPUT by, per family.
_DELIVERED = {socket.AF_INET: (RTN_LOCAL, RTN_BROADCAST),
              socket.AF_INET6: (RTN_LOCAL, RTN_ANYCAST)}
# bf_local6's values (templates/bpfilter.h: enum bf_local6)
LOCAL6_ROUTE, LOCAL6_ADDRESS = 1, 2
# The maps `sync` writes, with the epoch that tells programs they changed.
MAPS = ("bf_local", "bf_local6", "bf_ifmatch", "bf_ifmac", "bf_sysctl", "bf_route6",
        "bf_addrtype", "bf_ifaddr", "bf_host")
# struct bf_addrtype (templates/addrtype.h): the route's type and output interface.
_ADDRTYPE = struct.Struct("<BxxxI")
RT_TABLE_MAIN = 254
# struct bf_sysctl (templates/bpfilter.h), and the kernel's defaults where a key is absent
# (nf_conntrack's before the module first runs in the namespace).
_SYSCTL = struct.Struct("<IIIII")
_SYSCTL_KEYS = (("net/netfilter/nf_conntrack_checksum", "1"), ("net/ipv4/icmp_ratelimit", "1000"),
                ("net/ipv4/icmp_ratemask", "6168"), ("net/ipv6/icmp/ratelimit", "1000"),
                ("net/ipv6/icmp/ratemask", "0-1,3-127"))


@dataclass(frozen=True)
class HostView:
    """The kernel's facts as rows of the maps: key bytes -> value bytes."""

    local: dict[bytes, bytes]
    local6: dict[bytes, bytes]
    interfaces: tuple[tuple[int, str], ...]  # (ifindex, name)
    macs: dict[bytes, bytes]  # bf_ifmac: ifindex -> MAC, 8 bytes
    sysctl: dict[bytes, bytes]  # bf_sysctl's one row
    routes6: dict[bytes, bytes]  # bf_route6: the main table's IPv6 prefixes -> length
    addrtypes: dict[bytes, bytes]  # bf_addrtype: every IPv4 local-table route -> its type
    primaries: dict[bytes, bytes]  # bf_ifaddr: ifindex -> its first IPv4 address


def _sysctl_row() -> dict[bytes, bytes]:
    values = []
    for key, default in _SYSCTL_KEYS:
        try:
            text = (Path("/proc/sys") / key).read_text().strip()
        except OSError:
            text = default
        if key.endswith("ipv6/icmp/ratemask"):  # a list of type ranges: is 1 in it?
            spans = [part.split("-") for part in text.split(",") if part]
            values.append(int(any(int(span[0]) <= 1 <= int(span[-1]) for span in spans)))
        else:
            values.append(int(text))
    return {struct.pack("<I", 0): _SYSCTL.pack(*values)}


def _main_routes6() -> dict[bytes, bytes]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = ipr.get_routes(family=socket.AF_INET6, table=RT_TABLE_MAIN)
    rows = {}
    for route in routes:
        net = ipaddress.IPv6Network(f"{route.get_attr('RTA_DST') or '::'}/{route['dst_len']}")
        rows[_key(net)] = bytes([net.prefixlen])
    return rows


def _primaries() -> dict[bytes, bytes]:
    """bf_ifaddr's rows: each interface's first IPv4 address, as the kernel lists them
    (its in_device's order: primaries by scope, secondaries after)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.get_addr(family=socket.AF_INET)
    rows: dict[bytes, bytes] = {}
    for address in found:
        key = struct.pack("<I", address["index"])
        if key not in rows:
            rows[key] = struct.pack("<I", int(ipaddress.IPv4Address(
                address.get_attr("IFA_LOCAL") or address.get_attr("IFA_ADDRESS"))))
    return rows


def local_table(family: int = socket.AF_INET) -> list[tuple[ipaddress._BaseNetwork, int, int]]:
    """Every route of the current network namespace's `local` table: (destination, route
    type, output interface)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = ipr.get_routes(family=family, table=RT_TABLE_LOCAL)
    everywhere = "0.0.0.0" if family == socket.AF_INET else "::"
    return [(ipaddress.ip_network(f"{route.get_attr('RTA_DST') or everywhere}/"
                                  f"{route['dst_len']}"),
             route["type"], route.get_attr("RTA_OIF") or 0) for route in routes]


def local_routes(family: int = socket.AF_INET,
                 table: Optional[list] = None) -> list[tuple[ipaddress._BaseNetwork, int]]:
    """The `local` table's routes that deliver to INPUT (local and broadcast for IPv4,
    local and anycast for IPv6), each with its route type."""
    return [(net, kind) for net, kind, _oif in (table if table is not None
                                                else local_table(family))
            if kind in _DELIVERED[family]]


def _key(network) -> bytes:
    return struct.pack("<I", network.prefixlen) + network.network_address.packed


def links() -> list[tuple[int, str, bytes]]:
    """(ifindex, name, MAC) of the current network namespace's interfaces."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.get_links()
    return [(link["index"], link.get_attr("IFLA_IFNAME"),
             bytes.fromhex((link.get_attr("IFLA_ADDRESS") or "").replace(":", "")))
            for link in found]


def read(interfaces: Optional[list[tuple[int, str]]] = None) -> HostView:
    """The current network namespace's view (`interfaces` given: those names instead)."""
    table4 = local_table(socket.AF_INET)
    local = {_key(net): b"\x01" for net, _kind in local_routes(socket.AF_INET, table4)}
    # An address of this host (a /128 local route) is where ICMPv6 errors come from.
    local6 = {_key(net): bytes([LOCAL6_ADDRESS if kind == RTN_LOCAL and net.prefixlen == 128
                                else LOCAL6_ROUTE])
              for net, kind in local_routes(socket.AF_INET6)}
    found = links()
    macs = {struct.pack("<I", index): mac.ljust(8, b"\0") for index, _name, mac in found
            if len(mac) == 6}
    return HostView(local, local6, tuple(interfaces if interfaces is not None
                                         else ((i, n) for i, n, _m in found)), macs,
                    _sysctl_row(), _main_routes6(),
                    {_key(net): _ADDRTYPE.pack(kind, oif) for net, kind, oif in table4},
                    _primaries())


def addresses(view: HostView, down: frozenset[int] = frozenset()) -> set[int]:
    """The host's IPv4 addresses (host order): the local table's /32 local routes, but
    those of the interfaces in `down` (a link set down keeps its local routes)."""
    found = set()
    for key, value in view.addrtypes.items():
        kind, oif = _ADDRTYPE.unpack(value)
        if key[:4] == struct.pack("<I", 32) and kind == RTN_LOCAL and oif not in down:
            found.add(int.from_bytes(key[4:8], "big"))
    return found


def down_links() -> frozenset[int]:
    """The interfaces set down (IFF_UP clear): nf_nat_masquerade's NETDEV_DOWN forgets
    the connections MASQUERADE gave their addresses."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return frozenset(link["index"] for link in ipr.get_links()
                         if not link["flags"] & IFF_UP)


def interface_rows(patterns: list[ir.InterfaceMatch], interfaces) -> dict[bytes, bytes]:
    """bf_ifmatch: ifindex -> bitmask of the patterns its name matches."""
    rows = {}
    for index, name in interfaces:
        mask = sum(1 << k for k, p in enumerate(patterns) if p.matches(name))
        if mask:
            rows[struct.pack("<I", index)] = struct.pack("<Q", mask)
    return rows


def _diff(table: Map, rows: dict[bytes, bytes], what: str) -> int:
    """Make the map hold exactly `rows`; the number of rows written or deleted."""
    current = {key: table.lookup(key) for key in table.keys()}
    stale = [key for key in current if key not in rows]
    fresh = {key: value for key, value in rows.items() if current.get(key) != value}
    if len(set(current).difference(stale).union(fresh)) > table.max_entries:
        raise KernelError(f"the host has {len(rows)} {what}, more than bpfilter's map holds "
                          f"({table.max_entries}): they cannot all be followed")
    for key in stale:
        table.delete(key)
    for key, value in fresh.items():
        table.update(key, value)
    return len(stale) + len(fresh)


def write(maps: dict[str, Map], view: HostView, patterns: list[ir.InterfaceMatch]) -> int:
    """Bring maps (MAPS by name) to the view; the number of rows that changed. The epoch
    moves after the rows, so that no CPU keeps a memo of the old answer past it."""
    rows = (("bf_local", view.local, "local IPv4 routes"),
            ("bf_local6", view.local6, "local IPv6 routes"),
            ("bf_ifmatch", interface_rows(patterns, view.interfaces),
             "interfaces matching the ruleset's names"),
            ("bf_ifmac", view.macs, "interfaces"), ("bf_sysctl", view.sysctl, "settings"),
            ("bf_route6", view.routes6, "IPv6 routes"),
            ("bf_addrtype", view.addrtypes, "IPv4 local-table routes"),
            ("bf_ifaddr", view.primaries, "interfaces with IPv4 addresses"))
    # (a ruleset applied by an older bpfilter may lack a map: it reads none of it)
    changed = sum(_diff(maps[name], wanted, what) for name, wanted, what in rows
                  if maps.get(name) is not None)
    if changed:
        epoch = maps["bf_host"]
        key = struct.pack("<I", 0)
        now = struct.unpack("<I", epoch.lookup(key) or b"\0\0\0\0")[0]
        epoch.update(key, struct.pack("<I", (now + 1) & 0xFFFFFFFF))
    return changed


def patterns(deployment: Deployment) -> list[ir.InterfaceMatch]:
    return [ir.InterfaceMatch(direction, name) for direction, name in deployment.if_patterns]


def sync(paths: Paths, deployment: Deployment, view: Optional[HostView] = None) -> int:
    """Bring a running ruleset's maps to the kernel's view (read now, unless given)."""
    gen_dir = paths.generation(deployment.generation)
    maps = {name: Map.open_pinned(str(gen_dir / name)) for name in MAPS
            if (gen_dir / name).exists()}
    try:
        return write(maps, view if view is not None else read(), patterns(deployment))
    finally:
        for table in maps.values():
            table.close()
