"""Writes a kube-proxy (iptables mode) nat table with N ClusterIP services, as
iptables-save prints what kube-proxy writes: service i at 10.96.x.y:80/tcp with 2 to 5
endpoints in 10.244.0.0/16 chosen by -m statistic's ladder, KUBE-MARK-MASQ for traffic
from outside the pod range, KUBE-POSTROUTING's MASQUERADE. For measuring how bpfilter
scales with services (README: 1,000 services compile; the service map is to come).

    python examples/make_kube.py 1000 > kube-1000.v4
"""

from __future__ import annotations

import random
import sys

BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")


def _probability(chance: float) -> str:
    """As iptables-save prints it: libxt_statistic keeps lround(2^31 * p)."""
    return f"{int(chance * 0x80000000 + 0.5) / 0x80000000:.11f}"


def kube_nat(services: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    rules: dict[str, list[str]] = {name: [] for name in BUILTIN}
    rules["PREROUTING"].append('-m comment --comment "kubernetes service portals" '
                               "-j KUBE-SERVICES")
    rules["OUTPUT"].append('-m comment --comment "kubernetes service portals" '
                           "-j KUBE-SERVICES")
    rules["POSTROUTING"].append('-m comment --comment "kubernetes postrouting rules" '
                                "-j KUBE-POSTROUTING")
    rules["KUBE-MARK-MASQ"] = ["-j MARK --set-xmark 0x4000/0x4000"]
    rules["KUBE-NODEPORTS"] = []
    rules["KUBE-POSTROUTING"] = [
        "-m mark ! --mark 0x4000/0x4000 -j RETURN", "-j MARK --set-xmark 0x4000/0x0",
        '-m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully"]
    portals = rules["KUBE-SERVICES"] = []
    endpoint = 0
    for i in range(services):
        ip, name = f"10.96.{i // 250}.{i % 250 + 1}", f"default/svc{i}:http"
        svc = rules[f"KUBE-SVC-{i:016X}"] = []
        portals.append(f'-d {ip}/32 -p tcp -m comment --comment "{name} cluster IP" -m tcp '
                       f"--dport 80 -j KUBE-SVC-{i:016X}")
        svc.append(f'! -s 10.244.0.0/16 -d {ip}/32 -p tcp -m comment --comment "{name} '
                   'cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ')
        count = rng.randint(2, 5)
        for j in range(count):
            sep = f"KUBE-SEP-{endpoint:016X}"
            ep = f"10.244.{endpoint // 250}.{endpoint % 250 + 1}"
            endpoint += 1
            ladder = (f"-m statistic --mode random --probability {_probability(1 / (count - j))} "
                      if j < count - 1 else "")
            svc.append(f'-m comment --comment "{name} -> {ep}:8080" {ladder}-j {sep}')
            rules[sep] = [f'-s {ep}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ',
                          f'-p tcp -m comment --comment "{name}" -m tcp '
                          f"-j DNAT --to-destination {ep}:8080"]
    portals.append('-m comment --comment "kubernetes service nodeports; NOTE: this must be '
                   'the last rule in this chain" -m addrtype --dst-type LOCAL '
                   "-j KUBE-NODEPORTS")
    chains = [*BUILTIN, *sorted(set(rules) - set(BUILTIN))]
    lines = ["*nat"] + [f":{c} ACCEPT [0:0]" if c in BUILTIN else f":{c} - [0:0]"
                        for c in chains]
    lines += [f"-A {c} {rule}" for c in chains for rule in rules[c]]
    return "\n".join(lines + ["COMMIT"]) + "\n"


if __name__ == "__main__":
    sys.stdout.write(kube_nat(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
