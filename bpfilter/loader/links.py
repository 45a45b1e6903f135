"""Links: attach a program to an interface (XDP, or TC ingress through tcx), pin the
attachment, replace its program atomically. A pinned link keeps the program attached
after this process exits."""

from __future__ import annotations

import ctypes
import errno
import os

from bpfilter.errors import KernelError
from bpfilter.loader.libbpf import (LinkCreateOpts, LinkInfo, LinkUpdateOpts, check, lib)
from bpfilter.loader.xdp import XdpMode

BPF_XDP = 37
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_REPLACE = 1 << 2


def program_fd(prog_id: int) -> int:
    """A descriptor of a loaded program, by id; close it."""
    return check(lib().bpf_prog_get_fd_by_id(prog_id), f"open running program {prog_id}")


class Link:
    """A link by file descriptor, whatever attaches it."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open_pinned(cls, path: str) -> "Link":
        return cls(check(lib().bpf_obj_get(path.encode()), f"open pinned link {path}"))

    def info(self) -> LinkInfo:
        info = LinkInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(lib().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size)),
              "link info")
        return info

    def replace(self, new_prog_fd: int, expected_prog_id: int) -> None:
        """Swap the program in one kernel operation, only if the old one is still there."""
        old_fd = program_fd(expected_prog_id)
        try:
            opts = LinkUpdateOpts()
            opts.sz = ctypes.sizeof(opts)
            opts.flags = BPF_F_REPLACE
            opts.old_prog_fd = old_fd
            check(lib().bpf_link_update(self.fd, new_prog_fd, ctypes.byref(opts)),
                  "replace the running program")
        finally:
            os.close(old_fd)

    def pin(self, path: str) -> None:
        check(lib().bpf_obj_pin(self.fd, path.encode()), f"pin link at {path}")

    def detach(self) -> None:
        check(lib().bpf_link_detach(self.fd), "detach link")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class XdpLink(Link):
    @classmethod
    def create(cls, ifindex: int, prog_fd: int, mode: XdpMode) -> "XdpLink":
        opts = LinkCreateOpts()
        opts.sz = ctypes.sizeof(opts)
        opts.flags = mode.flag
        fd = lib().bpf_link_create(prog_fd, ifindex, BPF_XDP, ctypes.byref(opts))
        if fd < 0:
            err = -fd
            if err == errno.EBUSY:
                raise KernelError(f"ifindex {ifindex} already has an XDP program that "
                                  "bpfilter did not attach; remove it first "
                                  "(ip link set dev IFACE xdp off)")
            if mode is XdpMode.OFFLOAD:
                raise KernelError("this NIC cannot offload XDP programs "
                                  f"({os.strerror(err)}); use --mode native or generic")
            raise KernelError(f"attach XDP ({mode.value}) to ifindex {ifindex}: "
                              f"{os.strerror(err)} (errno {err})")
        return cls(fd)


class TcLink(Link):
    @classmethod
    def create(cls, ifindex: int, prog_fd: int, egress: bool = False) -> "TcLink":
        """Attach at TC ingress (or egress) as a tcx link, after any program there."""
        fd = lib().bpf_link_create(prog_fd, ifindex,
                                   BPF_TCX_EGRESS if egress else BPF_TCX_INGRESS, None)
        if fd < 0:
            raise KernelError(f"attach TC {'egress' if egress else 'ingress'} to ifindex "
                              f"{ifindex}: {os.strerror(-fd)} (errno {-fd})")
        return cls(fd)
