"""State that tells the truth: whatever happens to an apply (killed at any step, Ctrl-C,
another apply at the same time) and to the host (its interface or namespace deleted, no
bpffs after a reboot), `status` says what the kernel runs, exits 1 when it cannot agree,
and `gc` frees what is left. The kernel's word comes from `ip link` and `bpftool`, not
from bpfilter's own readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from scapy.layers.inet import IP, TCP

from bpfilter.cli import main
from bpfilter.runtime import deploy, state, watcher
from bpfilter.testbed import netns, SERVER_ADDR, VethBed
from examples.make_acl import acl

# A: 200 blocked hosts and an OUTPUT rule (an egress program); B: another program, with
# an egress program of its own; B_MAPS: B's program, other map data (a /24 in the run of
# /32s: the other generation is written); B_EDIT: two hosts added to B's run, in place.
A = acl(200).replace("COMMIT", "-A OUTPUT -p udp -m udp --dport 7 -j DROP\nCOMMIT")
B = acl(200).replace("COMMIT", "-A INPUT -p udp -m udp --dport 9 -j DROP\n"
                               "-A OUTPUT -p udp -m udp --dport 8 -j DROP\nCOMMIT")
_LINES = B.splitlines(keepends=True)
B_MAPS = "".join(_LINES[:100] + ["-A INPUT -s 10.99.0.0/24 -p tcp -m tcp --dport 22 -j DROP\n"]
                 + _LINES[100:])
B_EDIT = "".join(_LINES[:100] + [f"-A INPUT -s 10.99.0.{i}/32 -p tcp -m tcp --dport 22 -j DROP\n"
                                 for i in (1, 2)] + _LINES[100:])
# The steps of each kind of apply (runtime/checkpoints.py), and what runs after a kill
# there: the ruleset before or the new one.
SWITCH_STEPS = {"pinned": "before", "recorded": "before", "egress": "before",
                "switched": "new", "committed": "new"}
MAP_STEPS = {"recorded": "before", "switched": "new", "committed": "new"}
EDIT_STEPS = {"edited-one": "before", "switched": "new"}


@pytest.fixture
def bed(kernel, build_root):
    with VethBed(build_root / "bed", prefix="bpfl") as bed:
        try:
            yield bed
        finally:
            with netns.entered(bed.server):
                for paths, _d in list(state.deployments()):
                    deploy.detach(paths.iface)


def _cli(bed: VethBed, *args: str, env: dict | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess:
    """bpfilter as a user runs it: its own process, inside the server's namespace."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return subprocess.run(["ip", "netns", "exec", bed.server, "env", "COLUMNS=200", *extra,
                           sys.executable, "-m", "bpfilter", *args], input=stdin,
                          capture_output=True, text=True)


def _status(bed: VethBed) -> tuple[int, dict]:
    with netns.entered(bed.server):
        result = CliRunner().invoke(main, ["status", "--json"])
    return result.exit_code, json.loads(result.output)


def _kernel(bed: VethBed) -> tuple[int | None, set[int]]:
    """The XDP program on the server's eth0 (ip link) and every tcx program (bpftool)."""
    link = json.loads(netns.run("ip", "-j", "-d", "link", "show", "eth0",
                                netns=bed.server).stdout)[0]
    xdp = link.get("xdp", {}).get("prog", {}).get("id")
    tcx = {entry["prog_id"] for entry in json.loads(netns.run(
        "bpftool", "-j", "link", "show").stdout) if entry.get("type") in (11, "tcx")}
    return xdp, tcx


def _agrees(bed: VethBed) -> dict | None:
    """status's word, checked against the kernel's: the ruleset it says runs (or None)."""
    code, status = _status(bed)
    xdp, tcx = _kernel(bed)
    assert code == 0, status
    if not status["rulesets"]:
        assert xdp is None, f"status says nothing runs, the kernel runs XDP program {xdp}"
        return None
    (ruleset,) = status["rulesets"]
    assert ruleset["prog_id"] == xdp, (ruleset, xdp)
    assert ruleset["egress_prog_id"] in tcx | {0}, (ruleset, tcx)
    assert status["watchers"][0]["following"]
    return ruleset


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _killed_apply(bed: VethBed, tmp_path: Path, text: str, step: str,
                  action: str = "kill") -> subprocess.CompletedProcess:
    rules = tmp_path / f"{uuid.uuid4().hex}.v4"
    rules.write_text(text)
    return _cli(bed, "apply", str(rules), "-i", "eth0", "-o", str(tmp_path / "build"),
                env={"BPFILTER_CHECKPOINT": f"{step}:{action}"})


def _apply(bed: VethBed, text: str, build: Path) -> None:
    with netns.entered(bed.server):
        deploy.apply(text, "rules.v4", "eth0", build)


def _leftovers(bed: VethBed) -> tuple[int, int]:
    """Records and pinned generations of eth0: one of each while a ruleset runs."""
    with netns.entered(bed.server):
        paths = state.Paths("eth0", state.netns_id())
        gens = [g for g in paths.pins.iterdir() if g.is_dir()] if paths.pins.exists() else []
        return len(state.records(paths)), len(gens)


@pytest.mark.parametrize("before,new,steps", [
    (None, A, SWITCH_STEPS), (A, B, SWITCH_STEPS), (B, B_MAPS, MAP_STEPS),
    (B, B_EDIT, EDIT_STEPS)], ids=["first", "replace", "maps", "edit"])
def test_a_kill_at_any_step_leaves_status_equal_to_the_kernel(bed, tmp_path, before, new,
                                                              steps):
    for step, expected in steps.items():
        if before is None:
            with netns.entered(bed.server):
                for paths, _d in list(state.deployments()):
                    deploy.detach(paths.iface)
        else:
            _apply(bed, before, tmp_path / "setup")
        killed = _killed_apply(bed, tmp_path, new, step)
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        ruleset = _agrees(bed)
        runs = {None: None, _sha(A): A, _sha(B): B, _sha(B_MAPS): B_MAPS,
                _sha(B_EDIT): B_EDIT}[ruleset and ruleset["sha256"]]
        assert runs == (new if expected == "new" else before), f"killed at {step}"
        assert _leftovers(bed) == ((1, 1) if runs else (0, 0)), step
        # What it says runs is what does: B_EDIT and B_MAPS drop 10.99.0.1, the others not.
        syn = bed.frame(IP(src="10.99.0.1", dst=SERVER_ADDR) / TCP(dport=22, flags="S"))
        assert (bed.send(syn) == []) == (runs in (B_MAPS, B_EDIT)), step


def test_ctrl_c_after_the_switch_began_finishes_the_apply(bed, tmp_path):
    _apply(bed, A, tmp_path / "setup")
    early = _killed_apply(bed, tmp_path, B, "pinned", "int")
    assert early.returncode == 1 and "Aborted" in early.stderr
    assert _agrees(bed)["sha256"] == _sha(A) and _leftovers(bed) == (1, 1)
    late = _killed_apply(bed, tmp_path, B, "egress", "int")
    assert late.returncode == 0, late.stderr
    assert "the new ruleset IS live" in late.stderr
    assert _agrees(bed)["sha256"] == _sha(B) and _leftovers(bed) == (1, 1)


def test_concurrent_applies_wait_for_each_other(bed, tmp_path):
    _apply(bed, A, tmp_path / "setup")
    first_rules, second_rules = tmp_path / "first.v4", tmp_path / "second.v4"
    first_rules.write_text(B)
    second_rules.write_text(B_MAPS)
    env = os.environ | {"COLUMNS": "200"}
    cmd = ["ip", "netns", "exec", bed.server, sys.executable, "-m", "bpfilter", "apply"]
    first = subprocess.Popen(cmd + [str(first_rules), "-i", "eth0"], text=True, env=env | {
        "BPFILTER_CHECKPOINT": "pinned:sleep"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)  # the first one holds the lock, asleep after loading
    second = subprocess.run(cmd + [str(second_rules), "-i", "eth0"], text=True, env=env,
                            capture_output=True)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert second.returncode == 0, second.stderr
    assert f"waiting for pid {first.pid}" in second.stderr.replace("\n", " ")
    assert "replaced the ruleset" in out and "replaced" in second.stdout + second.stderr
    assert _agrees(bed)["sha256"] == _sha(B_MAPS)  # the one that waited came last
    assert _leftovers(bed) == (1, 1)


@pytest.mark.parametrize("text", ["", "   \n\t\n", "# Generated by iptables-save\n# none\n"],
                         ids=["empty", "blank", "comments"])
def test_input_without_tables_is_refused_unless_asked(bed, tmp_path, text):
    _apply(bed, A, tmp_path / "setup")
    refused = _cli(bed, "apply", "-", "-i", "eth0", stdin=text)
    assert refused.returncode == 2 and "holds no table" in refused.stderr
    assert "--allow-empty" in refused.stderr
    assert _agrees(bed)["sha256"] == _sha(A)
    allowed = _cli(bed, "apply", "-", "-i", "eth0", "--allow-empty", stdin=text)
    assert allowed.returncode == 0, allowed.stderr
    assert _agrees(bed)["rules"] == 0


def test_a_deleted_interface_is_no_longer_attached(bed, tmp_path):
    _apply(bed, A, tmp_path / "setup")
    with netns.entered(bed.server):
        inode = state.netns_id()
    netns.run("ip", "link", "del", "eth0", netns=bed.server)
    # From another namespace the records are read as they are: status says what differs.
    listed = CliRunner().invoke(main, ["status", "--all-namespaces", "--json"])
    mine = [r for r in json.loads(listed.output)["rulesets"] if r["netns"] == inode]
    assert listed.exit_code == 1 and mine and "interface is gone" in mine[0]["state"]
    freed = CliRunner().invoke(main, ["gc"])
    assert f"netns {inode} eth0: a ruleset whose interface is gone" in freed.output
    listed = CliRunner().invoke(main, ["status", "--all-namespaces", "--json"])
    assert not [r for r in json.loads(listed.output)["rulesets"] if r["netns"] == inode]


def test_a_deleted_namespace_leaves_nothing_behind(kernel, tmp_path):
    """With its watcher, at once; without (killed), `status` says so and `gc` frees it."""
    for watched in (True, False):
        with VethBed(tmp_path / f"bed-{watched}", prefix="bpfl") as bed:
            _apply(bed, A, tmp_path / "setup")
            with netns.entered(bed.server):
                inode = state.netns_id()
            if not watched:
                os.kill(watcher.running(inode).pid, signal.SIGKILL)
        # The bed deleted its namespaces.
        deadline = time.monotonic() + 3 * watcher.CHECK_S
        while watched and inode in state.namespaces():
            assert time.monotonic() < deadline, "the watcher kept a deleted namespace's state"
            time.sleep(0.1)
        if watched:
            continue
        listed = CliRunner().invoke(main, ["status", "--all-namespaces", "--json"])
        mine = [r for r in json.loads(listed.output)["rulesets"] if r["netns"] == inode]
        assert listed.exit_code == 1 and "namespace is gone" in mine[0]["state"]
        freed = CliRunner().invoke(main, ["gc"])
        assert f"netns {inode} eth0: a ruleset of a deleted network namespace" in freed.output
        assert inode not in state.namespaces()


def test_a_record_of_another_namespace_with_this_inode_is_not_believed(bed, tmp_path):
    """A namespace's inode is reused once it is freed: the record's cookie tells."""
    _apply(bed, A, tmp_path / "setup")
    with netns.entered(bed.server):
        paths = state.Paths("eth0", state.netns_id())
        record = paths.record(state.read(paths).record) / "deployment.json"
        fields = json.loads(record.read_text())
        record.write_text(json.dumps(fields | {"netns_cookie": fields["netns_cookie"] + 1}))
    assert _agrees(bed) is None  # not ours: nothing of it is shown, and it is taken off


def test_without_a_lasting_bpffs_apply_mounts_one_or_fails_loudly(bed, tmp_path):
    """After a reboot bpfilter's bpffs is not mounted; `ip netns exec` runs the command in
    a mount namespace of its own, where a bpffs mounted now vanishes with the command and
    the program with it. bpfilter mounts it where it lasts, and works (the host propagates
    mounts) or says to run the command again (it does not): never an apply that says
    'attached' and is gone when the command exits."""
    root = Path(f"/run/bpfilter-test-{uuid.uuid4().hex[:8]}")
    rules = tmp_path / "a.v4"
    rules.write_text(A)
    env = {"BPFILTER_STATE": str(root)}
    try:
        first = _cli(bed, "apply", str(rules), "-i", "eth0", env=env)
        if first.returncode != 0:
            assert "Run the command again" in first.stderr, first.stderr
            assert _kernel(bed)[0] is None
            first = _cli(bed, "apply", str(rules), "-i", "eth0", env=env)
        assert first.returncode == 0, first.stderr
        status = _cli(bed, "status", "--json", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        (ruleset,) = json.loads(status.stdout)["rulesets"]
        assert ruleset["prog_id"] == _kernel(bed)[0]  # still attached after the command
        assert _cli(bed, "detach", "-i", "eth0", env=env).returncode == 0
    finally:
        subprocess.run(["umount", str(root / "bpffs")], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)], capture_output=True)
