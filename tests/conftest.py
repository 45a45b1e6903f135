"""Shared fixtures. Tests run against the real kernel; under BPFILTER_REQUIRE_KERNEL=1 (CI)
a test that cannot reach it fails instead of skipping."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bpfilter.testbed import netns

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
REQUIRE_KERNEL = os.environ.get("BPFILTER_REQUIRE_KERNEL") == "1"


def _kernel_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN)"
    for tool in ("clang", "bpftool", "ip", "iptables-legacy-restore", "nft",
                 "iptables-restore-translate"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "the kernel has no BTF"
    return None


def need_kernel() -> None:
    problem = _kernel_problem()
    if problem is None:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"BPFILTER_REQUIRE_KERNEL=1 but the kernel is out of reach: {problem}")
    pytest.skip(problem)


@pytest.fixture
def kernel() -> None:
    need_kernel()


@pytest.fixture
def namespace(kernel):
    """A fresh, uniquely named network namespace, deleted even if the test fails."""
    created = []

    def make(prefix: str = "bpft") -> str:
        created.append(netns.create(netns.unique_name(prefix)))
        return created[-1]

    yield make
    for name in created:
        netns.delete(name)


@pytest.fixture(scope="session")
def build_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build")
