"""Addresses added to or removed from a running blocklist, in place.

When the new ruleset text differs from the running one only by address lines of a folded
run that has one prefix length (bf_exact: one hash entry per rule), the running program
already computes the new ruleset's verdicts once those entries are added to (or deleted
from) its live generation: each entry is one atomic map update, and the run's prefixes
stay disjoint (a duplicate is refused), so first-match order inside the run cannot change.
No compile, no load: the new rules get counter slots the program has room for, and the
deployment's slot table is rewritten. Anything else returns None and `apply` compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import time
from typing import Optional

from bpfilter.runtime import reconcile, state
from bpfilter.runtime.checkpoints import checkpoint
from bpfilter.frontend.iptables.edits import AddressEdit, address_edit
from bpfilter.loader.objects import Map


@dataclasses.dataclass(frozen=True)
class EditReport:
    deployment: state.Deployment
    switch_ns: int  # the map updates that made it live
    changed: int  # rules added or removed
    live_at: float  # time.perf_counter() when they were done (the state is written after)


def _run(runs: list, edit: AddressEdit) -> Optional[list]:
    """The one code run of one prefix length the edit falls into, else None."""
    n = len(edit.added) + len(edit.removed)
    found = []
    for run in runs:
        table, chain, first, last, _number, length, direction, data = run
        if (table, chain, direction) != (edit.table, edit.chain, edit.direction) or data \
                or length is None:
            continue
        k = edit.index
        if edit.added:
            before_in, after_in = first <= k - 1 <= last, first <= k <= last
            if not (before_in or after_in):
                continue
            if before_in and edit.before != edit.rest or after_in and edit.after != edit.rest:
                continue
        elif not (first <= k and k + n - 1 <= last and n < last - first + 1):
            continue
        if any(net.prefixlen != length for net in edit.added + edit.removed):
            continue
        found.append(run)
    return found[0] if len(found) == 1 else None


def _key(number: int, gen: int, network) -> bytes:
    return struct.pack("<II", number | gen << 16, int(network.network_address))


def edit_in_place(text: str, source: str, paths: state.Paths,
                  previous: state.Deployment) -> Optional[EditReport]:
    try:
        old_text = state.ruleset_text(paths, previous)
    except FileNotFoundError:
        return None
    edit = address_edit(old_text, text)
    if edit is None or len(set(edit.added)) != len(edit.added):
        return None
    run = _run(previous.runs, edit)
    if run is None:
        return None
    gen_dir = paths.generation(previous.generation)
    exact = Map.open_pinned(str(gen_dir / "bf_exact"))
    counters = Map.open_pinned(str(gen_dir / "bf_counters"))
    try:
        return _update(text, source, paths, previous, edit, run, exact, counters)
    finally:
        exact.close()
        counters.close()


def _update(text: str, source: str, paths: state.Paths, previous: state.Deployment,
            edit: AddressEdit, run: list, exact: Map, counters: Map) -> Optional[EditReport]:
    table, chain, number, gen, k = edit.table, edit.chain, run[4], previous.live_gen, edit.index
    slots = {(t, c, i): s for t, c, i, s in previous.slots}
    n = len(edit.added) or -len(edit.removed)
    if edit.added:
        free = max(slots.values(), default=-1) + 1
        if free + n > counters.max_entries // 2:
            return None  # no room for the counters: a compile sizes the program anew
        if any(exact.lookup(_key(number, gen, net)) is not None for net in edit.added):
            return None  # already in the run: overlapping rules are a compile's business
        new_slots = list(range(free, free + n))
        zero = bytes(len(counters.lookup(struct.pack("<I", 0)) or b""))
        for slot in new_slots:
            counters.update(struct.pack("<I", slot + gen * (counters.max_entries // 2)), zero)
        writes = [(_key(number, gen, net), struct.pack("<I", s))
                  for net, s in zip(edit.added, new_slots)]
    else:
        writes = [(_key(number, gen, net), None) for net in edit.removed]
        expected = [slots.get((table, chain, k + j)) for j in range(len(edit.removed))]
        if any(exact.lookup(key) != struct.pack("<I", s) for (key, _v), s in zip(writes, expected)):
            return None  # the running maps do not hold what the text says
    deployment = dataclasses.replace(
        previous, source=source, sha256=hashlib.sha256(text.encode()).hexdigest(),
        applied_at=state.now(), rules=previous.rules + n,
        slots=_shift_slots(previous.slots, table, chain, k, n,
                           new_slots if edit.added else []),
        runs=_shift_runs(previous.runs, run, k, n))
    # Written ahead, with each row's value before and after: killed half-way, the rows
    # are put back (runtime/reconcile.py).
    journal = [["bf_exact", key.hex(), _hex(exact.lookup(key)), _hex(value)]
               for key, value in writes]
    recorded = state.record(paths, dataclasses.replace(deployment, journal=journal), text)
    t0 = time.perf_counter_ns()
    try:
        for i, (key, value) in enumerate(writes):
            if value is None:
                exact.delete(key)
            else:
                exact.update(key, value)
            if i == 0:
                checkpoint("edited-one")
    except BaseException:
        reconcile.write_rows(paths, recorded, reconcile.journal_rows(recorded, old=True))
        state.remove_tree(paths.record(recorded.record))
        raise
    switch_ns = time.perf_counter_ns() - t0
    live_at = time.perf_counter()
    checkpoint("switched")
    return EditReport(state.write(paths, deployment, text), switch_ns, abs(n), live_at)


def _hex(value: Optional[bytes]) -> Optional[str]:
    return None if value is None else value.hex()


def _shift_slots(slots: list, table: str, chain: str, k: int, n: int, new: list) -> list:
    out = []
    for t, c, i, s in slots:
        if (t, c) == (table, chain) and i >= k:
            if n < 0 and i < k - n:
                continue  # removed
            i += n
        out.append([t, c, i, s])
    out += [[table, chain, k + j, s] for j, s in enumerate(new)]
    return out


def _shift_runs(runs: list, target: list, k: int, n: int) -> list:
    out = []
    for run in runs:
        table, chain, first, last, *rest = run
        if run == target:
            first, last = min(first, k), last + n
        elif (table, chain) == tuple(target[:2]) and first >= k:
            first, last = first + n, last + n
        out.append([table, chain, first, last, *rest])
    return out
