"""The egress half of connection tracking: a fixed program (templates/ct_egress.c) at TC
egress that records the host's own connections in the table the stage programs read.

It does not depend on the ruleset, so it is attached once per interface, the first time a
ruleset there reads the connection state, and stays through swaps with the table: flows
survive a new ruleset. `detach` removes both.
"""

from __future__ import annotations

from pathlib import Path

from bpfilter.build import build_source
from bpfilter.loader.links import Link, TcLink
from bpfilter.loader.objects import Map, Object
from bpfilter.resources import resource_dir
from bpfilter.state import Paths

PROGRAM = "bpfilter_ct_egress"
TABLE = "bf_conntrack"


def ensure_tracker(paths: Paths, ifindex: int, build_dir: Path) -> bool:
    """Attach the tracker and pin its table unless they are there; True if this call did
    (the caller removes them again if its apply fails)."""
    if paths.tracker_link.exists() and paths.conntrack.exists():
        return False
    source = (resource_dir("templates") / "ct_egress.c").read_text()
    path, _cached = build_source(PROGRAM, source, build_dir / "tracker")
    paths.pins.mkdir(parents=True, exist_ok=True)
    with Object(path) as obj:
        link = TcLink.create(ifindex, obj.programs[PROGRAM].fd, egress=True)
        try:
            obj.map(TABLE).pin(str(paths.conntrack))
            link.pin(str(paths.tracker_link))
        except BaseException:
            link.detach()
            remove_tracker(paths)
            raise
        finally:
            link.close()
    return True


def open_table(paths: Paths) -> Map:
    return Map.open_pinned(str(paths.conntrack))


def remove_tracker(paths: Paths) -> None:
    if paths.tracker_link.exists():
        link = Link.open_pinned(str(paths.tracker_link))
        try:
            link.detach()
        finally:
            link.close()
        paths.tracker_link.unlink()
    if paths.conntrack.exists():
        paths.conntrack.unlink()
