"""Writes a kube-proxy (iptables mode) nat table with N ClusterIP services, as
iptables-save prints what kube-proxy writes: service i at 10.96.x.y:80/tcp with 2 to 5
endpoints in 10.244.0.0/16 chosen by -m statistic's ladder, KUBE-MARK-MASQ for traffic
from outside the pod range, KUBE-POSTROUTING's MASQUERADE. For measuring how bpfilter
scales with services (bench/: kube-proxy rows; tests/conformance/test_service_map.py).

    python examples/make_kube.py 1000 > kube-1000.v4
    python examples/make_kube.py 1000 nft > kube-1000.nft   # its nftables mode
"""

from __future__ import annotations

import random
import sys
from typing import Callable, Optional, Sequence

BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")


def _probability(chance: float) -> str:
    """As iptables-save prints it: libxt_statistic keeps lround(2^31 * p)."""
    return f"{int(chance * 0x80000000 + 0.5) / 0x80000000:.11f}"


def _pod(endpoint: int) -> str:
    return f"10.244.{endpoint // 250}.{endpoint % 250 + 1}"


def _fair(service: int, rung: int, count: int) -> float:
    return 1 / (count - rung)  # kube-proxy's ladder: every endpoint equally likely


def cluster_ip(service: int) -> str:
    return f"10.96.{service // 250}.{service % 250 + 1}"


def _counts(services: int, seed: int, counts: Optional[Sequence[int]]) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(2, 5) for _ in range(services)] if counts is None else list(counts)


def kube_nat(services: int, seed: int = 1, counts: Optional[Sequence[int]] = None,
             address: Callable[[int], str] = _pod, port: int = 8080,
             chance: Callable[[int, int, int], float] = _fair, protocol: str = "tcp") -> str:
    """`counts`: endpoints per service (default 2 to 5 at random); `address`: of endpoint
    number n (default in the pod range); `chance`: the probability of rung j of service
    i's ladder of `count` (not used for the last rung, which has none); `protocol`: the
    services' (tcp or udp), port 80."""
    counts = _counts(services, seed, counts)
    p = protocol
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
        ip, name = cluster_ip(i), f"default/svc{i}:http"
        svc = rules[f"KUBE-SVC-{i:016X}"] = []
        portals.append(f'-d {ip}/32 -p {p} -m comment --comment "{name} cluster IP" -m {p} '
                       f"--dport 80 -j KUBE-SVC-{i:016X}")
        svc.append(f'! -s 10.244.0.0/16 -d {ip}/32 -p {p} -m comment --comment "{name} '
                   f'cluster IP" -m {p} --dport 80 -j KUBE-MARK-MASQ')
        count = counts[i]
        for j in range(count):
            sep = f"KUBE-SEP-{endpoint:016X}"
            ep = address(endpoint)
            endpoint += 1
            ladder = ("-m statistic --mode random --probability "
                      f"{_probability(chance(i, j, count))} " if j < count - 1 else "")
            svc.append(f'-m comment --comment "{name} -> {ep}:{port}" {ladder}-j {sep}')
            rules[sep] = [f'-s {ep}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ',
                          f'-p {p} -m comment --comment "{name}" -m {p} '
                          f"-j DNAT --to-destination {ep}:{port}"]
    portals.append('-m comment --comment "kubernetes service nodeports; NOTE: this must be '
                   'the last rule in this chain" -m addrtype --dst-type LOCAL '
                   "-j KUBE-NODEPORTS")
    chains = [*BUILTIN, *sorted(set(rules) - set(BUILTIN))]
    lines = ["*nat"] + [f":{c} ACCEPT [0:0]" if c in BUILTIN else f":{c} - [0:0]"
                        for c in chains]
    lines += [f"-A {c} {rule}" for c in chains for rule in rules[c]]
    return "\n".join(lines + ["COMMIT"]) + "\n"


def kube_nft(services: int, seed: int = 1, counts: Optional[Sequence[int]] = None,
             address: Callable[[int], str] = _pod, port: int = 8080, protocol: str = "tcp",
             counter: bool = False) -> str:
    """The same services as kube-proxy's nftables mode writes them (`table ip
    kube-proxy`: one concatenated verdict map finds the service, a `numgen random` verdict
    map its endpoint). `counter`: a counter on every DNAT (the bench checks its verdicts
    with them; kube-proxy writes none)."""
    counts = _counts(services, seed, counts)
    chains = ["\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; "
              "policy accept;\n\t\tjump services\n\t}",
              "\tchain nat-output {\n\t\ttype nat hook output priority -100; "
              "policy accept;\n\t\tjump services\n\t}",
              "\tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; "
              "policy accept;\n\t\tjump masquerading\n\t}",
              "\tchain mark-for-masquerade {\n\t\tmark set mark or 0x4000\n\t}",
              "\tchain masquerading {\n\t\tmeta mark & 0x4000 == 0 return\n"
              "\t\tmeta mark set meta mark ^ 0x4000\n\t\tmasquerade fully-random\n\t}",
              "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap "
              "@service-ips\n\t}"]
    elements, endpoint = [], 0
    for i in range(services):
        ip, chain = cluster_ip(i), f"service-{i:08X}-default/svc{i}/{protocol}/http"
        elements.append(f"{ip} . {protocol} . 80 : goto {chain}")
        picks = []
        for j in range(counts[i]):
            ep = address(endpoint)
            name = f"endpoint-{endpoint:08X}-default/svc{i}/{protocol}/http__{ep}/{port}"
            endpoint += 1
            picks.append(f"{j} : goto {name}")
            chains.append(f"\tchain {name} {{\n\t\tip saddr {ep} jump mark-for-masquerade\n"
                          f"\t\tmeta l4proto {protocol} {'counter ' if counter else ''}"
                          f"dnat to {ep}:{port}\n\t}}")
        chains.append(f"\tchain {chain} {{\n\t\tip daddr {ip} {protocol} dport 80 ip saddr "
                      "!= 10.244.0.0/16 jump mark-for-masquerade\n"
                      f"\t\tnumgen random mod {counts[i]} vmap {{ {', '.join(picks)} }}\n\t}}")
    service_map = ("\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : "
                   "verdict\n\t\telements = { " + ",\n\t\t\t     ".join(elements)
                   + " }\n\t}")
    return "table ip kube-proxy {\n" + "\n".join([service_map, *chains]) + "\n}\n"


if __name__ == "__main__":
    make = kube_nft if sys.argv[2:] == ["nft"] else kube_nat
    sys.stdout.write(make(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
