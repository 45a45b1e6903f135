"""A compiled ruleset loaded into the kernel: its maps filled, its rules' counters readable.

This is the glue between the IR (interface patterns, counter slots) and the loader, which
knows only objects, maps and programs.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from bpfilter import ir
from bpfilter.compiler import Compilation, CompiledStage
from bpfilter.loader.objects import Map, Object, Program

# The maps a stage program owns: pinned with it, so a running ruleset can be read later.
STAGE_MAPS = ("bf_counters", "bf_ifmatch", "bf_limits", "bf_log", "bf_prefixes", "bf_exact",
              "bf_local")
RT_TABLE_LOCAL, RTN_LOCAL, RTN_BROADCAST = 255, 2, 3


def local_destinations() -> list[tuple[int, int]]:
    """(address, prefix length) of the local and broadcast routes of the current network
    namespace's `local` table: where the kernel delivers packets to INPUT."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_LOCAL)
    found = []
    for route in routes:
        if route["type"] in (RTN_LOCAL, RTN_BROADCAST):
            dst = route.get_attr("RTA_DST")
            if dst is not None:
                found.append((int(ipaddress.IPv4Address(dst)), route["dst_len"]))
    return found



def slot_counters(counters: Map, slot: int) -> ir.Counters:
    """A rule's counters from a bf_counters map, summed over CPUs."""
    packets = byte_count = 0
    for value in counters.lookup_percpu(struct.pack("<I", slot)):
        p, b = struct.unpack("<QQ", value)
        packets += p
        byte_count += b
    return ir.Counters(packets, byte_count)


def interface_bits(patterns: tuple[ir.InterfaceMatch, ...],
                   interfaces: Optional[list[tuple[int, str]]] = None) -> dict[int, int]:
    """ifindex -> bitmask of the patterns its name matches, for the bf_ifmatch map."""
    if interfaces is None:
        interfaces = socket.if_nameindex()
    bits = {}
    for index, name in interfaces:
        mask = sum(1 << k for k, p in enumerate(patterns) if p.matches(name))
        if mask:
            bits[index] = mask
    return bits


@dataclass
class LoadedStage:
    compiled: CompiledStage
    obj: Object

    @property
    def program(self) -> Program:
        return self.obj.programs[self.compiled.program.name]

    def fill_interfaces(self, interfaces: Optional[list[tuple[int, str]]] = None) -> None:
        ifmatch = self.obj.map("bf_ifmatch")
        for key in list(ifmatch.keys()):
            ifmatch.delete(key)
        for index, mask in interface_bits(self.compiled.program.if_patterns,
                                          interfaces).items():
            ifmatch.update(struct.pack("<I", index), struct.pack("<Q", mask))

    def fill_local(self) -> None:
        local = self.obj.map("bf_local")
        for address, length in local_destinations():
            local.update(struct.pack("<I", length) + struct.pack(">I", address), b"\x01")

    def fill_prefixes(self) -> None:
        prefixes = self.obj.map("bf_prefixes")
        for run, network, slot in self.compiled.program.prefixes:
            key = (struct.pack("<I", 16 + network.prefixlen) + struct.pack(">H", run)
                   + network.network_address.packed)
            prefixes.update(key, struct.pack("<I", slot))
        exact = self.obj.map("bf_exact")
        for run, address, slot in self.compiled.program.exact:
            exact.update(struct.pack("<II", run, address), struct.pack("<I", slot))

    def counters(self, slot: int) -> ir.Counters:
        return slot_counters(self.obj.map("bf_counters"), slot)


class LoadedRuleset:
    """Every stage of a compilation loaded (not attached). Close it, or use `with`."""

    def __init__(self, compilation: Compilation,
                 interfaces: Optional[list[tuple[int, str]]] = None):
        self.compilation = compilation
        self.stages: dict[ir.Hook, LoadedStage] = {}
        try:
            for compiled in compilation.stages:
                stage = LoadedStage(compiled, Object(compiled.object_path))
                self.stages[compiled.stage.hook] = stage
                stage.fill_interfaces(interfaces)
                stage.fill_prefixes()
                stage.fill_local()
        except BaseException:
            self.close()
            raise

    def counters(self, table: str, chain: str, index: int) -> ir.Counters:
        """Counters of a rule (index -1: the chain policy), summed over stages and CPUs."""
        slot = self.compilation.slots.get((table, chain, index))
        total = ir.Counters()
        if slot is None:
            return total
        for stage in self.stages.values():
            c = stage.counters(slot)
            total = ir.Counters(total.packets + c.packets, total.bytes + c.bytes)
        return total

    def close(self) -> None:
        for stage in self.stages.values():
            stage.obj.close()
        self.stages.clear()

    def __enter__(self) -> "LoadedRuleset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
