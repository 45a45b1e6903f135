"""The classifier's tables (templates/classify.h): per-field classes, their bitsets over
all entries, and the packed entries; the loader writes them into the maps."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bpfilter import ir
from bpfilter.codegen.matchers import MatchContext, ct_mask
from bpfilter.passes.classify import Classification, Entry
from bpfilter.passes.fold import PrefixRun

ENTRY_FORMAT = struct.Struct("<IIIIQQHHBBBBBBBBBBBB")  # struct bf_entry
PORTS = 65536  # and one more class: no ports readable
# Class ids 0-3: the entries a packet with at least this many L4 bytes is too short for.
_SHORT_LENGTHS = (0, 4, 8, 20)
_ACTIONS = {"none": 0, "ACCEPT": 1, "DROP": 2, "reject": 3, "return": 4, "jump": 5,
            "goto": 6, "log": 7}
_CHECK = {"iface": 1, "iface_neg": 2, "flags": 4, "flags_neg": 8, "len": 16, "len_neg": 32,
          "ttl_neg": 64, "limit": 128}
_TTL_OPS = {"eq": 1, "lt": 2, "gt": 3}
_REJECT_TCP_RESET = 0xFF
# Words one step of the walk scans (classify.h: BF_CLS_SCAN).
SCAN_WORDS = 32


@dataclass(frozen=True)
class ClassifierTables:
    """What fills the classifier maps of one generation. Class ids index `bitsets`."""

    words: int  # 64-bit words per bitset (a capacity, in the C source)
    bitsets: tuple[int, ...]
    proto: tuple[int, ...]  # class per protocol number
    sport: tuple[int, ...]  # class per port (or ICMP type << 8 | code), then "no ports"
    dport: tuple[int, ...]
    saddr: tuple[tuple[int, int, int], ...]  # (address, prefix length, class)
    daddr: tuple[tuple[int, int, int], ...]
    entries: tuple[bytes, ...]
    segments: tuple[tuple[int, int], ...]


class _Classes:
    """Class ids for distinct bitsets; ids 0-3 are the short-header classes, fixed."""

    def __init__(self, entries: tuple[Entry, ...]):
        self.bitsets = [sum(1 << i for i, e in enumerate(entries) if e.need > least)
                        for least in _SHORT_LENGTHS]
        self.ids: dict[int, int] = {}

    def id(self, bits: int) -> int:
        if bits not in self.ids:
            self.ids[bits] = len(self.bitsets)
            self.bitsets.append(bits)
        return self.ids[bits]


def _split(entries: tuple[Entry, ...], dim: str):
    """How the entries constrain `dim`: `free`, the entries that do not; `owned`, a bit
    per constraint: the entry's own bit when it has one constraint, a bit above the
    entries' when it has several (the rare entry with e.g. -s and --src-range), with
    `multi` saying which of those bits each such entry needs, and how."""
    free, negated, owned, multi = 0, 0, [], {}
    extra = len(entries)
    for i, entry in enumerate(entries):
        mine = [c for c in entry.constraints if c.dim == dim]
        if not mine:
            free |= 1 << i
        elif len(mine) == 1:
            owned.append((i, mine[0]))
            negated |= (1 << i) if mine[0].negate else 0
        else:
            multi[i] = []
            for c in mine:
                owned.append((extra, c))
                multi[i].append((extra, c.negate))
                extra += 1
    return free, negated, owned, multi


def _bits(n: int, free: int, negated: int, multi, inside: int) -> int:
    """The entries whose constraints on a field hold, given the constraint bits `inside`
    (set when the value lies in that constraint's spans, before negation)."""
    bits = free | (inside & ~negated & ((1 << n) - 1)) | (negated & ~inside)
    for i, needs in multi.items():
        if all(bool(inside >> k & 1) != negate for k, negate in needs):
            bits |= 1 << i
    return bits


def _interval_dimension(entries: tuple[Entry, ...], dim: str, size: int,
                        classes: _Classes) -> list[int]:
    """Class of every value 0..size-1, by a sweep over the constraints' boundaries."""
    free, negated, owned, multi = _split(entries, dim)
    events: dict[int, list[tuple[int, int]]] = {0: []}
    for k, c in owned:
        for lo, hi in c.spans:
            events.setdefault(lo, []).append((k, 1))
            events.setdefault(hi + 1, []).append((k, -1))
    depth: dict[int, int] = {}
    inside = 0
    out = [0] * size
    bounds = sorted(b for b in events if b < size) + [size]
    for start, stop in zip(bounds, bounds[1:]):
        for k, step in events[start]:
            depth[k] = depth.get(k, 0) + step
            inside = inside | 1 << k if depth[k] else inside & ~(1 << k)
        bits = _bits(len(entries), free, negated, multi, inside)
        out[start:stop] = [classes.id(bits)] * (stop - start)
    return out


def _prefix(lo: int, hi: int) -> tuple[int, int]:
    return lo, 33 - (hi - lo + 1).bit_length()


def _address_dimension(entries: tuple[Entry, ...], dim: str,
                       classes: _Classes) -> tuple[tuple[int, int, int], ...]:
    """An LPM entry for every prefix any constraint names, plus 0/0. An address found
    under prefix R lies in R and in none of the longer prefixes inserted, so it is inside
    exactly the constraint prefixes that contain R: one bitset per inserted prefix."""
    free, negated, owned, multi = _split(entries, dim)
    owners: dict[tuple[int, int], int] = {(0, 0): 0}
    for k, c in owned:
        for lo, hi in c.spans:
            key = _prefix(lo, hi)
            owners[key] = owners.get(key, 0) | 1 << k
    lengths = sorted({length for _addr, length in owners})
    table = []
    for addr, length in owners:
        inside = 0
        for shorter in lengths:
            if shorter > length:
                break
            mask = (0xFFFFFFFF << (32 - shorter)) & 0xFFFFFFFF
            inside |= owners.get((addr & mask, shorter), 0)
        table.append((addr, length,
                      classes.id(_bits(len(entries), free, negated, multi, inside))))
    return tuple(table)


def _entry_bytes(entry: Entry, slot: int, run: int, segment_of: dict[str, int],
                 ctx: MatchContext) -> bytes:
    """`segment_of`: the segment number of each data chain of the entry's table."""
    target = entry.target
    action, reject_with, jump = _ACTIONS["none"], 0, 0
    if isinstance(target, ir.VerdictTarget):
        action = _ACTIONS[target.verdict.value]
    elif isinstance(target, ir.RejectTarget):
        action = _ACTIONS["reject"]
        code = target.with_.icmp_code
        reject_with = _REJECT_TCP_RESET if code is None else code
    elif isinstance(target, ir.ReturnTarget):
        action = _ACTIONS["return"]
    elif isinstance(target, ir.JumpTarget):
        action = _ACTIONS["goto" if target.goto else "jump"]
        jump = segment_of[target.chain]
    elif isinstance(target, ir.LogTarget):
        action = _ACTIONS["log"]
    checks, ifbit, tcp = 0, 0, (0, 0)
    length, ttl, limit, ct = (0, 0), (0, 0), (0, 0, 0), (0, 0)
    for check in entry.checks:
        if isinstance(check, ir.InterfaceMatch):
            checks |= _CHECK["iface"] | (_CHECK["iface_neg"] if check.negate else 0)
            ifbit = ctx.if_pattern(check)
        elif isinstance(check, ir.TcpFlagsSpec):
            checks |= _CHECK["flags"] | (_CHECK["flags_neg"] if check.negate else 0)
            tcp = (check.mask, check.comp)
        elif isinstance(check, ir.LengthMatch):
            checks |= _CHECK["len"] | (_CHECK["len_neg"] if check.negate else 0)
            length = (check.length.low, check.length.high)
        elif isinstance(check, ir.TtlMatch):
            checks |= _CHECK["ttl_neg"] if check.negate else 0
            ttl = (_TTL_OPS[check.op], check.value)
        elif isinstance(check, ir.ConntrackMatch):
            ct = (ct_mask(check.states), int(check.negate))
            ctx.conntrack = True
        elif isinstance(check, ir.LimitMatch):
            checks |= _CHECK["limit"]
            limit = (ctx.limit(check), check.interval_ns, check.interval_ns * check.burst)
    fold, mask = 0, 0
    item = entry.item
    if isinstance(item, PrefixRun):
        length_ = item.uniform_length
        fold = (1 if item.direction == "src" else 2) + (0 if length_ is None else 2)
        mask = 0 if length_ is None else (0xFFFFFFFF << (32 - length_)) & 0xFFFFFFFF
        slot = run
    return ENTRY_FORMAT.pack(slot, mask, jump, limit[0], limit[1], limit[2], *length,
                             action, reject_with, entry.need, checks, ifbit, *tcp, *ttl,
                             fold, *ct)


def classifier_tables(classification: Classification, entry_slots: list[int],
                      entry_runs: list[int], ctx: MatchContext) -> ClassifierTables:
    """`entry_slots`: the counter slot of each entry's rule; `entry_runs`: the folded-run
    number of each entry that is a run (else unused)."""
    entries = classification.entries
    classes = _Classes(entries)
    proto = _interval_dimension(entries, "proto", 256, classes)
    sport = _interval_dimension(entries, "sport", PORTS, classes)
    dport = _interval_dimension(entries, "dport", PORTS, classes)
    saddr = _address_dimension(entries, "saddr", classes)
    daddr = _address_dimension(entries, "daddr", classes)
    no_ports = [classes.id(_split(entries, d)[0]) for d in ("sport", "dport")]  # free only
    segment_of: dict[str, dict[str, int]] = {}
    for (table, chain), number in classification.data_chains:
        segment_of.setdefault(table, {})[chain] = number
    tables = [s.chain[0] for s in classification.segments for _e in s.entries]
    packed = tuple(_entry_bytes(e, entry_slots[i], entry_runs[i],
                                segment_of.get(tables[i], {}), ctx)
                   for i, e in enumerate(entries))
    bounds, start = [], 0
    for segment in classification.segments:
        bounds.append((start, start + len(segment.entries)))
        start += len(segment.entries)
    return ClassifierTables(
        words=max(1, -(-len(entries) // 64)), bitsets=tuple(classes.bitsets), proto=tuple(proto),
        sport=tuple(sport + [no_ports[0]]), dport=tuple(dport + [no_ports[1]]),
        saddr=saddr, daddr=daddr, entries=packed, segments=tuple(bounds))


def walk_steps(classification: Classification) -> int:
    """The most bpf_loop steps one walk can take (classify.h), entering each segment the
    data chains' jumps lead to: per entry a step that finds it and one that tries it,
    one for each scan of 32 words that finds nothing after it, one to leave, and the walks
    of the segments its jump or goto enters. A walk that ran out would drop the packet,
    so the loop is given this many."""
    lengths = [len(s.entries) for s in classification.segments]
    by_chain = dict(classification.data_chains)
    memo: dict[int, int] = {}

    def steps(number: int) -> int:
        if number not in memo:
            segment = classification.segments[number]
            own = 3 * lengths[number] + -(-lengths[number] // (64 * SCAN_WORDS)) + 2
            memo[number] = own + sum(steps(by_chain[(segment.chain[0], e.jump)])
                                     for e in segment.entries if e.jump is not None)
        return memo[number]

    return max((steps(n) for n in range(len(lengths))), default=0)
