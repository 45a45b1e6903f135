"""Where a running ruleset lives between commands: pins in a bpffs, records beside it.

Each interface of each network namespace has a directory of pins (the XDP link, and per
generation the program and its maps) and one of records. A record is what `list` and
`save` need (the ruleset text, the counter slots, ...), in a directory of its own; the
`current` link names the record of what runs, and moves in one rename. An apply writes its
record before it switches the kernel and moves `current` after: a record that `current`
does not name is one an apply left behind, which runtime/reconcile.py settles against
what the kernel runs.

The bpffs is mounted under /run, not /sys/fs/bpf, because `ip netns exec` remounts /sys
and would hide it; and it must be mounted where it outlives the command (see bpffs()).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional

from bpfilter.errors import KernelError

ROOT = Path(os.environ.get("BPFILTER_STATE", "/run/bpfilter"))


def netns_id() -> int:
    """The current thread's network namespace (its inode), which scopes interface names."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def _bpf_mounted(mountinfo: str, path: Path) -> bool:
    try:
        with open(mountinfo) as mounts:
            return any(line.split()[4] == str(path) and line.split(" - ")[1].split()[0] == "bpf"
                       for line in mounts)
    except OSError:
        return False


def _lasting_namespace() -> Optional[int]:
    """A process whose mount namespace outlives this command, when ours may not (`ip
    netns exec` runs a command in a mount namespace of its own, gone when it exits, pins
    and all): pid 1, or where its namespace cannot be read, our parent. None when we are
    in theirs."""
    ours = os.stat("/proc/self/ns/mnt").st_ino
    for pid in (1, os.getppid()):
        try:
            theirs = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except OSError:
            continue
        return None if theirs == ours else pid
    return None


_durable: Optional[Path] = None


def bpffs() -> Path:
    """The bpffs bpfilter pins into, mounted on first use where it outlives this command:
    in our mount namespace, and in the lasting one when ours is a command's own. A bpffs
    that only this command's mount namespace sees would take the pins, and with them the
    running programs, when the command exits: that is refused before anything is pinned."""
    global _durable
    pins = ROOT / "bpffs"
    if _durable == pins:
        return pins
    pins.mkdir(parents=True, exist_ok=True)
    lasting = _lasting_namespace()
    if lasting is not None and not _bpf_mounted(f"/proc/{lasting}/mountinfo", pins):
        subprocess.run(["nsenter", f"--mount=/proc/{lasting}/ns/mnt", "mount", "-t", "bpf",
                        "bpf", str(pins)], capture_output=True)
        if not _bpf_mounted(f"/proc/{lasting}/mountinfo", pins):
            raise KernelError(
                f"bpfilter's bpffs ({pins}) is not mounted outside this command's own mount "
                f"namespace (ip netns exec?) and could not be mounted there: pins made here "
                f"would vanish with the command. Mount it first: mount -t bpf bpf {pins}")
        if not _bpf_mounted("/proc/self/mountinfo", pins):
            raise KernelError(
                f"bpfilter's bpffs ({pins}) was not mounted (after a reboot?): it is now, "
                "outside this command's own mount namespace (ip netns exec), which does not "
                "see mounts made after it started. Run the command again.")
    elif not _bpf_mounted("/proc/self/mountinfo", pins):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True,
                       capture_output=True)
    _durable = pins
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
    netns_cookie: int = 0  # which namespace of this inode (runtime/namespaces.py)
    record: str = ""  # the record this was read from (set by read, not stored)
    # Map rows an apply changes in place, before it changes them: [map, key hex, old hex
    # or None, new hex or None]. Empty for a program switch, told by the link's program.
    journal: list = field(default_factory=list)

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
    def current(self) -> Path:
        """A symbolic link to the record of what runs."""
        return self.meta / "current"

    def record(self, name: str) -> Path:
        return self.meta / name


def _json(deployment: Deployment) -> str:
    # Shallow, unindented: a 10,000-rule slot table is written in milliseconds this way,
    # inside the time budget of an address edit (asdict deep-copies, indent is pure Python).
    return json.dumps({f.name: getattr(deployment, f.name) for f in fields(deployment)
                       if f.name != "record"})


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load(paths: Paths, name: str) -> Optional[Deployment]:
    try:
        fields_ = json.loads((paths.record(name) / "deployment.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    fields_["record"] = name
    return Deployment(**fields_)


def read(paths: Paths) -> Optional[Deployment]:
    """The record `current` names (as it is: runtime/reconcile.py checks it)."""
    try:
        name = os.readlink(paths.current)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _load(paths, name)


def records(paths: Paths) -> list[Deployment]:
    """Every record of the interface, `current` or not, oldest first."""
    if not paths.meta.is_dir():
        return []
    found = [_load(paths, entry.name) for entry in sorted(paths.meta.iterdir())
             if entry.name.startswith("r") and entry.is_dir()]
    return [d for d in found if d is not None]


def ruleset_text(paths: Paths, deployment: Deployment) -> str:
    """The ruleset text of a deployment's own record."""
    return (paths.record(deployment.record) / "ruleset.txt").read_bytes().decode(
        "utf-8", "surrogateescape")


def record(paths: Paths, deployment: Deployment, ruleset_text: str) -> Deployment:
    """Write a record that `current` does not name yet (an apply's, before its switch)."""
    name = f"r{time.time_ns()}"
    target = paths.record(name)
    target.mkdir(parents=True)
    deployment = Deployment(**{**{f.name: getattr(deployment, f.name)
                                  for f in fields(deployment)}, "record": name})
    # Bytes that were not UTF-8 go back out as they came in (cli.decode).
    (target / "ruleset.txt").write_bytes(ruleset_text.encode("utf-8", "surrogateescape"))
    (target / "deployment.json").write_text(_json(deployment))
    return deployment


def commit(paths: Paths, deployment: Deployment) -> None:
    """Make the deployment's record the current one (one rename), and drop the others."""
    link = paths.meta / ".current.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(deployment.record)
    link.replace(paths.current)
    for entry in paths.meta.iterdir():
        if entry.name.startswith("r") and entry.name != deployment.record:
            remove_tree(entry)


def write(paths: Paths, deployment: Deployment, ruleset_text: str) -> Deployment:
    """A record made current at once (nothing in the kernel to switch)."""
    written = record(paths, deployment, ruleset_text)
    commit(paths, written)
    return written


def remove_tree(path: Path) -> None:
    """rm -r that also works on bpffs (unlinking a pin drops its reference)."""
    if not path.exists():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)
        else:
            child.unlink()
    path.rmdir()


def namespaces() -> list[int]:
    """The namespaces (inodes) state or pins are kept for."""
    found = set()
    for base in (ROOT / "state", ROOT / "bpffs"):
        if base.is_dir():
            found |= {int(p.name) for p in base.iterdir() if p.name.isdigit()}
    return sorted(found)


def interfaces(netns: int) -> list[Paths]:
    """The interfaces of a namespace with state or pins."""
    names = set()
    for base in (ROOT / "state" / str(netns), ROOT / "bpffs" / str(netns)):
        if base.is_dir():
            names |= {p.name for p in base.iterdir() if not p.name.startswith(":")}
    return [Paths(name, netns) for name in sorted(names)]


def deployments(all_namespaces: bool = False) -> Iterator[tuple[Paths, Deployment]]:
    """The current record of each interface (of every namespace, or of ours)."""
    for netns in namespaces() if all_namespaces else [netns_id()]:
        for paths in interfaces(netns):
            deployment = read(paths)
            if deployment is not None:
                yield paths, deployment
