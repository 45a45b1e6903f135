"""Mirror pairs shared by the conformance modules: one per module and attach point."""

from __future__ import annotations

from typing import Iterator

import pytest

from bpfilter.codegen import Attach
from bpfilter.passes import classify
from tests.conformance.harness import MirrorPair, listening_pair
from tests.conformance.nat_flows import FarPeers


def _mirror(request, tmp_path_factory, attach: Attach):
    from tests.conftest import need_kernel

    need_kernel()
    name = request.module.__name__.rsplit(".", 1)[-1]
    pair = MirrorPair(tmp_path_factory.mktemp(f"{name}-{attach.value}"), attach)
    yield pair
    pair.print_table()
    pair.close()


@pytest.fixture(scope="module")
def mirror(request, tmp_path_factory):
    yield from _mirror(request, tmp_path_factory, Attach.XDP)


@pytest.fixture(scope="module")
def tc_mirror(request, tmp_path_factory):
    yield from _mirror(request, tmp_path_factory, Attach.TC)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """Mirrors whose servers route on to a far namespace (bpfilter on both interfaces)."""
    from tests.conftest import need_kernel

    need_kernel()
    pair = MirrorPair(tmp_path_factory.mktemp("forward"), Attach.XDP, forward=True)
    yield pair
    pair.print_table()
    pair.close()


@pytest.fixture(scope="module", params=list(Attach), ids=[a.value for a in Attach])
def sender(request, tmp_path_factory):
    """Mirrors whose servers send packets themselves; at either attach point of the
    ingress program, which tracks the answers."""
    from tests.conftest import need_kernel

    need_kernel()
    pair = MirrorPair(tmp_path_factory.mktemp(f"output-{request.param.value}"),
                      request.param)
    yield pair
    pair.print_table()
    pair.close()


@pytest.fixture(params=["code", "data"])
def as_data(request, monkeypatch):
    """Both ways bpfilter compiles a chain: straight-line code, and classifier data
    (forced here even for small rulesets, which would otherwise stay code)."""
    if request.param == "data":
        monkeypatch.setattr(classify, "CLASSIFY_MIN", 0)
        monkeypatch.setattr(classify, "SEGMENT_MIN", 1)
    return request.param


@pytest.fixture(scope="module", params=[Attach.XDP, Attach.TC], ids=["xdp", "tc"])
def nat_router(request, tmp_path_factory) -> Iterator[MirrorPair]:
    """Mirror routers, bpfilter at XDP (direct writes, checksums by hand) or at TC ingress
    (the kernel's helpers) on both interfaces; TC egress translates replies either way."""
    from tests.conftest import need_kernel

    need_kernel()
    with listening_pair(tmp_path_factory.mktemp(f"nat-{request.param.value}"), forward=True,
                        attach=request.param) as pair:
        yield pair


@pytest.fixture(scope="module")
def far_peers(nat_router) -> Iterator[FarPeers]:
    peers = FarPeers(nat_router)
    try:
        yield peers
    finally:
        peers.close()
