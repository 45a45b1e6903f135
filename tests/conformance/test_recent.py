"""-m recent against the kernel's xt_recent on mirror hosts: one ruleset whose rules
set, check, update (with --seconds and --hitcount), check by TTL, remove and mask the
lists, each answering in its own way, and a sequence of datagrams from three sources
whose every answer must be the kernel's: the lists evolve alike on both sides. ufw's
`limit` rules (examples/ufw.v4) are the same module. A mutation (a hit count off by one)
must be seen."""

from __future__ import annotations

import time

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfilter.codegen import matchers
from bpfilter.testbed import CLIENT_ADDR, SERVER_ADDR

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --dport 1 -m recent --set --name L --mask 255.255.255.255 --rsource -j DROP
-A INPUT -p udp -m udp --dport 2 -m recent --rcheck --name L --mask 255.255.255.255 --rsource -j REJECT --reject-with icmp-host-prohibited
-A INPUT -p udp -m udp --dport 3 -m recent --update --seconds 2 --hitcount 3 --name L --mask 255.255.255.255 --rsource -j REJECT --reject-with icmp-net-prohibited
-A INPUT -p udp -m udp --dport 4 -m recent --remove --name L --mask 255.255.255.255 --rsource -j REJECT --reject-with icmp-admin-prohibited
-A INPUT -p udp -m udp --dport 5 -m recent ! --rcheck --seconds 2 --name L --mask 255.255.255.255 --rsource -j REJECT --reject-with icmp-net-unreachable
-A INPUT -p udp -m udp --dport 6 -m recent --rcheck --rttl --name L --mask 255.255.255.255 --rsource -j REJECT --reject-with icmp-proto-unreachable
-A INPUT -p udp -m udp --dport 8 -m recent --set --name M --mask 255.255.255.0 --rsource -j DROP
-A INPUT -p udp -m udp --dport 9 -m recent --rcheck --name M --mask 255.255.255.0 --rsource -j REJECT --reject-with icmp-host-unreachable
-A INPUT -p udp -m udp --dport 10 -m recent --set --name D --mask 255.255.255.255 --rdest -j DROP
-A INPUT -p udp -m udp --dport 11 -m recent --rcheck --name D --mask 255.255.255.255 --rdest -j REJECT --reject-with icmp-host-prohibited
COMMIT
"""
NEAR, FAR = "192.0.2.77", "198.51.100.5"  # NEAR shares CLIENT_ADDR's /24 or not: see M
# (source, TTL, port) in order; None: wait past --seconds
STEPS = [(CLIENT_ADDR, 64, 2), (CLIENT_ADDR, 64, 1), (CLIENT_ADDR, 64, 2), (FAR, 64, 2),
         (CLIENT_ADDR, 63, 6), (CLIENT_ADDR, 64, 6), (CLIENT_ADDR, 64, 3), (CLIENT_ADDR, 64, 1),
         (CLIENT_ADDR, 64, 1), (CLIENT_ADDR, 64, 3), (CLIENT_ADDR, 64, 3),
         (CLIENT_ADDR, 64, 3), (CLIENT_ADDR, 64, 5), (FAR, 64, 5), (CLIENT_ADDR, 64, 1),
         (CLIENT_ADDR, 64, 3), None, (CLIENT_ADDR, 64, 3), (CLIENT_ADDR, 64, 5),
         (CLIENT_ADDR, 64, 2), (CLIENT_ADDR, 64, 4), (CLIENT_ADDR, 64, 4), (CLIENT_ADDR, 64, 2),
         (CLIENT_ADDR, 64, 8), (NEAR, 64, 9), (CLIENT_ADDR, 64, 9), (FAR, 64, 10),
         (FAR, 64, 11), (CLIENT_ADDR, 64, 11)]


def _answers(mirror) -> list:
    seen = []
    for step in STEPS:
        if step is None:
            time.sleep(2.2)
            continue
        source, ttl, port = step
        frame = Ether() / IP(src=source, dst=SERVER_ADDR, ttl=ttl) / UDP(sport=5000, dport=port)
        kernel, ours = mirror.compare(frame, {"recent"})
        seen.append((step, kernel, ours))
    return seen


def test_recent_lists_answer_as_the_kernels(mirror, monkeypatch):
    mirror.load(RULES)
    seen = _answers(mirror)
    assert all(kernel == ours for _step, kernel, ours in seen), seen
    assert len({kernel for _step, kernel, _ours in seen}) >= 6  # most rules answered

    real = matchers._recent

    def off_by_one(m, ctx):  # every --hitcount one more
        import dataclasses
        return real(dataclasses.replace(m, hitcount=m.hitcount + (m.hitcount > 0)), ctx)

    monkeypatch.setitem(matchers.GENERATORS, matchers.ir.RecentMatch, off_by_one)
    mirror.load(RULES)
    assert any(kernel != ours for _step, kernel, ours in _answers(mirror))
