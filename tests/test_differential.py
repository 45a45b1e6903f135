"""bpfilter against the kernel's iptables: same ruleset, same frames, same counters.

For every generated frame the per-rule counters the kernel's iptables-legacy increments
must be exactly those bpfilter's program increments (so the same rules matched and the
same one decided), and a REJECT must send the bytes the kernel sends. The program built
for TC ingress runs on every frame too, and must do what the XDP program does.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpfilter.testbed import netns
from bpfilter.codegen import Attach
from bpfilter.compiler import compile_ruleset
from bpfilter.frontend import parse_ruleset
from bpfilter.runtime.runner import LoadedRuleset
from tests.conftest import EXAMPLES
from tests.kernel_oracle import INTERFACES, KernelOracle
from tests.packets import frames, interesting

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
# What the TC program returns where the XDP program returns each of those.
AT_TC = {XDP_DROP: 2, XDP_PASS: 0, XDP_TX: 7}  # TC_ACT_SHOT, TC_ACT_OK, TC_ACT_REDIRECT

CASES = {"host-firewall.v4": 150, "user-chains.v4": 150, "acl-1000.v4": 40}
# bpfilter compiles INPUT only so far; the kernel's own replies walk OUTPUT.
NOT_COMPILED = {("filter", "OUTPUT"), ("filter", "FORWARD")}


def _bpf_counters(loaded: LoadedRuleset) -> dict[tuple[str, str, int], int]:
    return {key: loaded.counters(*key).packets
            for key in loaded.compilation.slots if key[0] == "filter"}


def _as_sent_by_a_nic(kernel_reply: bytes, ours: bytes) -> bytes:
    """The kernel's reply with what the wire would differ in taken care of.

    The kernel builds its RST with CHECKSUM_PARTIAL and veth hands the unfinished
    checksum up, where a NIC would complete it; and it picks its own IP ID. So the
    checksums are recomputed and our ID taken; every other byte must be equal."""
    packet = Ether(kernel_reply)
    packet[IP].id = Ether(ours)[IP].id
    del packet[IP].chksum
    if TCP in packet:
        del packet[TCP].chksum
    return bytes(packet)


class Differential:
    def __init__(self, name: str, make_namespace, build_root):
        text = (EXAMPLES / name).read_text()
        self.ruleset = parse_ruleset(text, name)
        self.oracle = KernelOracle(make_namespace)
        self.oracle.load(text)
        self.loaded = {}
        for attach in Attach:
            compilation = compile_ruleset(text, name, build_root / name / attach.value,
                                          verify=False, attach=attach)
            with netns.entered(self.oracle.k):  # its interfaces and local routes
                self.loaded[attach] = LoadedRuleset(compilation)

    def _run(self, attach: Attach, raw: bytes, ifindex: int):
        """The program's result, and the counters it incremented."""
        loaded = self.loaded[attach]
        before = _bpf_counters(loaded)
        with netns.entered(self.oracle.k):
            result = loaded.program().test_run(
                raw, ingress_ifindex=ifindex)
        after = _bpf_counters(loaded)
        return result, {k: after[k] - before[k] for k in after if after[k] != before[k]}

    def check(self, iface: str, frame: Ether) -> None:
        frame.dst = self.oracle.kmac[iface]
        raw = bytes(frame)
        result, ours = self._run(Attach.XDP, raw, self.oracle.ifindex[iface])
        at_tc, ours_at_tc = self._run(Attach.TC, raw, self.oracle.ifindex[iface])
        assert (at_tc.retval, ours_at_tc) == (AT_TC[result.retval], ours), (
            f"at TC {frame.summary()} on {iface} gives {at_tc.retval} {ours_at_tc}, at XDP "
            f"{result.retval} {ours}")
        kernel = self.oracle.send(iface, raw, wait_reply=0.05 if result.retval == XDP_TX
                                  else 0.0)
        theirs = {k: v for k, v in kernel.counters.items() if k[:2] not in NOT_COMPILED}
        assert ours == theirs, (
            f"counters differ for {frame.summary()} on {iface}: bpfilter {ours}, "
            f"kernel {theirs}")
        if result.retval == XDP_TX:
            src = frame[IP].src
            mine = [r for r in kernel.replies if Ether(r)[IP].dst == src]
            assert mine, f"bpfilter rejected {frame.summary()} with a reply, the kernel sent none"
            # From the EtherType on: the kernel routes its reply (here always out of eth0,
            # through a gateway); XDP answers on the ingress interface to the frame's
            # (forged) source MAC.
            expected = _as_sent_by_a_nic(mine[0], result.data)
            assert result.data[12:] == expected[12:], (
                f"REJECT reply differs for {frame.summary()}:\n"
                f"bpfilter {result.data.hex()}\nkernel   {expected.hex()}")
            assert at_tc.data == result.data, f"at TC the reply to {frame.summary()} differs"

    def close(self) -> None:
        for loaded in self.loaded.values():
            loaded.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_examples_agree_with_kernel_iptables(name, namespace, build_root):
    diff = Differential(name, namespace, build_root)
    values = interesting(diff.ruleset)

    @settings(max_examples=CASES[name], deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(frames(values, INTERFACES))
    def agree(case):
        diff.check(*case)

    try:
        agree()
    finally:
        diff.close()
