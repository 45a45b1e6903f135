"""LOG events as a running ruleset's ring buffer holds them, written out the way the
kernel's LOG target writes a packet to the kernel log (nf_log_syslog's dump_ipv4_packet
and dump_ipv6_packet), for the fields bpfilter's packet record holds.

Left out, because the record does not hold them: the IPv4 header's ID and CE/MF flags,
the IPv6 flow label, TCP's RES and URGP, an ICMP echo's sequence number, the packet an
ICMP error quotes, IP and TCP options, and the optional fields of --log-tcp-sequence,
--log-uid and the like. A netdev chain's frame of another protocol gets the kernel's line
for an unknown protocol (ARP's own fields, which the kernel prints, are left out too)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from bpfilter import ir
from bpfilter.loader.objects import Map, RingBuffer
from bpfilter.runtime.state import Deployment, Paths

# struct bf_log_event (templates/bpfilter.h), C's padding at the end left out.
_EVENT = struct.Struct("<QIII4I4IIIHHHHHHHBBBBBBBBBB6s6s")
_HOOKS = {1: "INPUT", 2: "FORWARD", 3: "OUTPUT", 4: "PREROUTING", 5: "POSTROUTING"}
_TCP_FLAGS = ((0x80, "CWR"), (0x40, "ECE"), (0x20, "URG"), (0x10, "ACK"), (0x08, "PSH"),
              (0x04, "RST"), (0x02, "SYN"), (0x01, "FIN"))
_ICMP_ECHO = {4: (0, 8), 6: (128, 129)}  # echo request and reply, per family
# The transports the kernel's line spells out: their name there and the header bytes it
# needs to read them (struct tcphdr, udphdr; icmphdr and icmp6hdr are 8 bytes too).
_TRANSPORTS = {6: ("TCP", 20), 17: ("UDP", 8), 136: ("UDPLITE", 8)}
_ICMP = {4: (1, "ICMP"), 6: (58, "ICMPv6")}  # per family: the protocol, its name


@dataclass(frozen=True)
class LogEvent:
    timestamp_ns: int  # CLOCK_MONOTONIC
    slot: int  # the counter slot of the rule that logged
    ifindex: int
    oifindex: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    mark: int
    l4_len: int
    sport: int
    dport: int
    length: int
    tcp_window: int
    icmp_id: int
    frag_off: int
    ethertype: int
    proto: int
    ttl: int
    tos: int
    tcp_flags: int
    icmp_type: int
    icmp_code: int
    family: int  # 4 or 6; 0: another protocol (a netdev chain's frame)
    hook: str
    egress: bool  # logged by the program at TC egress
    dont_fragment: bool
    smac: bytes
    dmac: bytes

    @classmethod
    def from_bytes(cls, record: bytes) -> "LogEvent":
        (ts, slot, ifindex, oifindex, *words) = _EVENT.unpack_from(record)
        src, dst, rest = words[0:4], words[4:8], words[8:]
        (mark, l4_len, sport, dport, length, window, icmp_id, frag_off, ethertype, proto,
         ttl, tos, flags, icmp_type, icmp_code, family, hook, egress, df, smac, dmac) = rest
        return cls(ts, slot, ifindex, oifindex, _address(family, src), _address(family, dst),
                   mark, l4_len, sport, dport, length, window, icmp_id, frag_off, ethertype,
                   proto, ttl, tos, flags, icmp_type, icmp_code, family,
                   _HOOKS.get(hook, "?"), bool(egress), bool(df), smac, dmac)

    @property
    def incoming(self) -> bool:
        """It has an input interface: the host did not make it."""
        return not (self.egress and self.hook in ("OUTPUT", "POSTROUTING"))

    def line(self, prefix: str, names: Optional[dict[int, str]] = None) -> str:
        """The kernel's LOG line, `prefix` first; `names`: interface names by index (the
        current namespace's by default)."""
        names = dict(socket.if_nameindex()) if names is None else names
        into = names.get(self.ifindex, "") if self.incoming else ""
        out = names.get(self.oifindex, "") if self.oifindex else ""
        words = [f"{prefix}IN={into}", f"OUT={out}"]
        if into:
            words.append("MAC=" + ":".join(f"{b:02x}" for b in self.dmac + self.smac +
                                           self.ethertype.to_bytes(2, "big")))
        if self.family:  # else a frame of another protocol: nf_log_unknown_packet's line
            words += self._ip_words() + self._transport_words()
        if self.mark:
            words.append(f"MARK=0x{self.mark:x}")
        return " ".join(words) + " "

    def _ip_words(self) -> list[str]:
        if self.family == 6:
            return [f"SRC={_full6(self.src)}", f"DST={_full6(self.dst)}",
                    f"LEN={self.length}", f"TC={self.tos}", f"HOPLIMIT={self.ttl}"]
        words = [f"SRC={self.src}", f"DST={self.dst}", f"LEN={self.length}",
                 f"TOS=0x{self.tos & 0x1E:02X}", f"PREC=0x{self.tos & 0xE0:02X}",
                 f"TTL={self.ttl}"]
        if self.dont_fragment:
            words.append("DF")
        if self.frag_off:
            words.append(f"FRAG:{self.frag_off}")
        return words

    def _transport_words(self) -> list[str]:
        icmp, icmp_name = _ICMP[self.family]
        known = (icmp_name, 8) if self.proto == icmp else _TRANSPORTS.get(self.proto)
        if known is None:
            return [f"PROTO={self.proto}"]
        name, header = known
        words = [f"PROTO={name}"]
        if self.frag_off:  # a later fragment: no header to read
            return words
        if self.l4_len < header:
            return words + [f"INCOMPLETE [{self.l4_len} bytes]"]
        if name == "TCP":
            return words + [f"SPT={self.sport}", f"DPT={self.dport}",
                            f"WINDOW={self.tcp_window}"] + [
                flag for bit, flag in _TCP_FLAGS if self.tcp_flags & bit]
        if name.startswith("UDP"):
            return words + [f"SPT={self.sport}", f"DPT={self.dport}", f"LEN={self.l4_len}"]
        words += [f"TYPE={self.icmp_type}", f"CODE={self.icmp_code}"]
        if self.icmp_type in _ICMP_ECHO[self.family]:
            words.append(f"ID={self.icmp_id}")
        return words


def _address(family: int, words) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == 6:
        return ipaddress.IPv6Address(sum(w << (96 - 32 * k) for k, w in enumerate(words)))
    return ipaddress.IPv4Address(words[0])


def _full6(address: ipaddress.IPv6Address) -> str:
    """As the kernel's %pI6 prints it: every group, four digits each."""
    return address.exploded


@dataclass(frozen=True)
class Logged:
    """An event with what it came from: the interface whose ruleset logged it, the rule."""

    iface: str
    rule: tuple[str, str, int]  # table key, chain, rule index
    target: Optional[ir.LogTarget]  # None: the ruleset changed since (an old event)
    event: LogEvent

    def line(self, names: Optional[dict[int, str]] = None) -> str:
        return self.event.line(self.target.prefix if self.target else "", names)


class LogReader:
    """The LOG events of running rulesets, as their programs write them. Reading takes
    them out of the ring buffer: a second reader gets the events the first did not.
    `sources`: (pins, deployment, its ruleset) per interface, as deploy keeps them."""

    def __init__(self, sources: list[tuple[Paths, Deployment, ir.Ruleset]],
                 on_event: Callable[[Logged], None]):
        self._maps: list[Map] = []
        self._ring = RingBuffer()
        try:
            for paths, deployment, ruleset in sources:
                ring = Map.open_pinned(str(paths.generation(deployment.generation) /
                                           "bf_log"))
                self._maps.append(ring)
                self._ring.add(ring, _decoder(deployment, ruleset, on_event))
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_ms: int) -> int:
        return self._ring.poll(timeout_ms)

    def consume(self) -> int:
        return self._ring.consume()

    def close(self) -> None:
        self._ring.close()
        for ring in self._maps:
            ring.close()
        self._maps.clear()

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _decoder(deployment: Deployment, ruleset: ir.Ruleset,
             on_event: Callable[[Logged], None]) -> Callable[[bytes], None]:
    rules: dict[int, tuple[tuple[str, str, int], Optional[ir.LogTarget]]] = {}
    for table, chain, index, slot in deployment.slots:
        if slot not in rules:
            rules[slot] = (table, chain, index), _log_target(ruleset, (table, chain, index))

    def decode(record: bytes) -> None:
        event = LogEvent.from_bytes(record)
        key, target = rules.get(event.slot, (("", "", -1), None))
        on_event(Logged(deployment.iface, key, target, event))
    return decode


def _log_target(ruleset: ir.Ruleset, key: tuple[str, str, int]) -> Optional[ir.LogTarget]:
    table_key, chain_name, index = key
    table = ruleset.table(table_key)
    chain = table.chain(chain_name) if table else None
    if chain is None or not 0 <= index < len(chain.rules):
        return None
    target = chain.rules[index].target
    return target if isinstance(target, ir.LogTarget) else None
