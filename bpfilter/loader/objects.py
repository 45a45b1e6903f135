"""BPF objects, programs and maps with explicit lifetimes (close what you open).

Modelled on cilium/ebpf: an Object owns its Programs and Maps; closing the Object closes
their file descriptors, unless something else (a pin, an attachment) holds them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from bpfilter.errors import KernelError
from bpfilter.loader.libbpf import (RING_SAMPLE_FN, MapInfo, ProgInfo, SkBuff, TestRunOpts,
                                    XdpMd, check, lib, possible_cpus, take_messages)

BPF_LOG_LEVEL1 = 1
BPF_LOG_STATS = 4
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_PERCPU_HASH = 5
_PERCPU = (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH)


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int
    mark: int = 0  # the skb's mark as the program left it (TC)


@dataclass(frozen=True)
class VerifierStats:
    processed_insns: int
    xlated_insns: int
    jited_bytes: int


class Map:
    """A map by file descriptor: of a loaded Object (which owns the fd), or opened from a
    pin (then this Map owns it: close() it)."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int,
                 max_entries: int, map_type: int, owned: bool = False):
        self.fd = fd
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.percpu = map_type in _PERCPU
        self.owned = owned

    @classmethod
    def of_object(cls, handle: int, name: str) -> "Map":
        return cls(check(lib().bpf_map__fd(handle), f"map {name}: fd"), name,
                   lib().bpf_map__key_size(handle), lib().bpf_map__value_size(handle),
                   lib().bpf_map__max_entries(handle), lib().bpf_map__type(handle))

    @classmethod
    def open_pinned(cls, path: str) -> "Map":
        fd = check(lib().bpf_obj_get(path.encode()), f"open pinned map {path}")
        info = MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
              f"map info of {path}")
        return cls(fd, info.name.decode(), info.key_size, info.value_size, info.max_entries,
                   info.type, owned=True)

    def pin(self, path: str) -> None:
        check(lib().bpf_obj_pin(self.fd, path.encode()), f"pin map {self.name} at {path}")

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _value_buffer(self) -> ctypes.Array:
        if self.percpu:
            return ctypes.create_string_buffer(((self.value_size + 7) // 8 * 8)
                                               * possible_cpus())
        return ctypes.create_string_buffer(self.value_size)

    def lookup(self, key: bytes) -> Optional[bytes]:
        """The value, or for a per-CPU map every CPU's value, padded to 8 bytes each."""
        value = self._value_buffer()
        if lib().bpf_map_lookup_elem(self.fd, key, value) < 0:
            return None
        return value.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        stride = (self.value_size + 7) // 8 * 8
        return [raw[i * stride: i * stride + self.value_size] for i in range(possible_cpus())]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        check(lib().bpf_map_update_elem(self.fd, key, value, flags),
              f"update map {self.name}")

    def update_many(self, keys: bytes, values: bytes, count: int) -> None:
        """`count` packed keys and values in one system call per 64k (BPF_MAP_UPDATE_BATCH):
        filling a map entry by entry costs a call each."""
        for start in range(0, count, 1 << 16):
            n = min(1 << 16, count - start)
            done = ctypes.c_uint32(n)
            check(lib().bpf_map_update_batch(
                self.fd, keys[start * self.key_size:(start + n) * self.key_size],
                values[start * self.value_size:(start + n) * self.value_size],
                ctypes.byref(done), None), f"batch update of map {self.name}")

    def delete(self, key: bytes) -> None:
        check(lib().bpf_map_delete_elem(self.fd, key), f"delete from map {self.name}")

    def drain_ring(self) -> list[bytes]:
        """Every record waiting in a BPF_MAP_TYPE_RINGBUF map, oldest first."""
        records: list[bytes] = []
        with RingBuffer() as ring:
            ring.add(self, records.append)
            ring.consume()
        return records

    def keys(self) -> Iterator[bytes]:
        key = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while lib().bpf_map_get_next_key(self.fd, key, nxt) == 0:
            key = ctypes.create_string_buffer(nxt.raw, self.key_size)
            yield nxt.raw


class RingBuffer:
    """Readers of BPF_MAP_TYPE_RINGBUF maps, each record handed to its map's callback.
    Reading takes the records out: two readers of one map share its records. Close it, or
    use `with`."""

    def __init__(self):
        self._ring: Optional[int] = None
        self._callbacks: list = []  # the C side holds pointers to these

    def add(self, ring_map: "Map", on_record: Callable[[bytes], None]) -> None:
        def sample(_ctx, data, size) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        callback = RING_SAMPLE_FN(sample)
        self._callbacks.append(callback)
        if self._ring is None:
            self._ring = lib().ring_buffer__new(ring_map.fd, callback, None, None)
            if not self._ring:
                raise KernelError(f"cannot open ring buffer {ring_map.name}")
        else:
            check(lib().ring_buffer__add(self._ring, ring_map.fd, callback, None),
                  f"add ring buffer {ring_map.name}")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to `timeout_ms` for records and hand them on; how many there were."""
        if self._ring is None:
            return 0
        found = lib().ring_buffer__poll(self._ring, timeout_ms)
        if found == -errno.EINTR:
            return 0  # a signal: the caller's to act on (Ctrl-C raises once this returns)
        return check(found, "poll ring buffers")

    def consume(self) -> int:
        """Hand on every waiting record without waiting."""
        if self._ring is None:
            return 0
        return check(lib().ring_buffer__consume(self._ring), "consume ring buffers")

    def close(self) -> None:
        if self._ring is not None:
            lib().ring_buffer__free(self._ring)
            self._ring = None

    def __enter__(self) -> "RingBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Program:
    def __init__(self, handle: int, name: str, log: Optional[ctypes.Array]):
        self.handle = handle
        self.name = name
        self.fd = check(lib().bpf_program__fd(handle), f"program {name}: fd")
        self._log = log

    def info(self) -> ProgInfo:
        info = ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        check(lib().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size)),
              f"program {self.name}: info")
        return info

    @functools.cached_property
    def _skb_context(self) -> bool:
        """TC programs run on an skb; asked once, tests run programs many times."""
        return self.info().type == BPF_PROG_TYPE_SCHED_CLS

    def pin(self, path: str) -> None:
        check(lib().bpf_obj_pin(self.fd, path.encode()), f"pin program {self.name} at {path}")

    def stats(self) -> VerifierStats:
        info = self.info()
        text = self._log.value.decode(errors="replace") if self._log is not None else ""
        found = re.search(r"processed (\d+) insns", text)
        return VerifierStats(int(found.group(1)) if found else 0,
                             info.xlated_prog_len // 8, info.jited_prog_len)

    def test_run(self, packet: bytes, ingress_ifindex: int = 0, repeat: int = 1,
                 flags: int = 0, out_size: Optional[int] = None,
                 mark: int = 0) -> TestRunResult:
        """Run the program on one packet with BPF_PROG_TEST_RUN, in its own context: an
        XDP frame, or an skb with `mark` that came in on `ingress_ifindex` (TC)."""
        data_in = ctypes.create_string_buffer(packet, len(packet))
        live = flags != 0
        data_out = None if live else ctypes.create_string_buffer(out_size or len(packet) + 1024)
        if self._skb_context:
            ctx = SkBuff(mark=mark, ingress_ifindex=ingress_ifindex, ifindex=ingress_ifindex)
        else:
            ctx = XdpMd(0, len(packet), 0, ingress_ifindex, 0, 0)
        opts = TestRunOpts()
        opts.sz = ctypes.sizeof(opts)
        opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
        opts.data_size_in = len(packet)
        if data_out is not None:
            opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
            opts.data_size_out = len(data_out)
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
        # The kernel hands back its whole __sk_buff or refuses (ENOSPC).
        ctx_out = SkBuff.from_buffer(ctypes.create_string_buffer(256)) \
            if self._skb_context else None
        if ctx_out is not None:
            opts.ctx_out = ctypes.addressof(ctx_out)
            opts.ctx_size_out = 256
        opts.repeat = repeat
        opts.flags = flags
        check(lib().bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)),
              f"test run of {self.name}")
        data = data_out.raw[:opts.data_size_out] if data_out is not None else b""
        return TestRunResult(opts.retval, data, opts.duration,
                             ctx_out.mark if ctx_out is not None else 0)


class Object:
    """An ELF BPF object opened and loaded into the kernel. Use as a context manager.
    `shared` names maps that already exist (name -> fd): the object uses them instead of
    creating its own, so that programs of several objects share them."""

    def __init__(self, path: Path, log_size: int = 1 << 16,
                 shared: Optional[dict[str, int]] = None):
        self.path = Path(path)
        self._handle = None
        self.programs: dict[str, Program] = {}
        self.maps: dict[str, Map] = {}
        self._shared = shared or {}
        self._load(log_size)

    def _open(self) -> int:
        handle = lib().bpf_object__open_file(str(self.path).encode(), None)
        if not handle:
            raise KernelError(f"cannot open BPF object {self.path}: {take_messages()}")
        return handle

    def _program_handles(self, handle: int) -> list[int]:
        out, prog = [], None
        while True:
            prog = lib().bpf_object__next_program(handle, prog)
            if not prog:
                return out
            out.append(prog)

    def _load(self, log_size: int) -> None:
        handle = self._open()
        for name, fd in self._shared.items():
            found = lib().bpf_object__find_map_by_name(handle, name.encode())
            if not found or lib().bpf_map__reuse_fd(found, fd) < 0:
                lib().bpf_object__close(handle)
                raise KernelError(f"cannot share map {name} with {self.path}")
        logs = {}
        for prog in self._program_handles(handle):
            logs[prog] = ctypes.create_string_buffer(log_size)
            lib().bpf_program__set_log_buf(prog, logs[prog], log_size)
            lib().bpf_program__set_log_level(prog, BPF_LOG_STATS)
        if lib().bpf_object__load(handle) < 0:
            lib().bpf_object__close(handle)
            raise KernelError(f"the verifier refused {self.path}:\n{self._verifier_log()}")
        self._handle = handle
        for prog in self._program_handles(handle):
            name = lib().bpf_program__name(prog).decode()
            self.programs[name] = Program(prog, name, logs[prog])

    def _verifier_log(self) -> str:
        """Load again with the full log, only to explain a failure."""
        take_messages()
        handle = self._open()
        size = 1 << 24
        buf = ctypes.create_string_buffer(size)
        for prog in self._program_handles(handle):
            lib().bpf_program__set_log_buf(prog, buf, size)
            lib().bpf_program__set_log_level(prog, BPF_LOG_LEVEL1)
        lib().bpf_object__load(handle)
        lib().bpf_object__close(handle)
        lines = buf.value.decode(errors="replace").splitlines() or take_messages().splitlines()
        return "\n".join(lines[-40:])

    def map(self, name: str) -> Map:
        if name not in self.maps:
            handle = lib().bpf_object__find_map_by_name(self._handle, name.encode())
            if not handle:
                raise KernelError(f"no map {name} in {self.path}")
            self.maps[name] = Map.of_object(handle, name)
        return self.maps[name]

    def close(self) -> None:
        if self._handle:
            lib().bpf_object__close(self._handle)
            self._handle = None

    def __enter__(self) -> "Object":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
