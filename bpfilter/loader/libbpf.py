"""A thin ctypes binding of the libbpf 1.x calls bpfilter uses; nothing more."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from bpfilter.errors import KernelError

c_void_p, c_int, c_uint, c_char_p, c_size_t = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint,
                                               ctypes.c_char_p, ctypes.c_size_t)


class TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", c_void_p), ("ctx_out", c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


class XdpMd(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in (
        "data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index",
        "egress_ifindex")]


class SkBuff(ctypes.Structure):
    """The head of struct __sk_buff, as far as BPF_PROG_TEST_RUN lets a caller set it."""

    _fields_ = [(name, ctypes.c_uint32) for name in (
        "len", "pkt_type", "mark", "queue_mapping", "protocol", "vlan_present", "vlan_tci",
        "vlan_proto", "priority", "ingress_ifindex", "ifindex")]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info; the kernel fills as much as we give room for."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


class LinkInfo(ctypes.Structure):
    """struct bpf_link_info, with the union read as XDP's (ifindex first)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 60)]


class LinkCreateOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("flags", ctypes.c_uint32), ("iter_info", c_void_p),
                ("iter_info_len", ctypes.c_uint32), ("target_btf_id", ctypes.c_uint32),
                ("_union", ctypes.c_uint8 * 32)]


class LinkUpdateOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("flags", ctypes.c_uint32),
                ("old_prog_fd", ctypes.c_uint32)]


PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_SIGNATURES = {
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__set_log_level": (c_int, [c_void_p, ctypes.c_uint32]),
    "bpf_program__set_log_buf": (c_int, [c_void_p, c_void_p, c_size_t]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__reuse_fd": (c_int, [c_void_p, c_int]),
    "bpf_map__value_size": (ctypes.c_uint32, [c_void_p]),
    "bpf_map__key_size": (ctypes.c_uint32, [c_void_p]),
    "bpf_map__max_entries": (ctypes.c_uint32, [c_void_p]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_batch": (c_int, [c_int, c_void_p, c_void_p,
                                     ctypes.POINTER(ctypes.c_uint32), c_void_p]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_prog_test_run_opts": (c_int, [c_int, ctypes.POINTER(TestRunOpts)]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_xdp_attach": (c_int, [c_int, c_int, ctypes.c_uint32, c_void_p]),
    "bpf_xdp_detach": (c_int, [c_int, ctypes.c_uint32, c_void_p]),
    "bpf_xdp_query_id": (c_int, [c_int, c_int, ctypes.POINTER(ctypes.c_uint32)]),
    "bpf_prog_get_fd_by_id": (c_int, [ctypes.c_uint32]),
    "bpf_link_create": (c_int, [c_int, c_int, c_int, ctypes.POINTER(LinkCreateOpts)]),
    "bpf_link_update": (c_int, [c_int, c_int, ctypes.POINTER(LinkUpdateOpts)]),
    "bpf_link_detach": (c_int, [c_int]),
    "libbpf_num_possible_cpus": (c_int, []),
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "ring_buffer__new": (c_void_p, [c_int, c_void_p, c_void_p, c_void_p]),
    "ring_buffer__poll": (c_int, [c_void_p, c_int]),
    "ring_buffer__add": (c_int, [c_void_p, c_int, c_void_p, c_void_p]),
    "ring_buffer__consume": (c_int, [c_void_p]),
    "ring_buffer__free": (None, [c_void_p]),
}

RING_SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)

# libbpf's own messages are gathered here (not printed) so errors can quote them.
_messages: list[str] = []


@functools.cache
def lib() -> ctypes.CDLL:
    path = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        so = ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        raise KernelError(f"cannot load libbpf ({exc}); apt-get install libbpf1") from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(so, name)
        fn.restype, fn.argtypes = restype, argtypes
    libc = ctypes.CDLL(None)
    libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]

    def _print(level: int, fmt: bytes, args: int) -> int:
        buf = ctypes.create_string_buffer(4096)
        libc.vsnprintf(buf, len(buf), fmt, args)
        _messages.append(buf.value.decode(errors="replace"))
        del _messages[:-200]
        return 0

    lib.print_callback = PRINT_FN(_print)  # keep a reference for the C side
    so.libbpf_set_print(lib.print_callback)
    return so


def take_messages() -> str:
    text = "".join(_messages)
    _messages.clear()
    return text


def check(result: int, what: str) -> int:
    """libbpf returns -errno (or NULL with errno set); turn failures into KernelError."""
    if result is None or (isinstance(result, int) and result < 0):
        err = -result if isinstance(result, int) and result < 0 else ctypes.get_errno()
        raise KernelError(f"{what}: {os.strerror(err)} (errno {err})")
    return result


@functools.cache
def possible_cpus() -> int:
    return check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
