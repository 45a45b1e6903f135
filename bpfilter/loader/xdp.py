"""Attaching programs at XDP on an interface, in one of the driver's modes."""

from __future__ import annotations

import enum

from bpfilter.errors import KernelError
from bpfilter.loader.libbpf import check, lib


class XdpMode(enum.Enum):
    NATIVE = "native"
    GENERIC = "generic"
    OFFLOAD = "offload"

    @property
    def flag(self) -> int:
        return {"generic": 1 << 1, "native": 1 << 2, "offload": 1 << 3}[self.value]


def xdp_attach(ifindex: int, prog_fd: int, mode: XdpMode = XdpMode.NATIVE) -> None:
    try:
        check(lib().bpf_xdp_attach(ifindex, prog_fd, mode.flag, None),
              f"attach XDP ({mode.value}) to ifindex {ifindex}")
    except KernelError as exc:
        if mode is XdpMode.OFFLOAD:
            raise KernelError(f"{exc}: this NIC cannot offload XDP programs; use "
                              "--mode native or --mode generic") from None
        raise


def xdp_detach(ifindex: int, mode: XdpMode = XdpMode.NATIVE) -> None:
    check(lib().bpf_xdp_detach(ifindex, mode.flag, None),
          f"detach XDP ({mode.value}) from ifindex {ifindex}")
