"""Network namespaces as the runtime sees them: which one this thread is in, whether a
recorded one is still that one, and whether anything but us still holds one.

State is kept per namespace inode (state.netns_id), and an inode is reused once its
namespace is freed: the namespace's cookie (SO_NETNS_COOKIE, never reused while the
system runs) tells a namespace from a later one with the same inode. A namespace is
freed when nothing holds it: no process or thread in it, no bind mount of it (`ip netns
add` makes one under /run/netns). A resident process in it (the watcher) holds it too,
so it asks whether anything else does before it stays.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h


def cookie() -> int:
    """The current thread's network namespace's cookie."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                              "little")


def _mounted(inode: int) -> bool:
    """A bind mount of the namespace (nsfs), seen from our mount namespace or pid 1's."""
    wanted = f"net:[{inode}]"
    for table in ("/proc/self/mountinfo", "/proc/1/mountinfo"):
        try:
            with open(table) as mounts:
                if any(line.split()[3] == wanted for line in mounts):
                    return True
        except OSError:
            continue
    return False


def _entered(inode: int, ignore: int) -> bool:
    """A thread of a process other than `ignore` is in the namespace."""
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*/ns/net"):
        try:
            if int(task.parts[2]) != ignore and os.stat(task).st_ino == inode:
                return True
        except (OSError, ValueError):
            continue
    return False


def held_by_others(inode: int) -> bool:
    """Whether the namespace would live on without this process."""
    return _mounted(inode) or _entered(inode, os.getpid())


def alive(inode: int) -> bool:
    """Whether a namespace of this inode exists (held by anything)."""
    return _mounted(inode) or _entered(inode, -1)
