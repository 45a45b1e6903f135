"""The watcher: one small resident process per network namespace that runs a ruleset,
keeping the programs' view of the host (runtime/hostview.py) equal to the kernel's.

`apply` starts it (`ensure`) and returns once it has synced. It listens to rtnetlink
(links, IPv4 and IPv6 addresses and routes): any message, or a lost one (ENOBUFS), means
"read the kernel again", so every running ruleset of the namespace gets the differences
within milliseconds. Every CHECK_S it also resyncs, and leaves when the namespace runs no
ruleset any more, or when nothing but itself holds the namespace (it was deleted: its
rulesets' pins and state go with it, so a later namespace that reuses the inode starts
clean). Its status (pid, syncs, changes, last error) is in watchers/<netns>.json.

Run as `python -m bpfilter.runtime.watcher`, in the namespace it watches.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from bpfilter.errors import KernelError
from bpfilter.runtime import conntable, hostview, namespaces, state

# RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE
GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400
CHECK_S = 2.0
READY_TIMEOUT_S = 15.0


@dataclass
class Status:
    pid: int
    netns: int
    cookie: int
    started: str
    syncs: int = 0
    changes: int = 0
    last_sync: str = ""
    error: str = ""  # the last sync's failure, "" when it succeeded


def _dir() -> Path:
    return state.ROOT / "watchers"


def lock_path(netns: int) -> Path:
    return _dir() / f"{netns}.lock"


def status_path(netns: int) -> Path:
    return _dir() / f"{netns}.json"


def _try_lock(netns: int) -> Optional[int]:
    """The watcher's lock, held for its lifetime: an fd, or None when one runs."""
    _dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(netns), os.O_RDWR | os.O_CREAT, 0o644)
    return _locked(fd)


def _locked(fd: int) -> Optional[int]:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def running(netns: int) -> Optional[Status]:
    """The namespace's watcher, if one runs."""
    try:
        fd = _locked(os.open(lock_path(netns), os.O_RDWR))
    except FileNotFoundError:
        return None
    if fd is not None:
        os.close(fd)
        return None
    try:
        return Status(**json.loads(status_path(netns).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return Status(pid=0, netns=netns, cookie=0, started="")  # starting


def ensure() -> Status:
    """Start the current namespace's watcher unless one runs; return once it has synced
    every running ruleset of the namespace."""
    netns = state.netns_id()
    found = running(netns)
    if found is not None:
        return found
    _dir().mkdir(parents=True, exist_ok=True)
    log = open(_dir() / f"{netns}.log", "ab")
    try:
        child = subprocess.Popen([sys.executable, "-m", "bpfilter.runtime.watcher"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=log, start_new_session=True, close_fds=True)
    finally:
        log.close()
    ready, _, _ = select.select([child.stdout], [], [], READY_TIMEOUT_S)
    line = child.stdout.readline() if ready else b""
    child.stdout.close()
    if line.strip() != b"ready":
        raise KernelError("the watcher that keeps local addresses and interfaces up to date "
                          f"did not start (see {_dir() / f'{netns}.log'}): addresses "
                          "added or removed after this apply are NOT followed")
    return running(netns) or Status(pid=child.pid, netns=netns, cookie=0, started="")


def _drain(sock: socket.socket) -> None:
    """Read every queued message: any says 'changed'; an overflow (ENOBUFS) too."""
    while True:
        try:
            sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise


class Watcher:
    def __init__(self, netns: int, status: Status):
        self.netns = netns
        self.status = status
        self.addresses: Optional[set[int]] = None  # the host's, at the last sync

    def sync(self) -> None:
        """Every running ruleset of the namespace, to one fresh view of the kernel; the
        connections MASQUERADE gave an address that has gone (or whose interface was set
        down) are forgotten."""
        try:
            view = hostview.read()
            now = hostview.addresses(view, hostview.down_links())
            gone = (self.addresses or set()) - now
            self.addresses = now
            running = next(iter(state.deployments()), None)  # the namespace's one table
            if running is not None:
                conntable.forget_masqueraded_at(running[0], gone)
            for paths, deployment in state.deployments():
                if paths.generation(deployment.generation).exists():
                    try:
                        self.status.changes += hostview.sync(paths, deployment, view)
                    except FileNotFoundError:
                        pass  # replaced meanwhile: the apply synced the new one itself
            self.status.error = ""
        except (KernelError, OSError) as exc:
            self.status.error = str(exc)
            print(f"{state.now()} {exc}", file=sys.stderr, flush=True)
        self.status.syncs += 1
        self.status.last_sync = state.now()
        tmp = status_path(self.netns).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.status)))
        tmp.replace(status_path(self.netns))

    def done(self) -> bool:
        """Nothing to watch any more: no ruleset, or the namespace is gone but for us."""
        if not any(True for _ in state.deployments()):
            return True
        if namespaces.held_by_others(self.netns):
            return False
        print(f"{state.now()} namespace {self.netns} deleted: removing its rulesets' state",
              file=sys.stderr, flush=True)
        for paths, _deployment in list(state.deployments()):
            state.remove_tree(paths.pins)
            state.remove_tree(paths.meta)
        state.remove_tree(state.bpffs() / str(self.netns))
        state.remove_tree(state.ROOT / "state" / str(self.netns))
        return True


def main() -> int:
    netns = state.netns_id()
    lock = _try_lock(netns)
    if lock is None:  # another one started meanwhile
        print("ready", flush=True)
        return 0
    status = Status(pid=os.getpid(), netns=netns, cookie=namespaces.cookie(),
                    started=state.now())
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, GROUPS))  # before the first read: no change falls between the two
    watcher = Watcher(netns, status)
    watcher.sync()
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    next_check = time.monotonic() + CHECK_S
    try:
        while True:
            if select.select([sock], [], [], max(0.0, next_check - time.monotonic()))[0]:
                _drain(sock)
                watcher.sync()
            if time.monotonic() >= next_check:
                if watcher.done():
                    return 0
                watcher.sync()
                next_check = time.monotonic() + CHECK_S
    finally:
        # Unlinked before the lock goes: a process that opened the old file gets the lock
        # and starts a new watcher, as it would have anyway.
        for path in (status_path(netns), lock_path(netns), _dir() / f"{netns}.log"):
            path.unlink(missing_ok=True)
        os.close(lock)


if __name__ == "__main__":
    raise SystemExit(main())
