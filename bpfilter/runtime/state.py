"""Where a running ruleset lives between commands: pins in a bpffs, metadata beside it.

Each interface of each network namespace has a directory of pins (the XDP link, and per
generation the program and its maps) and one of metadata (the ruleset text and what
`list` and `save` need to name counters). The bpffs is mounted under /run, not
/sys/fs/bpf, because `ip netns exec` remounts /sys and would hide it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(os.environ.get("BPFILTER_STATE", "/run/bpfilter"))


def netns_id() -> int:
    """The current thread's network namespace (its inode), which scopes interface names."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def bpffs() -> Path:
    """The bpffs bpfilter pins into, mounted on first use."""
    pins = ROOT / "bpffs"
    pins.mkdir(parents=True, exist_ok=True)
    with open("/proc/self/mounts") as mounts:
        mounted = any(line.split()[1] == str(pins) and line.split()[2] == "bpf"
                      for line in mounts)
    if not mounted:
        subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True,
                       capture_output=True)
    return pins


# Deployment.mode of a ruleset at TC ingress; the others are XDP modes.
TC_MODE = "tc"


@dataclass
class Deployment:
    """The metadata of one interface's running ruleset."""

    iface: str
    ifindex: int
    netns: int
    mode: str  # an XDP mode, or TC_MODE
    source: str
    sha256: str
    applied_at: str
    generation: str
    program: str
    prog_id: int
    hook: str
    rules: int
    slots: list  # [table, chain, rule index (-1: policy), counter slot]
    code_digest: str = ""  # the program's identity (codegen.program.code_digest)
    live_gen: int = 0  # which generation of the maps is live
    # folded runs: [table, chain, first, last, number, length, direction, data]
    # (codegen.program.FoldedRun), for address edits in place
    runs: list = field(default_factory=list)
    egress_prog_id: int = 0  # the program at TC egress (OUTPUT, tracking), 0 if none
    conntrack: bool = False  # the ruleset reads the connection table
    # [direction, name] of each interface pattern, in bf_ifmatch's bit order
    if_patterns: list = field(default_factory=list)

    @property
    def where(self) -> str:
        return "at TC ingress" if self.mode == TC_MODE else f"in {self.mode} XDP mode"


@dataclass(frozen=True)
class Paths:
    iface: str
    netns: int

    @property
    def pins(self) -> Path:
        return bpffs() / str(self.netns) / self.iface

    @property
    def link(self) -> Path:
        return self.pins / "link"

    @property
    def conntrack(self) -> Path:
        """The connection table's maps, pinned here: one table per network namespace, as
        the kernel's, shared by every interface's programs (a forwarded connection's
        packets come in on one interface, its answers on another) and their generations.
        No interface can be named this: names cannot hold a ':'."""
        return self.pins.parent / ":conntrack"

    @property
    def egress_link(self) -> Path:
        """The link of the program at TC egress, when the ruleset has one."""
        return self.pins / "egress-link"

    def generation(self, name: str) -> Path:
        return self.pins / name

    @property
    def meta(self) -> Path:
        return ROOT / "state" / str(self.netns) / self.iface

    @property
    def deployment_file(self) -> Path:
        return self.meta / "deployment.json"

    @property
    def ruleset_file(self) -> Path:
        return self.meta / "ruleset.txt"


def _json(deployment: Deployment) -> str:
    # Shallow, unindented: a 10,000-rule slot table is written in milliseconds this way,
    # inside the time budget of an address edit (asdict deep-copies, indent is pure Python).
    return json.dumps({f.name: getattr(deployment, f.name) for f in fields(deployment)})


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(paths: Paths) -> Optional[Deployment]:
    try:
        return Deployment(**json.loads(paths.deployment_file.read_text()))
    except FileNotFoundError:
        return None


def write(paths: Paths, deployment: Deployment, ruleset_text: str) -> None:
    """Replace the metadata as a whole (rename), so readers never see half of it."""
    paths.meta.mkdir(parents=True, exist_ok=True)
    for target, content in ((paths.ruleset_file, ruleset_text),
                            (paths.deployment_file, _json(deployment))):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(content)
        tmp.replace(target)


def remove_tree(path: Path) -> None:
    """rm -r that also works on bpffs (unlinking a pin drops its reference)."""
    if not path.exists():
        return
    for child in path.iterdir():
        if child.is_dir():
            remove_tree(child)
        else:
            child.unlink()
    path.rmdir()


def deployments(all_namespaces: bool = False) -> Iterator[tuple[Paths, Deployment]]:
    base = ROOT / "state"
    if not base.exists():
        return
    spaces = [p for p in base.iterdir() if p.is_dir()] if all_namespaces \
        else [base / str(netns_id())]
    for space in spaces:
        if not space.is_dir():
            continue
        for iface_dir in sorted(space.iterdir()):
            paths = Paths(iface_dir.name, int(space.name))
            deployment = read(paths)
            if deployment is not None:
                yield paths, deployment
