"""C source -> BPF object with clang, against a vmlinux.h made from the running kernel's BTF.

Objects are cached by a hash of everything that goes into them, so recompiling an
unchanged ruleset costs a file copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bpfilter.codegen.program import code_digest, runtime_headers
from bpfilter.errors import BuildError

KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")
CLANG_FLAGS = ("-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86",
               "-Wall", "-Wno-unused-label", "-Wno-unused-function")


def cache_dir() -> Path:
    root = os.environ.get("BPFILTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bpfilter")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"{name} is not installed (apt-get install clang llvm bpftool)")
    return path


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:24]


@functools.cache
def vmlinux_header() -> Path:
    """vmlinux.h for the running kernel, generated once per distinct kernel BTF."""
    btf = KERNEL_BTF.read_bytes()
    target = cache_dir() / f"vmlinux-{_digest(btf)}" / "vmlinux.h"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([_tool("bpftool"), "btf", "dump", "file", str(KERNEL_BTF),
                              "format", "c"], capture_output=True, check=False)
        if out.returncode != 0:
            raise BuildError("bpftool could not dump the kernel BTF: "
                             + out.stderr.decode(errors="replace"))
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(out.stdout)
        tmp.replace(target)
    return target


@functools.cache
def _clang_version() -> bytes:
    return subprocess.run([_tool("clang"), "--version"], capture_output=True,
                          check=True).stdout


def build_source(name: str, source: str, out_dir: Path) -> tuple[Path, bool]:
    """Write `<name>.c` and `<name>.o` into out_dir (the C may include the runtime headers
    and vmlinux.h); returns (object, came from cache)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = runtime_headers()
    vmlinux = vmlinux_header()
    source_path = out_dir / f"{name}.c"
    source_path.write_text(source)
    for header_name, text in headers.items():
        (out_dir / header_name).write_text(text)
    # Comments do not count: a ruleset that differs only in map contents reuses the object.
    key = _digest(code_digest(source).encode(), *(t.encode() for t in headers.values()),
                  vmlinux.parent.name.encode(),
                  _clang_version(), " ".join(CLANG_FLAGS).encode())
    cached = cache_dir() / "objects" / f"{key}.o"
    target = out_dir / f"{name}.o"
    if cached.exists():
        shutil.copyfile(cached, target)
        return target, True
    with tempfile.TemporaryDirectory() as tmp:
        tmp_obj = Path(tmp) / "out.o"
        result = subprocess.run(
            [_tool("clang"), *CLANG_FLAGS, "-I", str(vmlinux.parent), "-I", str(out_dir),
             "-c", str(source_path), "-o", str(tmp_obj)],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BuildError(f"clang failed on {source_path}:\n{result.stderr}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_obj, cached)
    shutil.copyfile(cached, target)
    return target, False
