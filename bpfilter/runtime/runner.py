"""A compiled ruleset loaded into the kernel: its maps filled, its rules' counters readable.

This is the glue between the IR (interface patterns, counter slots) and the loader, which
knows only objects, maps and programs.
"""

from __future__ import annotations

import struct
from typing import Optional

from bpfilter import ir
from bpfilter.compiler import Compilation
from bpfilter.loader.objects import Map, Object, Program
from bpfilter.runtime import hostview

# The maps a stage program owns: pinned with it, so a running ruleset can be read later.
CLASSIFIER_MAPS = ("bf_cls_bits", "bf_cls_proto", "bf_cls_sport", "bf_cls_dport",
                   "bf_cls_saddr", "bf_cls_daddr", "bf_cls_entries", "bf_cls_segments")
STAGE_MAPS = ("bf_counters", "bf_ifmatch", "bf_ifmac", "bf_limits", "bf_log",
              "bf_prefixes", "bf_prefixes6", "bf_exact", "bf_local", "bf_local6", "bf_gen",
              "bf_host", "bf_sysctl", "bf_route6", "bf_addrtype", "bf_ifaddr")
# The service map (templates/services.h), in programs that have service runs.
SERVICE_MAPS = ("bf_svc", "bf_svc_ep")
# -m recent's lists (templates/recent.h), in programs that have them.
RECENT_MAPS = ("bf_recent_lists",)
# The connection table (templates/conntrack.h) and its NAT bindings (templates/nat.h): one
# per network namespace.
CONNTRACK_MAPS = ("bf_conntrack", "bf_ct_created", "bf_nat", "bf_nat_src")
# The maps that hold two generations (see templates/bpfilter.h).
GENERATION_MAPS = ("bf_counters", "bf_limits", "bf_prefixes", "bf_prefixes6", "bf_exact")
# The maps of folded runs (templates/bpfilter.h).
FOLDED_MAPS = ("bf_prefixes", "bf_prefixes6", "bf_exact")


def stage_maps(program) -> tuple[str, ...]:
    """The maps a stage program owns: pinned with it, so a running ruleset can be read
    and rewritten later (the classifier's exist only in programs that classify)."""
    return STAGE_MAPS + _optional_maps(program) + \
        (RECENT_MAPS if program.recent_lists else ())


def generation_maps(program) -> tuple[str, ...]:
    return GENERATION_MAPS + _optional_maps(program)


def _optional_maps(program) -> tuple[str, ...]:
    return ((CLASSIFIER_MAPS if program.classifier is not None else ())
            + (SERVICE_MAPS if program.services.keys else ()))


def slot_counters(counters: Map, slot: int, gen: int = 0) -> ir.Counters:
    """A rule's counters from a bf_counters map, summed over CPUs."""
    packets = byte_count = 0
    index = slot + gen * (counters.max_entries // 2)
    for value in counters.lookup_percpu(struct.pack("<I", index)):
        p, b = struct.unpack("<QQ", value)
        packets += p
        byte_count += b
    return ir.Counters(packets, byte_count)


def _prefix_key(run: int, network: ir.IPNetwork, gen: int) -> bytes:
    return (struct.pack("<I", 16 + network.prefixlen) + struct.pack(">H", run | gen << 15)
            + network.network_address.packed)


def fill_folded(program, maps: dict[str, Map], gen: int) -> None:
    """Write the folded runs' entries of one generation (maps: FOLDED_MAPS by name)."""
    for run, network, slot in program.prefixes:
        trie = maps["bf_prefixes6" if network.version == 6 else "bf_prefixes"]
        trie.update(_prefix_key(run, network, gen), struct.pack("<I", slot))
    for run, address, slot in program.exact:
        maps["bf_exact"].update(struct.pack("<II", run | gen << 16, address),
                                struct.pack("<I", slot))


def _fill_array(table: Map, gen: int, rows: list[bytes]) -> None:
    """Rows 0.. of one generation's half of an array map."""
    first = gen * (table.max_entries // 2)
    keys = b"".join(struct.pack("<I", first + i) for i in range(len(rows)))
    table.update_many(keys, b"".join(rows), len(rows))


def fill_classifier(program, maps: dict[str, Map], gen: int) -> None:
    """Write one generation of the classifier's tables (templates/classify.h)."""
    tables = program.classifier
    if tables is None:
        return
    words = program.classifier_sizes["words"]
    _fill_array(maps["bf_cls_bits"], gen,
                [bits.to_bytes(words * 8, "little") for bits in tables.bitsets])
    for name, classes in (("bf_cls_proto", tables.proto), ("bf_cls_sport", tables.sport),
                          ("bf_cls_dport", tables.dport)):
        _fill_array(maps[name], gen, [struct.pack("<I", c) for c in classes])
    for name, rows in (("bf_cls_saddr", tables.saddr), ("bf_cls_daddr", tables.daddr)):
        for address, length, cls in rows:
            maps[name].update(struct.pack("<II", 32 + length, gen) + struct.pack(">I", address),
                              struct.pack("<I", cls))
    _fill_array(maps["bf_cls_entries"], gen, list(tables.entries))
    _fill_array(maps["bf_cls_segments"], gen,
                [struct.pack("<II", start, end) for start, end in tables.segments])


def fill_services(program, maps: dict[str, Map], gen: int) -> None:
    """Write one generation of the service map (templates/services.h)."""
    tables = program.services
    if not tables.keys:
        return
    for run, address, port, protocol, value in tables.keys:
        maps["bf_svc"].update(struct.pack("<IIII", run | gen << 16, address, port, protocol),
                              value)
    _fill_array(maps["bf_svc_ep"], gen, list(tables.endpoints))


def clear_generation(maps: dict[str, Map], gen: int) -> None:
    """Empty one generation: its folded-run entries go, its counters and buckets zeroed."""
    trees = [(name, lambda k: (struct.unpack(">H", k[4:6])[0] >> 15))
             for name in ("bf_prefixes", "bf_prefixes6")]
    trees += [(name, lambda k: struct.unpack("<I", k[:4])[0] >> 16)
              for name in ("bf_exact", "bf_svc") if name in maps]
    # The classifier's arrays are rewritten whole or read only where the tables reach.
    trees += [(name, lambda k: struct.unpack("<I", k[4:8])[0])
              for name in ("bf_cls_saddr", "bf_cls_daddr") if name in maps]
    for name, gen_of in trees:
        for key in [k for k in maps[name].keys() if gen_of(k) == gen]:
            maps[name].delete(key)
    for name in ("bf_counters", "bf_limits"):
        table = maps[name]
        half = table.max_entries // 2
        zero = bytes(len(table.lookup(struct.pack("<I", 0)) or b""))
        for index in range(gen * half, (gen + 1) * half):
            table.update(struct.pack("<I", index), zero)


class LoadedRuleset:
    """A compilation's programs loaded (not attached), its maps filled. The first object
    (the ingress program's) owns the ruleset's maps; the others use them. Close it, or use
    `with`."""

    def __init__(self, compilation: Compilation,
                 interfaces: Optional[list[tuple[int, str]]] = None,
                 conntrack: Optional[dict[str, int]] = None):
        """`conntrack`: the connection table's maps (name -> fd) to use, if the ruleset
        reads the state (else it has its own, as in tests)."""
        self.compilation = compilation
        self.code = compilation.code
        self.objects: dict[str, Object] = {}  # by program name, the ingress one first
        shared = dict(conntrack or {}) if self.code.conntrack else {}
        try:
            for compiled in compilation.programs:
                obj = Object(compiled.object_path, shared=shared)
                self.objects[compiled.source.name] = obj
                if len(self.objects) == 1:
                    self._fill(interfaces)
                    shared = {name: obj.map(name).fd for name in self.shared_maps()}
        except BaseException:
            self.close()
            raise

    def shared_maps(self) -> tuple[str, ...]:
        """Every map the programs share: the ruleset's, and the connection table."""
        return stage_maps(self.code) + (CONNTRACK_MAPS if self.code.conntrack else ())

    def program(self, name: Optional[str] = None) -> Program:
        """A program by name; the ingress one by default."""
        name = name or self.code.name
        return self.objects[name].programs[name]

    def map(self, name: str) -> Map:
        return next(iter(self.objects.values())).map(name)

    def _fill(self, interfaces: Optional[list[tuple[int, str]]]) -> None:
        hostview.write({name: self.map(name) for name in hostview.MAPS},
                       hostview.read(interfaces), self.code.if_patterns)
        fill_folded(self.code, {name: self.map(name) for name in FOLDED_MAPS}, gen=0)
        if self.code.classifier is not None:
            fill_classifier(self.code, {name: self.map(name) for name in CLASSIFIER_MAPS},
                            gen=0)
        fill_services(self.code, {name: self.map(name) for name in _optional_maps(self.code)},
                      gen=0)

    def counters(self, table: str, chain: str, index: int) -> ir.Counters:
        """Counters of a rule (index -1: the chain policy), summed over CPUs."""
        slot = self.compilation.slots.get((table, chain, index))
        if slot is None:
            return ir.Counters()
        return slot_counters(self.map("bf_counters"), slot)

    def close(self) -> None:
        for obj in reversed(self.objects.values()):
            obj.close()
        self.objects.clear()

    def __enter__(self) -> "LoadedRuleset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
