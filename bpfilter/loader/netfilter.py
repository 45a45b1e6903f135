"""A program at a netfilter hook (BPF_PROG_TYPE_NETFILTER, a BPF_NETFILTER link), here for
what its link's flag gives: the kernel's defragmentation before the hook
(BPF_F_NETFILTER_IP_DEFRAG, Linux 6.6), in the network namespace of the calling thread,
as the kernel's connection tracking asks for it. The program accepts every packet.

libbpf 1.1 knows neither the program type's section nor the link's netfilter options:
these two calls go to bpf(2) directly.
"""

from __future__ import annotations

import ctypes
import os
import struct

from bpfilter.errors import KernelError
from bpfilter.loader.links import Link

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD, _BPF_LINK_CREATE = 5, 28
_BPF_PROG_TYPE_NETFILTER, _BPF_NETFILTER = 32, 45
_BPF_F_NETFILTER_IP_DEFRAG = 1
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
_NF_INET_PRE_ROUTING = 0
# After the defragmenter (-400) and before the raw table (-300), where no table runs.
_PRIORITY = -350
# r0 = NF_ACCEPT; exit
_ACCEPT = bytes([0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise KernelError(f"{what}: {os.strerror(err)} (errno {err})")
    return fd


def _accept_all() -> int:
    insns = ctypes.create_string_buffer(_ACCEPT, len(_ACCEPT))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("<IIQQIIQII16sII", _BPF_PROG_TYPE_NETFILTER, len(_ACCEPT) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license_), 0, 0, 0, 0, 0,
                       b"bf_defrag", 0, _BPF_NETFILTER)
    return _bpf(_BPF_PROG_LOAD, attr, "load the netfilter program that asks for defrag")


def defrag_link(family: int) -> Link:
    """The kernel reassembles `family`'s fragments (NFPROTO_IPV4 or NFPROTO_IPV6) before
    PREROUTING for as long as the returned link lives (pin it)."""
    prog = _accept_all()
    try:
        attr = struct.pack("<IIIIIIiI", prog, 0, _BPF_NETFILTER, 0, family,
                           _NF_INET_PRE_ROUTING, _PRIORITY, _BPF_F_NETFILTER_IP_DEFRAG)
        return Link(_bpf(_BPF_LINK_CREATE, attr, "attach the defragmenting netfilter link"))
    finally:
        os.close(prog)
