"""Putting a ruleset live on an interface, replacing it atomically, and taking it off.

`apply` compiles, loads and verifies the new ruleset, fills its maps and pins it, and only
then makes it live in one kernel operation (the link's program is replaced, on the
condition that the program it replaces is still the one we think). The link is XDP's, in
one of its modes, or TC ingress's (tcx). Any failure before that
removes what this apply created; the running ruleset is never touched.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import signal
import socket
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from bpfilter import build, ir
from bpfilter.runtime import hostview, lock, namespaces, reconcile, state, watcher
from bpfilter.compiler import Compilation, compile_ruleset
from bpfilter.errors import KernelError
from bpfilter.runtime.checkpoints import checkpoint
from bpfilter.runtime.inplace import edit_in_place
from bpfilter.loader.links import Link, TcLink, XdpLink, program_fd
from bpfilter.codegen.program import Attach, code_digest
from bpfilter.loader.objects import Map
from bpfilter.loader.xdp import XdpMode
from bpfilter.runtime.runner import (LoadedRuleset, clear_generation, fill_classifier,
                                     fill_folded, fill_services, generation_maps,
                                     slot_counters, stage_maps)
from bpfilter.runtime.conntable import follow_defrag, open_shared, pin_table


@dataclass(frozen=True)
class ApplyReport:
    deployment: state.Deployment
    replaced: bool  # a running ruleset was swapped (else first attach)
    switch_ns: int  # the one kernel operation that made it live
    total_s: float  # from the start until live (a map-only change writes its state after)
    fallback: Optional[str] = None  # why the mode differs from the one asked for
    map_only: bool = False  # same program: only its maps were rewritten
    edited: int = 0  # addresses added or removed in place, without a compile
    warnings: tuple[str, ...] = ()  # live, but something the user must know
    interrupted: str = ""  # a signal that came once the switch had begun (it finished)


def _ifindex(iface: str) -> int:
    try:
        return socket.if_nametoindex(iface)
    except OSError:
        raise KernelError(f"no interface named {iface} in this network namespace") from None


@dataclass(frozen=True)
class _Request:
    """One `apply`: the new text, where it goes, and what runs there now."""

    text: str
    source: str
    iface: str
    ifindex: int
    paths: state.Paths
    previous: Optional[state.Deployment]
    progress: Callable[[str], None]
    started: float  # time.perf_counter()

    def described(self, compilation: Compilation) -> dict:
        """The Deployment fields that describe the new ruleset."""
        return dict(source=self.source, sha256=hashlib.sha256(self.text.encode()).hexdigest(),
                    applied_at=state.now(), rules=_rule_count(compilation),
                    slots=[[t, c, i, s] for (t, c, i), s in compilation.slots.items()],
                    runs=_runs(compilation),
                    if_patterns=[[p.direction, p.name] for p in compilation.code.if_patterns])


def apply(text: str, source: str, iface: str, build_dir: Path,
          mode: Optional[XdpMode] = None,
          progress: Callable[[str], None] = lambda _msg: None,
          compilation: Optional[Compilation] = None,
          attach: Optional[Attach] = None,
          waiting: Callable[[str], None] = lambda _msg: None) -> ApplyReport:
    """`attach` and `mode` default to where the interface's ruleset runs now, else to
    native XDP; a `compilation` given must be built for that attach point. One apply at a
    time per network namespace: `waiting` hears it when another runs. Once live, the
    ruleset's view of the host follows the kernel's (runtime/watcher.py)."""
    paths = state.Paths(iface, state.netns_id())
    with lock.held(paths.netns, f"apply on {iface}", waiting):
        report = _apply(text, source, iface, build_dir, mode, progress, compilation, attach)
        _follow_fragments(paths)
    try:
        # The watcher may have synced the replaced generation a moment ago: this one is
        # read after the switch, and any later change reaches the watcher.
        hostview.sync(paths, report.deployment)
        watcher.ensure()
    except KernelError as exc:
        return dataclasses.replace(report, warnings=report.warnings + (str(exc),))
    return report


def _apply(text: str, source: str, iface: str, build_dir: Path, mode: Optional[XdpMode],
           progress: Callable[[str], None], compilation: Optional[Compilation],
           attach: Optional[Attach]) -> ApplyReport:
    started = time.perf_counter()
    ifindex = _ifindex(iface)
    paths = state.Paths(iface, state.netns_id())
    previous = reconcile.settle(paths)
    if previous is not None and previous.ifindex != ifindex:
        reconcile.forget(paths)  # the interface was made anew under its old name
        previous = None
    req = _Request(text, source, iface, ifindex, paths, previous, progress, started)
    if attach is Attach.TC and mode is not None:
        raise KernelError("an XDP mode does not apply to a TC attachment")
    if previous is not None:
        running = Attach.TC if previous.mode == state.TC_MODE else Attach.XDP
        if (attach or running) is not running or (mode and mode.value != previous.mode):
            asked = ("at TC ingress" if attach is Attach.TC else
                     f"in {mode.value} XDP mode" if mode else "at XDP")
            raise KernelError(f"{iface} runs a ruleset {previous.where}; detach it before "
                              f"applying {asked}")
        attach = running
    attach = attach or Attach.XDP
    if previous is not None and compilation is None:
        edited = _edit(req)
        if edited is not None:
            return edited
    if compilation is None:
        progress("compiling")
        compilation = compile_ruleset(text, source, build_dir, verify=False, attach=attach)
    if previous is not None and previous.code_digest == _digest(compilation):
        progress("same program: rewriting its maps")
        report = _update_maps(req, compilation)
    else:
        progress("loading and verifying")
        shared = open_shared(paths) if compilation.code.conntrack else {}
        try:
            report = _load_and_switch(req, compilation, attach, mode,
                                      {name: m.fd for name, m in shared.items()})
        finally:
            for table in shared.values():
                table.close()
    untranslated = _without_ruleset(iface) if compilation.code.nat else []
    if untranslated:
        report = dataclasses.replace(report, warnings=report.warnings + (
            "NAT's replies are translated back only by programs of interfaces that run a "
            "ruleset; " + ", ".join(untranslated) + " run(s) none: a translated "
            "connection's packets that come in there reach the host untranslated (apply "
            "the ruleset there too)",))
    return report


def _without_ruleset(iface: str) -> list[str]:
    """The namespace's interfaces with an IPv4 address (lo aside) that run no ruleset."""
    from pyroute2 import IPRoute

    running = {paths.iface for paths, _d in reconcile.deployments()} | {iface}
    with IPRoute() as ipr:
        addressed = {a["index"] for a in ipr.get_addr(family=socket.AF_INET)}
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    return sorted(name for index, name in names.items()
                  if index in addressed and name != "lo" and name not in running)


def _edit(req: _Request) -> Optional[ApplyReport]:
    """Addresses added to or removed from a blocklist, in place; None if it is not that."""
    # No collection pass in the middle of an edit: over the 10,000 rows of a big ACL's
    # slot table it would double the time to live (measured: 10-28 ms without it, up to
    # 61 ms with it).
    collecting = gc.isenabled()
    gc.disable()
    try:
        edited = edit_in_place(req.text, req.source, req.paths, req.previous)
    finally:
        if collecting:
            gc.enable()
    if edited is None:
        return None
    return ApplyReport(edited.deployment, True, edited.switch_ns, edited.live_at - req.started,
                       map_only=True, edited=edited.changed)


def _digest(compilation: Compilation) -> str:
    """The programs' identity: their C and the runtime headers it includes (a bpfilter
    whose runtime changed swaps a running ruleset in, even where the C is the same)."""
    return code_digest(compilation.code.source + "".join(build.runtime_headers().values()))


def _attach(req: _Request, prog_fd: int, attach: Attach,
            mode: Optional[XdpMode]) -> tuple[Link, str, int, Optional[str]]:
    """The first ruleset on the interface: (link, mode as the state records it, ns the
    attach took, why the mode differs from the one asked for)."""
    t0 = time.perf_counter_ns()
    if attach is Attach.TC:
        return TcLink.create(req.ifindex, prog_fd), state.TC_MODE, \
            time.perf_counter_ns() - t0, None
    xdp_mode, fallback = mode or XdpMode.NATIVE, None
    try:
        link = XdpLink.create(req.ifindex, prog_fd, xdp_mode)
    except KernelError as exc:
        if mode is not None or "Operation not supported" not in str(exc):
            raise
        fallback = f"{req.iface} has no native XDP; running in generic mode"
        xdp_mode = XdpMode.GENERIC
        link = XdpLink.create(req.ifindex, prog_fd, xdp_mode)
    return link, xdp_mode.value, time.perf_counter_ns() - t0, fallback


def _load_and_switch(req: _Request, compilation: Compilation, attach: Attach,
                     mode: Optional[XdpMode], conntrack: dict[str, int]) -> ApplyReport:
    """Load the new programs beside the running ones and pin them, record them, then
    switch: the egress program first (it can be switched back), then the ingress one in
    one kernel operation (replace the link's program, or attach and pin the interface's
    first link), then make the record current. Killed at any step, the record written
    before the switch lets reconcile.settle tell what runs."""
    paths, previous, code = req.paths, req.previous, compilation.code
    generation = f"g{time.time_ns()}"
    gen_dir = paths.generation(generation)
    fallback, recorded, switched, link = None, None, False, None
    with LoadedRuleset(compilation, conntrack=conntrack or None) as loaded:
        undo_table = pin_table(paths, loaded) if code.conntrack else _nothing
        undo_egress = _nothing
        try:
            gen_dir.mkdir(parents=True)
            for name in loaded.objects:
                loaded.program(name).pin(str(gen_dir / name))
            for name in stage_maps(code):
                loaded.map(name).pin(str(gen_dir / name))
            checkpoint("pinned")
            req.progress("switching")
            egress = next((p.name for p in code.programs if p.egress), None)
            program = loaded.program()
            used_mode = previous.mode if previous is not None else None
            if previous is None:  # attached, but not for good until pinned
                link, used_mode, switch_ns, fallback = _attach(req, program.fd, attach, mode)
            recorded = state.record(paths, state.Deployment(
                iface=req.iface, ifindex=req.ifindex, netns=paths.netns, mode=used_mode,
                generation=generation, program=code.name, prog_id=program.info().id,
                hook=",".join(h.value for p in code.programs for h in p.hooks),
                code_digest=_digest(compilation),
                egress_prog_id=loaded.program(egress).info().id if egress else 0,
                conntrack=code.conntrack, netns_cookie=namespaces.cookie(),
                **req.described(compilation)), req.text)
            checkpoint("recorded")
            with _uninterrupted() as interrupted:
                if egress is not None:
                    undo_egress = _switch_egress(req, loaded.program(egress).fd)
                    checkpoint("egress")
                if link is None:
                    _replaced, switch_ns = _replace_pinned(paths.link, program.fd)
                else:
                    try:
                        link.pin(str(paths.link))
                    finally:
                        link.close()
                switched = True  # the ingress program is live: no way back now
                checkpoint("switched")
                state.commit(paths, recorded)
                checkpoint("committed")
        except BaseException:
            if not switched:
                undo_egress()
                if link is not None:
                    link.close()
                state.remove_tree(gen_dir)
                if recorded is not None:
                    state.remove_tree(paths.record(recorded.record))
                undo_table()
            raise
    if egress is None:
        _detach_pinned(paths.egress_link)  # nothing to do at egress any more
    if previous is not None:
        state.remove_tree(paths.generation(previous.generation))
    return ApplyReport(recorded, previous is not None, switch_ns,
                       time.perf_counter() - req.started, fallback,
                       interrupted=interrupted())


@contextmanager
def _uninterrupted() -> Iterator[Callable[[], str]]:
    """Past the point where the running ruleset changes, an apply finishes: Ctrl-C or a
    TERM only says so once the switch and its record are done (SIGKILL cannot wait; the
    record written before the switch covers it). Yields what tells the signal, if any."""
    got: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: ""
        return
    kept = {sig: signal.signal(sig, lambda number, _frame: got.append(
        signal.Signals(number).name)) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield lambda: got[0] if got else ""
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def _nothing() -> None:
    pass


def _replace_pinned(path: Path, prog_fd: int) -> tuple[int, int]:
    """Run a program at a pinned link in place of the one it runs, in one kernel
    operation: (id of the program replaced, ns the replacement took)."""
    link = Link.open_pinned(str(path))
    try:
        running = link.info().prog_id
        t0 = time.perf_counter_ns()
        link.replace(prog_fd, running)
        return running, time.perf_counter_ns() - t0
    finally:
        link.close()


def _switch_egress(req: _Request, prog_fd: int) -> Callable[[], None]:
    """Run the program at the interface's TC egress, in place of the one there; returns
    what switches back."""
    path = req.paths.egress_link
    if not path.exists():
        link = TcLink.create(req.ifindex, prog_fd, egress=True)
        try:
            link.pin(str(path))
        except BaseException:
            link.detach()
            raise
        finally:
            link.close()
        return lambda: _detach_pinned(path)
    replaced, _ns = _replace_pinned(path, prog_fd)

    def back() -> None:
        # The replaced program lives on until then: its generation's pins still hold it.
        old = program_fd(replaced)
        try:
            _replace_pinned(path, old)
        finally:
            os.close(old)
    return back


def _detach_pinned(path: Path) -> None:
    if not path.exists():
        return
    link = Link.open_pinned(str(path))
    try:
        link.detach()
    finally:
        link.close()
    path.unlink()


def _update_maps(req: _Request, compilation: Compilation) -> ApplyReport:
    """The running program stays; the other generation of its maps is written, then made
    live by one update of bf_gen, then the old generation is cleared for the next time."""
    previous = req.previous
    program = compilation.code
    gen_dir = req.paths.generation(previous.generation)
    maps = {name: Map.open_pinned(str(gen_dir / name))
            for name in (*generation_maps(program), "bf_gen")}
    recorded, switched = None, False
    try:
        new = 1 - previous.live_gen
        # Cleared first, whatever an apply killed before here left in it.
        clear_generation(maps, new)
        fill_folded(program, maps, new)
        fill_classifier(program, maps, new)
        fill_services(program, maps, new)
        recorded = state.record(req.paths, dataclasses.replace(
            previous, live_gen=new, **req.described(compilation)), req.text)
        checkpoint("recorded")
        with _uninterrupted() as interrupted:
            t0 = time.perf_counter_ns()
            maps["bf_gen"].update(struct.pack("<I", 0), struct.pack("<I", new))
            switch_ns = time.perf_counter_ns() - t0
            switched = True
            checkpoint("switched")
            state.commit(req.paths, recorded)
            checkpoint("committed")
        live_s = time.perf_counter() - req.started
    except BaseException:
        if recorded is not None and not switched:
            state.remove_tree(req.paths.record(recorded.record))
        raise
    finally:
        for table in maps.values():
            table.close()
    return ApplyReport(recorded, True, switch_ns, live_s, map_only=True,
                       interrupted=interrupted())


def _runs(compilation: Compilation) -> list:
    return [list(dataclasses.astuple(run)) for run in compilation.code.runs]


def _rule_count(compilation: Compilation) -> int:
    return sum(len(c.rules) for t in compilation.ruleset.tables for c in t.chains)


def detach(iface: str) -> state.Deployment:
    paths = state.Paths(iface, state.netns_id())
    with lock.held(paths.netns, f"detach from {iface}"):
        deployment = reconcile.settle(paths)
        if deployment is None:
            raise KernelError(f"bpfilter runs nothing on {iface}")
        reconcile.forget(paths)  # the connection table goes with the last interface
        _follow_fragments(paths)
    return deployment


def _follow_fragments(paths: state.Paths) -> None:
    """The kernel's reassembly on while a ruleset of the namespace tracks connections."""
    follow_defrag(paths, any(d.conntrack for _p, d in state.deployments()))


def running_program_id(paths: state.Paths, egress: bool = False) -> Optional[int]:
    """The program the pinned ingress (or egress) link runs now, or None if it is gone."""
    try:
        link = Link.open_pinned(str(paths.egress_link if egress else paths.link))
    except KernelError:
        return None
    try:
        return link.info().prog_id
    finally:
        link.close()


class LiveCounters:
    """Counters of a running ruleset, by (table, chain, rule index); -1 is the policy."""

    def __init__(self, paths: state.Paths, deployment: state.Deployment):
        self.slots = {(t, c, i): s for t, c, i, s in deployment.slots}
        self.map = Map.open_pinned(str(paths.generation(deployment.generation) / "bf_counters"))
        self.gen = deployment.live_gen

    def __call__(self, table: str, chain: str, index: int) -> ir.Counters:
        slot = self.slots.get((table, chain, index))
        return ir.Counters() if slot is None else slot_counters(self.map, slot, self.gen)

    def close(self) -> None:
        self.map.close()

    def __enter__(self) -> "LiveCounters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["apply", "detach", "ApplyReport", "LiveCounters", "running_program_id"]
