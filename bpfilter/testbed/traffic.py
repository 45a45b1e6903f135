"""An in-kernel packet generator: an XDP program that returns XDP_TX, run with
BPF_PROG_TEST_RUN in live-frames mode on the sending interface. Each repetition puts the
frame on the wire; the receiving side's XDP and stack run in the sender's context, so the
call's duration measures the whole receive path."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

from bpfilter.build import build_source
from bpfilter.loader.objects import Object
from bpfilter.resources import resource_dir

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
PROGRAM = "bpfilter_xdp_tx"
# The headers the program writes back into each repetition (templates/xdp_tx.c).
_HEAD4, _HEAD6 = 14 + 20 + 8, 14 + 40


@dataclass(frozen=True)
class Burst:
    packets: int
    seconds: float

    @property
    def mpps(self) -> float:
        return self.packets / self.seconds / 1e6


class Generator:
    """Sends frames out of an interface of the current network namespace."""

    def __init__(self, build_dir: Path):
        source = (resource_dir("templates") / "xdp_tx.c").read_text()
        path, _cached = build_source(PROGRAM, source, build_dir)
        self.obj = Object(path)

    def send(self, frame: bytes, ifindex: int, count: int, flows: bool = False) -> Burst:
        """`flows`: every packet of an IPv4 UDP frame a new flow (its source port and
        address counted up: templates/xdp_tx.c), from where the last burst stopped."""
        head = _HEAD6 if frame[12:14] == b"\x86\xdd" else _HEAD4
        table = self.obj.map("bpfilter_tx_head")
        key = struct.pack("<I", 0)
        start = struct.unpack("<I", table.lookup(key)[-4:])[0] if flows else 0
        table.update(key, struct.pack("<I", head) + frame[:head].ljust(_HEAD6 + 2, b"\0")
                     + struct.pack("<II", int(flows), start))  # (2 bytes of padding)
        start = time.perf_counter()
        self.obj.programs[PROGRAM].test_run(frame, ingress_ifindex=ifindex, repeat=count,
                                            flags=BPF_F_TEST_XDP_LIVE_FRAMES)
        return Burst(count, time.perf_counter() - start)

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
