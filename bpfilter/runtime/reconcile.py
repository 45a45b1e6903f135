"""What runs on an interface, told by the kernel, and the records made to agree with it.

The kernel's word is final: the program the pinned ingress link runs (none when the link
is gone: the device was deleted, or an apply was killed before it pinned its first link),
the generation bf_gen makes live, the rows an in-place edit wrote. An apply writes its
record before it switches (state.py), so whatever step it was killed at, one record
describes what runs: `settle` makes that one current, puts the egress program back in step
with it, and removes what the other records and generations left pinned. It runs under the
namespace's lock (runtime/lock.py), where no apply is half-way.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

from bpfilter.errors import KernelError
from bpfilter.loader.links import Link, TcLink, program_fd
from bpfilter.loader.objects import Map
from bpfilter.runtime import hostview, lock, namespaces, state, watcher


@dataclass(frozen=True)
class Running:
    """What the kernel runs on an interface, from its pinned links."""

    ingress: Optional[int]  # program id; None: nothing (see `why`)
    egress: Optional[int]
    why: str = ""


def _link_program(path, ifindex: int) -> tuple[Optional[int], str]:
    if not path.exists():
        return None, "no link pinned"
    try:
        link = Link.open_pinned(str(path))
    except KernelError as exc:
        return None, str(exc)
    try:
        info = link.info()
    finally:
        link.close()
    if info.ifindex == 0:
        return None, "its interface is gone"
    if ifindex and info.ifindex != ifindex:
        return None, f"the link is on ifindex {info.ifindex}, not {ifindex}"
    return info.prog_id, ""


def observe(paths: state.Paths, ifindex: int = 0) -> Running:
    ingress, why = _link_program(paths.link, ifindex)
    egress, _ = _link_program(paths.egress_link, ifindex)
    return Running(ingress, egress, why)


def _live_gen(paths: state.Paths, deployment: state.Deployment) -> Optional[int]:
    try:
        gen = Map.open_pinned(str(paths.generation(deployment.generation) / "bf_gen"))
    except KernelError:
        return None
    try:
        value = gen.lookup(struct.pack("<I", 0))
        return struct.unpack("<I", value)[0] & 1 if value else 0
    finally:
        gen.close()


def journal_rows(deployment: state.Deployment, old: bool) -> list:
    """[(map, key, value or None)]: each journal row's old or new value."""
    which = 2 if old else 3
    return [(row[0], bytes.fromhex(row[1]), None if row[which] is None
             else bytes.fromhex(row[which])) for row in deployment.journal]


def write_rows(paths: state.Paths, deployment: state.Deployment, rows: list) -> None:
    """Write journal rows into the deployment's generation's maps."""
    opened: dict[str, Map] = {}
    try:
        for name, key, value in rows:
            if name not in opened:
                opened[name] = Map.open_pinned(str(paths.generation(deployment.generation)
                                                   / name))
            if value is None:
                if opened[name].lookup(key) is not None:
                    opened[name].delete(key)
            else:
                opened[name].update(key, value)
    finally:
        for table in opened.values():
            table.close()


def _journal_done(paths: state.Paths, deployment: state.Deployment) -> bool:
    """Whether every row of an in-place edit holds its new value."""
    for name, key, value in journal_rows(deployment, old=False):
        table = Map.open_pinned(str(paths.generation(deployment.generation) / name))
        try:
            if table.lookup(key) != value:
                return False
        finally:
            table.close()
    return True


def _chosen(paths: state.Paths, candidates: list[state.Deployment]) -> state.Deployment:
    """Of records of the program that runs: the one whose maps are live."""
    if len(candidates) > 1:
        gen = _live_gen(paths, candidates[0])
        candidates = [c for c in candidates if c.live_gen == gen] or candidates
    edits = [c for c in candidates if c.journal]
    plain = [c for c in candidates if not c.journal]
    for edit in reversed(edits):
        if _journal_done(paths, edit):
            return edit
        # Killed half-way through its rows: put the old ones back, the record before wins.
        write_rows(paths, edit, journal_rows(edit, old=True))
    return plain[-1] if plain else candidates[-1]


def _detach(path) -> None:
    if not path.exists():
        return
    try:
        link = Link.open_pinned(str(path))
    except KernelError:
        path.unlink()
        return
    try:
        link.detach()
    except KernelError:
        pass  # defunct already: its interface is gone
    finally:
        link.close()
    path.unlink()


def forget(paths: state.Paths) -> None:
    """Nothing runs, or what does is not ours to describe: take off what is left."""
    _detach(paths.egress_link)
    _detach(paths.link)
    state.remove_tree(paths.pins)
    state.remove_tree(paths.meta)
    for parent in (paths.pins.parent, paths.meta.parent):
        if parent.exists() and not any(p for p in parent.iterdir()
                                       if p.name not in (":conntrack", ":defrag")):
            state.remove_tree(parent)


def _egress_in_step(paths: state.Paths, chosen: state.Deployment, running: Running) -> None:
    want = chosen.egress_prog_id or None
    if running.egress == want:
        return
    if want is None:
        _detach(paths.egress_link)
        return
    fd = program_fd(want)
    try:
        if running.egress is None:
            link = TcLink.create(chosen.ifindex, fd, egress=True)
            try:
                link.pin(str(paths.egress_link))
            finally:
                link.close()
        else:
            link = Link.open_pinned(str(paths.egress_link))
            try:
                link.replace(fd, running.egress)
            finally:
                link.close()
    finally:
        os.close(fd)


def settle(paths: state.Paths) -> Optional[state.Deployment]:
    """Under the namespace's lock, in the namespace: the record of what runs on the
    interface, made current, with every leftover of interrupted applies removed; None
    when nothing runs (what was left is removed too)."""
    records = state.records(paths)
    if not records and not paths.pins.exists():
        return None
    cookie = namespaces.cookie()
    ours = [r for r in records if r.netns_cookie in (0, cookie)]
    ifindex = ours[-1].ifindex if ours else 0
    running = observe(paths, ifindex)
    candidates = [r for r in ours if r.prog_id == running.ingress]
    if running.ingress is None or not candidates:
        if running.ingress is not None and not ours:
            forget(paths)  # another namespace's, of this inode: its devices are gone
            return None
        if running.ingress is not None:
            return state.read(paths)  # runs a program no record knows: say so, keep all
        forget(paths)
        return None
    chosen = _chosen(paths, candidates)
    _egress_in_step(paths, chosen, running)
    if chosen.journal:  # an edit that was done: its record, without the rows' history
        chosen = state.record(paths, dataclasses.replace(chosen, journal=[]),
                              state.ruleset_text(paths, chosen))
    state.commit(paths, chosen)
    for entry in paths.pins.iterdir():
        if entry.is_dir() and entry.name != chosen.generation:
            state.remove_tree(entry)
    return chosen


def deployments(all_namespaces: bool = False) -> Iterator[tuple[state.Paths,
                                                                 state.Deployment]]:
    """The record of what runs on each interface, settled first when no apply holds the
    namespace (an apply under way is read as it last committed). Another namespace's
    records are read as they are: `health` says whether the kernel agrees."""
    own = state.netns_id()
    for netns in state.namespaces() if all_namespaces else [own]:
        if netns != own:
            for paths in state.interfaces(netns):
                deployment = state.read(paths)
                if deployment is not None:
                    yield paths, deployment
            continue
        with lock.if_free(own) as free:
            found = [(paths, settle(paths) if free else state.read(paths))
                     for paths in state.interfaces(own)]
            found = [(paths, d) for paths, d in found if d is not None]
            if free and found and watcher.running(own) is None:
                _follow(found)
        yield from found


def _follow(found: list[tuple[state.Paths, state.Deployment]]) -> None:
    """What an apply does once live, for rulesets an apply did not see through (killed
    after its switch): their view of the host synced, the watcher started."""
    try:
        for paths, deployment in found:
            hostview.sync(paths, deployment)
        watcher.ensure()
    except KernelError:
        pass  # status says it is not followed


def health(paths: state.Paths, deployment: state.Deployment) -> str:
    """'' when the kernel runs what the record says, else what differs."""
    if paths.netns != state.netns_id() and not namespaces.alive(paths.netns):
        return "its network namespace is gone (bpfilter gc frees what it left)"
    running = observe(paths, deployment.ifindex)
    problems = []
    if running.ingress != deployment.prog_id:
        problems.append(f"ingress: {running.why}" if running.ingress is None
                        else f"ingress runs program {running.ingress}, not "
                             f"{deployment.prog_id}")
    if running.egress != (deployment.egress_prog_id or None):
        problems.append("egress: " + ("no link" if running.egress is None
                                      else f"runs program {running.egress}"))
    return "; ".join(problems)


def _leftovers(paths: state.Paths, deployment: Optional[state.Deployment]) -> int:
    """Records and pinned generations other than what runs: an interrupted apply's."""
    keep_record = deployment.record if deployment else None
    keep_gen = deployment.generation if deployment else None
    records = [r for r in state.records(paths) if r.record != keep_record]
    gens = [g for g in paths.pins.iterdir() if g.is_dir() and g.name != keep_gen] \
        if paths.pins.is_dir() else []
    return len(records) + len(gens)


def collect() -> list[str]:
    """`bpfilter gc`: what was freed, one line each. This namespace's interfaces are
    settled under its lock; another namespace's are freed when it is gone or its link
    is (deleted device), and left alone while it runs."""
    freed = []
    own = state.netns_id()
    for netns in state.namespaces():
        alive = netns == own or namespaces.alive(netns)
        for paths in state.interfaces(netns):
            where = f"netns {netns} {paths.iface}"
            deployment = state.read(paths)
            if netns == own:
                with lock.held(own, "gc"):
                    extra = _leftovers(paths, deployment)
                    settled = settle(paths)
                if settled is None:
                    freed.append(f"{where}: a ruleset whose interface is gone")
                elif extra:
                    freed.append(f"{where}: {extra} record(s) and generation(s) that "
                                 "interrupted applies left")
            elif not alive:
                forget(paths)
                freed.append(f"{where}: a ruleset of a deleted network namespace")
            elif observe(paths, deployment.ifindex if deployment else 0).ingress is None:
                forget(paths)
                freed.append(f"{where}: a ruleset whose interface is gone")
    for space in (state.ROOT / "locks").glob("*.lock"):
        if space.stem.isdigit() and int(space.stem) not in state.namespaces() \
                and not namespaces.alive(int(space.stem)):
            space.unlink(missing_ok=True)
    return freed
