"""Writes the N-rule ACL used by examples/ and bench/.

N rules `-s 192.168.x.y/32 -p tcp --dport 22 -j DROP` that a test packet does not match,
then the rule it does match (`-p udp -j DROP`): the ruleset of DESIGN.md's reference
measurements, where iptables walks every rule for every packet.
"""

from __future__ import annotations

import sys


def acl(n: int) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]"]
    for i in range(n):
        lines.append(f"-A INPUT -s 192.168.{i // 250}.{i % 250 + 1}/32 -p tcp -m tcp "
                     "--dport 22 -j DROP")
    lines.append("-A INPUT -p udp -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(acl(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
