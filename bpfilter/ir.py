"""The intermediate representation every front-end produces and every pass consumes.

A ruleset is tables of chains of rules. A rule is an ordered tuple of typed matches and at
most one target, exactly as the kernel evaluates it: every match must hold, in order, and
then the target runs. Matches are grouped the way the kernel groups them (one value per
match module), because that is the unit of evaluation: e.g. a truncated TCP header makes
the whole `tcp` match drop the packet, whichever of its options were given.

Nothing here knows any syntax; the front-ends parse into it and the emitters print it.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class Family(enum.Enum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"


class Hook(enum.Enum):
    """The netfilter hooks, in packet order. INGRESS (nftables' netdev family) sees every
    frame its device receives, of any protocol, before the IP stack; its chains' rules
    name the device."""

    INGRESS = "INGRESS"
    PREROUTING = "PREROUTING"
    INPUT = "INPUT"
    FORWARD = "FORWARD"
    OUTPUT = "OUTPUT"
    POSTROUTING = "POSTROUTING"


@dataclass(frozen=True)
class Origin:
    """Where a rule or chain came from, for errors, counters and `explain`."""

    file: str
    line: int
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Counters:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Range:
    """An inclusive integer range: ports, lengths, ICMP codes."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"empty range {self.low}:{self.high}")

    @property
    def single(self) -> bool:
        return self.low == self.high

    def __contains__(self, value: int) -> bool:
        return self.low <= value <= self.high


# --------------------------------------------------------------------------- matches


@dataclass(frozen=True)
class AddressMatch:
    """`-s` / `-d`: the packet's source or destination lies in a prefix."""

    direction: str  # "src" | "dst"
    network: IPNetwork
    negate: bool = False


@dataclass(frozen=True)
class InterfaceMatch:
    """`-i` / `-o`. A trailing `+` makes the name a prefix, as in iptables."""

    direction: str  # "in" | "out"
    name: str
    negate: bool = False

    @property
    def is_prefix(self) -> bool:
        return self.name.endswith("+")

    def matches(self, ifname: str) -> bool:
        hit = ifname.startswith(self.name[:-1]) if self.is_prefix else ifname == self.name
        return hit != self.negate


@dataclass(frozen=True)
class ProtocolMatch:
    """`-p`. Protocol 0 means every protocol and is never stored as a match."""

    protocol: int
    negate: bool = False


@dataclass(frozen=True)
class FragmentMatch:
    """`-f`: second and later fragments (fragment offset not zero)."""

    negate: bool = False


@dataclass(frozen=True)
class PortSpec:
    ports: Range
    negate: bool = False


@dataclass(frozen=True)
class TcpFlagsSpec:
    """`(flags & mask) == comp` on the TCP flags byte."""

    mask: int
    comp: int
    negate: bool = False


# `partial_header` on the matches below says what a packet too short for them meets. False
# (xtables): the whole header is read first, and a shorter one drops the packet (hotdrop).
# True (nftables): each field is read on its own, and one beyond the packet fails the match.


@dataclass(frozen=True)
class TcpMatch:
    sport: Optional[PortSpec] = None
    dport: Optional[PortSpec] = None
    flags: Optional[TcpFlagsSpec] = None
    partial_header: bool = False


@dataclass(frozen=True)
class UdpMatch:
    sport: Optional[PortSpec] = None
    dport: Optional[PortSpec] = None
    partial_header: bool = False


@dataclass(frozen=True)
class IcmpMatch:
    """ICMP (or ICMPv6) type and code range; type 255 ("any") matches every ICMP
    packet."""

    icmp_type: int
    codes: Range = Range(0, 255)
    negate: bool = False
    partial_header: bool = False
    version: int = 4  # 6: ICMPv6's types and codes (ip6tables -m icmp6)

    ANY = 255


@dataclass(frozen=True)
class MultiportMatch:
    """`-m multiport`: up to 15 ports or ranges, on the source, destination or either."""

    direction: str  # "src" | "dst" | "any"
    ports: tuple[Range, ...]
    negate: bool = False
    partial_header: bool = False


@dataclass(frozen=True)
class AddressRangeSpec:
    low: IPAddress
    high: IPAddress
    negate: bool = False


@dataclass(frozen=True)
class IpRangeMatch:
    src: Optional[AddressRangeSpec] = None
    dst: Optional[AddressRangeSpec] = None


@dataclass(frozen=True)
class CommentMatch:
    text: str


@dataclass(frozen=True)
class LengthMatch:
    """`-m length`: the IP packet's total length (IPv4 tot_len)."""

    length: Range
    negate: bool = False


@dataclass(frozen=True)
class TtlMatch:
    op: str  # "eq" | "lt" | "gt"
    value: int
    negate: bool = False


@dataclass(frozen=True)
class MacSourceMatch:
    address: bytes
    negate: bool = False


@dataclass(frozen=True)
class LimitMatch:
    """A token bucket: `burst` packets at once, refilled at `count` per `unit`."""

    count: int
    unit: str  # "sec" | "min" | "hour" | "day"
    burst: int = 5
    # Limits of one bucket name spend one bucket: an nft rule made into several IR rules
    # (one per element of a set) still has one limit. None: a bucket of its own.
    bucket: Optional[str] = None
    over: bool = False  # nft's `limit rate over`: holds when the bucket has no token

    UNIT_SECONDS = {"sec": 1, "min": 60, "hour": 3600, "day": 86400}

    @property
    def interval_ns(self) -> int:
        """Time to earn one token."""
        return self.UNIT_SECONDS[self.unit] * 1_000_000_000 // self.count


@dataclass(frozen=True)
class ConntrackAddress:
    """`--ctorigsrc` and kin: an address of the connection's tuple in one direction."""

    network: IPNetwork
    negate: bool = False


@dataclass(frozen=True)
class ConntrackMatch:
    """The packet's connection: its state is one of `states` (`-m conntrack --ctstate`;
    `module` "state" is the older `-m state --state`, kept so that it prints back), and
    the other options of `-m conntrack` hold. No states: no state condition."""

    # As iptables prints them; SNAT and DNAT (conntrack's only, not state's): the
    # connection's source or destination was translated (IPS_SRC_NAT, IPS_DST_NAT).
    TRACKING_STATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED")
    NAT_STATES = ("SNAT", "DNAT")
    STATES = TRACKING_STATES + NAT_STATES
    ADDRESSES = ("origsrc", "origdst", "replsrc", "repldst")
    PORTS = ("origsrcport", "origdstport", "replsrcport", "repldstport")

    states: tuple[str, ...]  # in STATES order
    negate: bool = False
    module: str = "conntrack"
    direction: Optional[str] = None  # "ORIGINAL" | "REPLY" (--ctdir)
    origsrc: Optional[ConntrackAddress] = None
    origdst: Optional[ConntrackAddress] = None
    replsrc: Optional[ConntrackAddress] = None
    repldst: Optional[ConntrackAddress] = None
    protocol: Optional[ProtocolMatch] = None  # --ctproto: the connection's protocol
    origsrcport: Optional[PortSpec] = None  # ports of the tuple (ICMP: the identifier)
    origdstport: Optional[PortSpec] = None
    replsrcport: Optional[PortSpec] = None
    repldstport: Optional[PortSpec] = None

    @property
    def only_states(self) -> bool:
        return self.direction is None and self.protocol is None and all(
            getattr(self, a) is None for a in self.ADDRESSES + self.PORTS)


@dataclass(frozen=True)
class FamilyMatch:
    """The packet's address family: nft's `meta nfproto`, and what an `ip ...` or `ip6 ...`
    expression implies in an inet table (whose chains see both families)."""

    family: Family
    negate: bool = False


@dataclass(frozen=True)
class EtherTypeMatch:
    """The frame's EtherType is one of these (nft's `ether type` and `meta protocol` in a
    netdev chain, where frames of every protocol pass)."""

    ethertypes: tuple[int, ...]
    negate: bool = False


# EtherTypes of the IP families: what a rule reading IP headers needs in a netdev chain.
ETHERTYPE_IP, ETHERTYPE_IPV6 = 0x0800, 0x86DD


@dataclass(frozen=True)
class StatisticMatch:
    """xt_statistic. `random`: holds when a 31-bit random draw is below `probability`,
    out of 2**31 (libxt_statistic's rounding of the decimal it reads); `nth`: holds for
    every `every`-th packet that reaches the rule, the first being packet number `packet`
    (from 0), one count per rule across CPUs."""

    mode: str  # "random" | "nth"
    probability: int = 0
    every: int = 1
    packet: int = 0
    negate: bool = False

    ONE = 0x80000000  # probability 1


@dataclass(frozen=True)
class NumgenMatch:
    """nft's numgen: a number from 0 to modulus - 1 (plus offset), drawn at random or the
    next of a counter shared across CPUs (from 0), held when it is in `values`. Rules made from one nft rule (a
    verdict map: one rule per element) share `draw`: one number per packet for all."""

    mode: str  # "random" | "inc"
    modulus: int
    offset: int = 0
    values: tuple[Range, ...] = ()  # none: never (`< 0`)
    negate: bool = False
    draw: Optional[str] = None
    fresh: bool = False  # the first of its nft rule's IR rules: draws anew


@dataclass(frozen=True)
class RoutingHeaderMatch:
    """ip6tables' `-m rt`: the packet's first routing header, as ipv6_find_hdr() finds it
    through the header chain: its type, Segments Left and length in bytes ((Hdr Ext Len +
    1) * 8), each tested when given, and with `reserved_zero` type 0's reserved word. A
    packet without one does not match, nor does one whose header the packet cuts; a
    header chain cut before it drops the packet (xt_rt's hotdrop)."""

    rt_type: Optional[int] = None
    type_negate: bool = False
    segsleft: Range = Range(0, 0xFFFFFFFF)
    segsleft_negate: bool = False
    length: Optional[int] = None
    length_negate: bool = False
    reserved_zero: bool = False

    ANY_SEGSLEFT = Range(0, 0xFFFFFFFF)


@dataclass(frozen=True)
class TosMatch:
    """`-m tos`: (the TOS byte, IPv6's traffic class) & mask == value."""

    value: int
    mask: int
    negate: bool = False


@dataclass(frozen=True)
class DscpMatch:
    """`-m dscp`: the TOS byte's upper six bits (IPv6's traffic class's)."""

    dscp: int
    negate: bool = False


@dataclass(frozen=True)
class EcnMatch:
    """`-m ecn`: the IP header's ECN codepoint (`ect`), TCP's ECE and CWR flags (True:
    set, False: `!`, clear; None: not tested). A TCP header shorter than 20 bytes fails
    the flag tests (xt_ecn reads the whole header, and does not drop)."""

    ece: Optional[bool] = None
    cwr: Optional[bool] = None
    ect: Optional[int] = None
    ect_negate: bool = False


@dataclass(frozen=True)
class EspMatch:
    """`-m esp --espspi`: the ESP header's SPI within low-high (as given: a range
    written backwards never holds)."""

    low: int = 0
    high: int = 0xFFFFFFFF
    negate: bool = False


@dataclass(frozen=True)
class RecentMatch:
    """xt_recent: a named list of addresses (the source's, or with side "dst" the
    destination's, masked), each with the times it was last seen. `set` adds the address
    (and holds); `rcheck` holds when it is listed, seen within `seconds` (0: ever) at
    least `hitcount` times (0: once), with `rttl` only if the TTL it was set with is the
    packet's; `update` is rcheck that records this sighting when it holds; `remove`
    deletes it (and holds when it was there). `invert` turns each answer."""

    mode: str  # "set" | "rcheck" | "update" | "remove"
    name: str = "DEFAULT"
    seconds: int = 0
    hitcount: int = 0
    rttl: bool = False
    side: str = "src"
    mask: Optional[IPAddress] = None  # of the rule's family (front-ends give all ones)
    invert: bool = False

    MAX_HITCOUNT = 20  # the kernel's ip_pkt_list_tot: stamps kept per address
    LIST_SIZE = 200  # ip_list_tot: addresses per list


@dataclass(frozen=True)
class MarkMatch:
    """`-m mark --mark V[/M]`: (the packet's mark & M) == V; `-m connmark` compares its
    connection's mark instead, and never holds for a packet with no connection."""

    value: int
    mask: int = 0xFFFFFFFF
    negate: bool = False
    connection: bool = False


@dataclass(frozen=True)
class AddrTypeMatch:
    """`-m addrtype` (nft `fib ... type`): the route type the kernel's local table gives
    the source (destination) address, as inet_dev_addr_type() finds it: 0.0.0.0/8 and
    255.255.255.255 BROADCAST, 224/4 MULTICAST, else the type of the longest local-table
    route holding it, UNICAST when none does. With `limit` ("in" or "out"), a route counts
    only if it goes through the packet's input (output) interface. IPv4 only for now (the
    kernel's IPv6 match looks routes up in every table)."""

    TYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE",
             "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")  # RTN_* order
    # Where a packet has no interface of that direction, the kernel refuses the limit.
    NO_INTERFACE = {"out": (Hook.PREROUTING, Hook.INPUT), "in": (Hook.OUTPUT, Hook.POSTROUTING)}

    src: tuple[str, ...] = ()  # in TYPES order; () sets no condition
    dst: tuple[str, ...] = ()
    src_negate: bool = False
    dst_negate: bool = False
    limit: Optional[str] = None  # "in" | "out"

    @staticmethod
    def mask(types: tuple[str, ...]) -> int:
        """The kernel's bitmask of route types (bit RTN_x)."""
        return sum(1 << AddrTypeMatch.TYPES.index(t) for t in types)


Match = Union[
    AddressMatch,
    InterfaceMatch,
    ProtocolMatch,
    FragmentMatch,
    TcpMatch,
    UdpMatch,
    IcmpMatch,
    MultiportMatch,
    IpRangeMatch,
    CommentMatch,
    LengthMatch,
    TtlMatch,
    MacSourceMatch,
    LimitMatch,
    StatisticMatch,
    NumgenMatch,
    ConntrackMatch,
    MarkMatch,
    FamilyMatch,
    EtherTypeMatch,
    AddrTypeMatch,
    RoutingHeaderMatch,
    RecentMatch,
    TosMatch,
    DscpMatch,
    EcnMatch,
    EspMatch,
]

# --------------------------------------------------------------------------- targets


class Verdict(enum.Enum):
    ACCEPT = "ACCEPT"
    DROP = "DROP"


@dataclass(frozen=True)
class VerdictTarget:
    verdict: Verdict


@dataclass(frozen=True)
class ReturnTarget:
    pass


@dataclass(frozen=True)
class JumpTarget:
    """`-j CHAIN` (come back after it) or `-g CHAIN` (never come back here)."""

    chain: str
    goto: bool = False


class RejectWith(enum.Enum):
    """The replies REJECT can send; values are (ICMP type, code), or None for a TCP RST."""

    NET_UNREACHABLE = "icmp-net-unreachable"
    HOST_UNREACHABLE = "icmp-host-unreachable"
    PROT_UNREACHABLE = "icmp-proto-unreachable"
    PORT_UNREACHABLE = "icmp-port-unreachable"
    NET_PROHIBITED = "icmp-net-prohibited"
    HOST_PROHIBITED = "icmp-host-prohibited"
    ADMIN_PROHIBITED = "icmp-admin-prohibited"
    TCP_RESET = "tcp-reset"
    # ICMPv6 destination unreachable (type 1), by code
    ICMP6_NO_ROUTE = "icmp6-no-route"
    ICMP6_ADM_PROHIBITED = "icmp6-adm-prohibited"
    ICMP6_ADDR_UNREACHABLE = "icmp6-addr-unreachable"
    ICMP6_PORT_UNREACHABLE = "icmp6-port-unreachable"
    # nft's icmpx: the ICMP or ICMPv6 error of the packet's family (inet tables)
    ICMPX_PORT_UNREACHABLE = "icmpx-port-unreachable"
    ICMPX_ADMIN_PROHIBITED = "icmpx-admin-prohibited"
    ICMPX_NO_ROUTE = "icmpx-no-route"
    ICMPX_HOST_UNREACHABLE = "icmpx-host-unreachable"

    @property
    def icmp_code(self) -> Optional[int]:
        """The ICMP (or ICMPv6) code; None for a TCP reset and for icmpx (icmp_codes)."""
        return _REJECT_ICMP_CODES.get(self)

    @classmethod
    def of_family(cls, family: Family) -> list["RejectWith"]:
        """The replies a table of one family can ask for (what ip(6)tables' REJECT
        takes): its ICMP errors and the TCP reset."""
        return [w for w in cls if w.family is family or w is cls.TCP_RESET]

    @property
    def icmp_codes(self) -> tuple[int, int]:
        """An icmpx reply's codes: (for IPv4 packets, for IPv6 ones)."""
        return _REJECT_ICMPX_CODES[self]

    @property
    def family(self) -> Optional[Family]:
        """The family whose packets the reply is for; None for a TCP reset or an icmpx
        reply (either)."""
        if self is RejectWith.TCP_RESET or self in _REJECT_ICMPX_CODES:
            return None
        return Family.IPV6 if self.value.startswith("icmp6") else Family.IPV4


_REJECT_ICMP_CODES = {
    RejectWith.NET_UNREACHABLE: 0,
    RejectWith.HOST_UNREACHABLE: 1,
    RejectWith.PROT_UNREACHABLE: 2,
    RejectWith.PORT_UNREACHABLE: 3,
    RejectWith.NET_PROHIBITED: 9,
    RejectWith.HOST_PROHIBITED: 10,
    RejectWith.ADMIN_PROHIBITED: 13,
    RejectWith.ICMP6_NO_ROUTE: 0,
    RejectWith.ICMP6_ADM_PROHIBITED: 1,
    RejectWith.ICMP6_ADDR_UNREACHABLE: 3,
    RejectWith.ICMP6_PORT_UNREACHABLE: 4,
}
# nf_reject_inet's icmpx codes: (ICMP, ICMPv6)
_REJECT_ICMPX_CODES = {
    RejectWith.ICMPX_PORT_UNREACHABLE: (3, 4),
    RejectWith.ICMPX_ADMIN_PROHIBITED: (13, 1),
    RejectWith.ICMPX_NO_ROUTE: (0, 0),
    RejectWith.ICMPX_HOST_UNREACHABLE: (1, 3),
}


@dataclass(frozen=True)
class RejectTarget:
    with_: RejectWith = RejectWith.PORT_UNREACHABLE


@dataclass(frozen=True)
class LogTarget:
    """LOG does not end the chain walk; the event carries the rule, the prefix stays here.
    NFLOG (`nflog`) is the same event for bpfilter's log, its netlink group, copy length
    (`size`, or the legacy `range`) and batching threshold kept as written."""

    prefix: str = ""
    level: int = 4
    tcp_sequence: bool = False
    tcp_options: bool = False
    ip_options: bool = False
    uid: bool = False
    nflog: bool = False
    group: int = 0
    size: Optional[int] = None
    range: Optional[int] = None
    threshold: int = 0


@dataclass(frozen=True)
class MarkTarget:
    """MARK: mark = (mark & ~mask) ^ value, which every form of it (--set-mark, --and-mark,
    --or-mark, --xor-mark) is. Like LOG, it does not end the walk."""

    value: int
    mask: int = 0xFFFFFFFF


class ConnmarkMode(enum.Enum):
    SET = "set"  # ctmark = (ctmark & ~ctmask) ^ value
    SAVE = "save"  # ctmark = (ctmark & ~ctmask) ^ (mark & nfmask)
    RESTORE = "restore"  # mark = (mark & ~nfmask) ^ (ctmark & ctmask)


@dataclass(frozen=True)
class ConnmarkTarget:
    """CONNMARK: moves bits between the packet's mark and its connection's (nothing for a
    packet with no connection). Does not end the walk."""

    mode: ConnmarkMode
    value: int = 0
    ctmask: int = 0xFFFFFFFF
    nfmask: int = 0xFFFFFFFF


@dataclass(frozen=True)
class NotrackTarget:
    """NOTRACK / CT --notrack (raw table): the packet is not tracked; its state is
    UNTRACKED. Does not end the walk."""

    spelling: str = "NOTRACK"  # or "CT": how iptables-save prints it back


@dataclass(frozen=True)
class ChecksumTarget:
    """CHECKSUM --checksum-fill (mangle): the kernel finishes at once a checksum the device
    was to finish (libvirt's, for DHCP answers to guests that do not); bpfilter leaves it
    to the device as every other packet's: it counts and goes on."""


@dataclass(frozen=True)
class DnatTarget:
    """DNAT (nat table, PREROUTING, OUTPUT): the connection's destination becomes `address`
    (None: kept) and a port of `ports` (None: kept; the packet's own where it is in the
    range and no other connection's reply has it, else the lowest free one, as nf_nat).
    Decided on a connection's first packet; every later packet of both directions is
    rewritten from the binding. Ends the walk (ACCEPT). REDIRECT is DNAT to the primary
    address of the interface the packet came in by. With `last_address`, `address` to it
    is a range, and the connection's addresses choose in it (nf_nat's hash: the same
    client to the same destination, the same address; `persistent`: by the client
    alone)."""

    address: Optional[IPAddress] = None
    ports: Optional[tuple[int, int]] = None
    # How libxt_NAT chooses within a range; with one address and port, no choice is left.
    random: bool = False
    persistent: bool = False
    redirect: bool = False
    last_address: Optional[IPAddress] = None
    # libxt_NAT's port shift (`p-q/base`): port p + (the packet's - base) % the range's size.
    port_base: Optional[int] = None


@dataclass(frozen=True)
class SnatTarget:
    """SNAT (nat table, POSTROUTING) and MASQUERADE: the connection's source becomes
    `address` (MASQUERADE: the address of the interface it leaves by) and a port of
    `ports` (None: the client's own where no other connection has it, else one of its
    class). Decided on a connection's first packet, bound as DNAT's. Ends the walk. An
    address range (`last_address`) chooses as DNAT's, after the client's earlier mapping
    (nf_nat's find_appropriate_src: a client port keeps its address and port to every
    destination while one of its connections lives)."""

    address: Optional[IPAddress] = None
    ports: Optional[tuple[int, int]] = None
    random: bool = False
    random_fully: bool = False
    persistent: bool = False
    masquerade: bool = False
    last_address: Optional[IPAddress] = None


NAT_TARGETS = (DnatTarget, SnatTarget)

Target = Union[VerdictTarget, ReturnTarget, JumpTarget, RejectTarget, LogTarget, MarkTarget,
               ConnmarkTarget, NotrackTarget, ChecksumTarget, DnatTarget, SnatTarget]

# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    target: Optional[Target]
    origin: Origin
    counters: Optional[Counters] = None

    def find(self, kind: type) -> Optional[Match]:
        return next((m for m in self.matches if isinstance(m, kind)), None)


# The priority of connection tracking at every hook (NF_IP_PRI_CONNTRACK): base chains
# below it see packets before they are tracked.
CONNTRACK_PRIORITY = -200


@dataclass(frozen=True)
class Chain:
    """A base chain (built-in in iptables' words) has a policy and the hook it runs at;
    base chains of one hook run in priority order, lowest first, across tables."""

    name: str
    rules: tuple[Rule, ...] = ()
    policy: Optional[Verdict] = None  # None for user-defined (regular) chains
    counters: Optional[Counters] = None
    origin: Optional[Origin] = None
    hook: Optional[Hook] = None  # None: no hook runs it (user chains, tables not compiled)
    priority: int = 0
    device: Optional[str] = None  # an INGRESS chain runs for this device's frames only
    nat: bool = False  # a NAT chain: it sees a connection's first packet only

    @property
    def builtin(self) -> bool:
        return self.policy is not None

    @property
    def before_tracking(self) -> bool:
        return self.priority < CONNTRACK_PRIORITY


@dataclass(frozen=True)
class Table:
    """`xtables`: an iptables table, whose name fixes its chains and the targets it takes
    (xt_target.table: REJECT only in filter, ...); nftables tables are named freely."""

    name: str
    chains: tuple[Chain, ...]
    origin: Optional[Origin] = None
    xtables: bool = True
    family: Optional[Family] = Family.IPV4  # None: both (an nft inet table)

    @functools.cached_property
    def key(self) -> str:
        """What tells the table apart in a ruleset of both families: an ip and an ip6 table
        may share a name (iptables' and ip6tables' filter), and an inet or netdev one too."""
        if self.family is Family.IPV4:
            return self.name
        if self.family is Family.IPV6:
            return f"ip6 {self.name}"
        return f"{'netdev' if self.netdev else 'inet'} {self.name}"

    @functools.cached_property
    def netdev(self) -> bool:
        """nft's netdev family: its base chains run at INGRESS, on every frame."""
        return any(chain.hook is Hook.INGRESS for chain in self.chains)

    def chain(self, name: str) -> Optional[Chain]:
        return self._by_name.get(name)

    def reached(self, entry: str) -> list[str]:
        """The user chains a jump or goto from `entry` can reach, directly or not."""
        seen: dict[str, None] = {}
        todo = [entry]
        while todo:
            for rule in self.chain(todo.pop()).rules:
                if isinstance(rule.target, JumpTarget) and rule.target.chain not in seen:
                    seen[rule.target.chain] = None
                    todo.append(rule.target.chain)
        return list(seen)

    @functools.cached_property
    def _by_name(self) -> dict[str, Chain]:
        """Passes look chains up by name all the time; kube-proxy's tables have thousands
        (a linear search was most of the passes' time at 3,000 chains)."""
        by_name: dict[str, Chain] = {}
        for chain in self.chains:
            by_name.setdefault(chain.name, chain)
        return by_name


@dataclass(frozen=True)
class Ruleset:
    family: Family
    tables: tuple[Table, ...] = field(default_factory=tuple)
    source: str = "<input>"

    def table(self, key: str) -> Optional[Table]:
        """The table of this key (Table.key: its name, for an IPv4 table)."""
        return next((t for t in self.tables if t.key == key), None)

    def rules(self):
        """Every rule with its table and chain, in file order."""
        for table in self.tables:
            for chain in table.chains:
                for rule in chain.rules:
                    yield table, chain, rule
