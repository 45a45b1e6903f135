"""One change at a time per network namespace.

Applies, detaches and clean-ups of one namespace share its connection table and the
directory of its pins, and each reads what runs before it changes it: two at once would
both replace the same program, one of them lost and its generation left pinned. They take
the namespace's lock (flock: the kernel drops it with the process, however it ends); the
holder's pid and command are in the lock file, for the message of the one that waits.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from bpfilter.errors import KernelError
from bpfilter.runtime import state

WAIT_S = 300.0  # an apply of a large ruleset compiles for seconds; a stuck one is a bug


def _path(netns: int):
    return state.ROOT / "locks" / f"{netns}.lock"


def holder(netns: int) -> str:
    """Who holds (or last held) the namespace's lock: 'pid N (command)'."""
    try:
        return _path(netns).read_text().strip() or "another bpfilter"
    except FileNotFoundError:
        return "another bpfilter"


def _take(fd: int, blocking: bool) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextmanager
def held(netns: int, what: str, waiting: Callable[[str], None] = lambda _msg: None,
         wait_s: float = WAIT_S) -> Iterator[None]:
    """Hold the namespace's lock for `what` (an apply, a detach); `waiting` is told once
    when another holds it, and the wait ends with an error after `wait_s`."""
    path = _path(netns)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _take(fd, False):
            waiting(f"waiting for {holder(netns)} to finish with this network namespace")
            deadline = time.monotonic() + wait_s
            while not _take(fd, False):
                if time.monotonic() > deadline:
                    raise KernelError(f"{holder(netns)} has held this network namespace's "
                                      f"bpfilter lock for over {wait_s:.0f} s; not waiting "
                                      "longer")
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what}: {' '.join(sys.argv[:4])})\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def if_free(netns: int) -> Iterator[bool]:
    """The lock if nobody holds it (True), else nothing (False): for readers, which
    settle what an interrupted apply left only when no apply is under way."""
    path = _path(netns)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield _take(fd, False)
    finally:
        os.close(fd)
