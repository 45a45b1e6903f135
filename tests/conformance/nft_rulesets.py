"""Generated nftables rulesets, written as nft text: what the iptables-shaped generators
(rulesets.py) cannot produce. Several tables with base chains at one hook and various
priorities, named and anonymous sets, `!=` sets, verdict maps, concatenations, rules
with several statements (log then drop, a mark then accept), goto and return.

Rules stay within what the kernel takes: reject only in chains reached from input,
notrack only before connection tracking (priority below -200, never -200 itself, whose
order with conntrack depends on which registered first)."""

from __future__ import annotations

from hypothesis import strategies as st

ADDRESSES = ["192.0.2.0/24", "192.0.2.53", "198.51.100.0/25", "203.0.113.7",
             "198.51.100.200-198.51.100.250", "10.0.0.0/8", "198.18.0.1", "198.19.0.0/16"]
PORTS = ["22", "53", "80", "443", "1024-2047", "8080"]
PRIORITIES = {"prerouting": [-300, -250, -150, -10, 0, 20],
              "input": [-150, -10, 0, 0, 10, 50]}
REJECTS = ["reject", "reject with icmp type host-prohibited",
           "reject with icmp type admin-prohibited", "reject with icmp type net-unreachable"]


def _set(draw, values: list[str]) -> str:
    chosen = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
    if any("/" in c or "-" in c for c in chosen):
        chosen = chosen[:1]  # prefixes and ranges may overlap: nft refuses such a set
    return "{ " + ", ".join(chosen) + " }"


@st.composite
def _match(draw, named_set: bool) -> str:
    kind = draw(st.sampled_from(["addr", "addr", "port", "proto", "flags", "icmp", "state",
                                 "mark", "iif", "length", "ttl", "concat"]))
    ne = draw(st.sampled_from(["", "", "!= "]))
    if kind == "addr":
        field = draw(st.sampled_from(["saddr", "daddr"]))
        value = draw(st.one_of(st.sampled_from(ADDRESSES), st.just("")))
        if not value:
            value = "@blocked" if named_set and not ne and field == "saddr" else \
                _set(draw, ["192.0.2.53", "203.0.113.7", "198.18.0.1", "10.1.2.3"])
        return f"ip {field} {ne}{value}"
    if kind == "port":
        proto = draw(st.sampled_from(["tcp", "udp", "th"]))
        field = draw(st.sampled_from(["sport", "dport"]))
        value = draw(st.one_of(st.sampled_from(PORTS), st.just(None)))
        return f"{proto} {field} {ne}{value or _set(draw, ['22', '53', '80', '443'])}"
    if kind == "proto":
        return f"ip protocol {ne}{draw(st.sampled_from(['tcp', 'udp', 'icmp', '{ tcp, udp }']))}"
    if kind == "flags":
        return draw(st.sampled_from(["tcp flags syn", "tcp flags syn,ack",
                                     "tcp flags & (syn|ack) == syn", "tcp flags != rst",
                                     "tcp flags syn / syn,ack,rst", "tcp flags == ack"]))
    if kind == "icmp":
        return "icmp type " + ne + draw(st.sampled_from(
            ["echo-request", "{ echo-request, destination-unreachable }", "time-exceeded"]))
    if kind == "state":
        return "ct state " + ne + draw(st.sampled_from(
            ["new", "established,related", "{ invalid, untracked }", "new,untracked"]))
    if kind == "mark":
        return draw(st.sampled_from(["meta mark 0x1", "meta mark != 0x0",
                                     "meta mark & 0xf0 == 0x10", "ct mark 0x2"]))
    if kind == "iif":
        return f"iifname {ne}" + draw(st.sampled_from(['"eth0"', '"eth*"', '"lan0"']))
    if kind == "length":
        return f"meta length {ne}" + draw(st.sampled_from(["40-100", "28", "1000-1500"]))
    if kind == "ttl":
        return "ip ttl " + draw(st.sampled_from(["< 64", ">= 128", "1", "!= 64"]))
    return "ip saddr . tcp dport " + draw(st.sampled_from(
        ["{ 192.0.2.53 . 22, 10.0.0.0/8 . 80 }", "{ 192.0.2.0/25 . 1-1023, 192.0.2.200 . 22 }"]))


def _protocol(match: str) -> str | None:
    for tag in ("tcp", "udp", "icmp"):
        if match.startswith(tag) or f"{tag} dport" in match:
            return tag
    return "ip protocol" if match.startswith("ip protocol") else None


def _one_protocol(matches: list[str]) -> list[str]:
    """nft refuses a rule whose expressions imply two protocols (icmp type, tcp flags)."""
    tags = [_protocol(m) for m in matches]
    first = next((t for t in tags if t is not None), None)
    return [m for m, t in zip(matches, tags) if t in (None, first)]


@st.composite
def _rule(draw, hook: str, callees: list[str], named_set: bool, base: bool,
          early: bool) -> str:
    parts = _one_protocol(draw(st.lists(_match(named_set), max_size=3)))
    if draw(st.integers(0, 5)) == 0:
        parts.append("limit rate " + draw(st.sampled_from(["", "over "])) + "2/minute burst "
                     + draw(st.sampled_from(["1", "3"])) + " packets")
    if draw(st.booleans()):
        parts.append("counter")
    if draw(st.integers(0, 4)) == 0:
        parts.append('log prefix "gen "')
    if draw(st.integers(0, 4)) == 0:
        parts.append(draw(st.sampled_from(["meta mark set 0x1", "meta mark set meta mark | 0x10",
                                           "ct mark set 0x2", "meta mark set ct mark"])))
    if early and draw(st.integers(0, 5)) == 0:
        parts.append("notrack")
    several = any(p.startswith(("log", "meta mark set", "ct mark set", "notrack"))
                  for p in parts)
    verdicts = ["accept", "drop", "", ""] + (REJECTS if hook == "input" else []) + \
        [f"jump {c}" for c in callees]
    if not several:  # nft takes return and goto after statements; bpfilter does not yet
        verdicts += ["return"] if not base else []
        verdicts += [f"goto {c}" for c in callees]
        if draw(st.integers(0, 6)) == 0 and all(_protocol(p) in (None, "tcp") for p in parts):
            targets = ["accept", "drop"] + [f"jump {c}" for c in callees]
            return " ".join(parts + [
                "tcp dport vmap { 22 : " + draw(st.sampled_from(targets)) + ", 80 : " +
                draw(st.sampled_from(targets)) + " }"])
    return " ".join(p for p in parts + [draw(st.sampled_from(verdicts))] if p)


@st.composite
def _netdev(draw) -> str:
    """A netdev table on the servers' eth0, which sees ARP too: rules each with an IPv4
    expression (a rule dropping ARP would make each frame wait for the ARP answer the
    sender ends it with; examples/l2-guard.nft has rules for every frame), no connection
    state (none exists yet at ingress). A drop policy lets ARP in first."""
    rules = []
    for rule in draw(st.lists(_rule("ingress", [], False, True, False), max_size=5)):
        if "ct " in rule or "notrack" in rule:
            continue
        rules.append(rule if rule.startswith(("ip ", "icmp ")) else "meta protocol ip " + rule)
    priority = draw(st.sampled_from([-500, 0, 10]))
    policy = draw(st.sampled_from(["accept", "accept", "drop"]))
    if policy == "drop":
        rules.insert(0, "ether type arp accept")
    return "\n".join(["table netdev edge {", "\tchain ingress {",
                      f'\t\ttype filter hook ingress device "eth0" priority {priority}; '
                      f"policy {policy};"] + [f"\t\t{r}" for r in rules] + ["\t}", "}"])


@st.composite
def nft_rulesets(draw) -> str:
    tables = [draw(_netdev())] if draw(st.integers(0, 3)) == 0 else []
    used: set[tuple[str, int]] = set()
    for number in range(draw(st.integers(1, 3))):
        named_set = draw(st.booleans())
        lines = [f"table ip t{number} {{"]
        if named_set:
            lines += ["\tset blocked {", "\t\ttype ipv4_addr", "\t\tflags interval",
                      "\t\telements = { 192.0.2.0/25, 203.0.113.7, 10.0.0.0/8 }", "\t}"]
        hook = draw(st.sampled_from(["input", "input", "prerouting"]))
        priority = draw(st.sampled_from(PRIORITIES[hook]))
        if (hook, priority) in used:  # same place, two tables: the order is undefined
            priority += 1
        used.add((hook, priority))
        callees = [f"u{number}_{i}" for i in range(draw(st.integers(0, 2)))]
        policy = draw(st.sampled_from(["accept", "accept", "drop"]))
        for index, callee in enumerate(callees):
            # Callees call only later ones: no loops.
            rules = draw(st.lists(_rule(hook, callees[index + 1:], named_set, False, False),
                                  max_size=4))
            lines += [f"\tchain {callee} {{"] + [f"\t\t{r}" for r in rules] + ["\t}"]
        rules = draw(st.lists(_rule(hook, callees, named_set, True, priority < -200),
                              max_size=6))
        lines += ["\tchain base {",
                  f"\t\ttype filter hook {hook} priority {priority}; policy {policy};"]
        lines += [f"\t\t{r}" for r in rules] + ["\t}", "}"]
        tables.append("\n".join(lines))
    return "\n".join(tables) + "\n"
