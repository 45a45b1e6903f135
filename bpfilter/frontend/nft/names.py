"""Names nftables accepts for numbers, spelled as `nft list ruleset` prints them."""

from __future__ import annotations

from bpfilter import ir

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
# The families bpfilter reads, and the IP packets each sees (None: both; a netdev table
# sees every frame the device receives, IP or not).
TABLE_FAMILIES = {"ip": ir.Family.IPV4, "ip6": ir.Family.IPV6, "inet": None, "netdev": None}
FAMILY_NAMES = {ir.Family.IPV4: "ip", ir.Family.IPV6: "ip6", None: "inet"}
# What `meta protocol` (the EtherType) and `meta nfproto` compare with.
FAMILY_WORDS = {
    "meta protocol": {"ip": ir.Family.IPV4, "0x0800": ir.Family.IPV4, "2048": ir.Family.IPV4,
                      "ip6": ir.Family.IPV6, "0x86dd": ir.Family.IPV6,
                      "34525": ir.Family.IPV6},
    "meta nfproto": {"ipv4": ir.Family.IPV4, "ipv6": ir.Family.IPV6},
}
NFPROTO_NAMES = {ir.Family.IPV4: "ipv4", ir.Family.IPV6: "ipv6"}
# The words that open a block when a `{` follows them.
BLOCKS = ("table", "chain", "set", "map", "flowtable")

HOOKS = {"prerouting": ir.Hook.PREROUTING, "input": ir.Hook.INPUT,
         "forward": ir.Hook.FORWARD, "output": ir.Hook.OUTPUT,
         "postrouting": ir.Hook.POSTROUTING}
# A netdev chain runs where the device hands a frame to the stack, before PREROUTING.
NETDEV_HOOKS = {"ingress": ir.Hook.INGRESS}
HOOK_NAMES = {hook: name for name, hook in (HOOKS | NETDEV_HOOKS).items()}
# The EtherTypes nft names (`ether type arp`, `meta protocol vlan`).
ETHERTYPES = {"ip": ir.ETHERTYPE_IP, "arp": 0x0806, "ip6": ir.ETHERTYPE_IPV6,
              "vlan": 0x8100, "8021ad": 0x88A8}
ETHERTYPE_NAMES = {value: name for name, value in ETHERTYPES.items()}

# nft's standard priority names (ip family).
PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
              "srcnat": 100}

PROTOCOLS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
             "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132, "udplite": 136}
PROTOCOL_NAMES = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah",
                  58: "ipv6-icmp", 132: "sctp", 136: "udplite"}

# nft's icmp_type names; a type alone matches every code.
ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5,
    "echo-request": 8, "router-advertisement": 9, "router-solicitation": 10,
    "time-exceeded": 11, "parameter-problem": 12, "timestamp-request": 13,
    "timestamp-reply": 14, "info-request": 15, "info-reply": 16,
    "address-mask-request": 17, "address-mask-reply": 18,
}
ICMP_TYPE_NAMES = {number: name for name, number in ICMP_TYPES.items()}
# icmp_code names (`icmp code port-unreachable`).
ICMP_CODES = {"net-unreachable": 0, "host-unreachable": 1, "prot-unreachable": 2,
              "port-unreachable": 3, "frag-needed": 4, "net-prohibited": 9,
              "host-prohibited": 10, "admin-prohibited": 13}

# icmpv6_type names
ICMP6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3,
    "parameter-problem": 4, "echo-request": 128, "echo-reply": 129,
    "mld-listener-query": 130, "mld-listener-report": 131, "mld-listener-done": 132,
    "mld-listener-reduction": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
    "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137,
    "router-renumbering": 138, "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142,
    "mld2-listener-report": 143,
}
ICMP6_TYPE_NAMES = {number: name for name, number in ICMP6_TYPES.items()}
ICMP6_CODES = {"no-route": 0, "admin-prohibited": 1, "addr-unreachable": 3,
               "port-unreachable": 4, "policy-fail": 5, "reject-route": 6}
REJECT6_CODES = {
    "no-route": ir.RejectWith.ICMP6_NO_ROUTE,
    "admin-prohibited": ir.RejectWith.ICMP6_ADM_PROHIBITED,
    "addr-unreachable": ir.RejectWith.ICMP6_ADDR_UNREACHABLE,
    "port-unreachable": ir.RejectWith.ICMP6_PORT_UNREACHABLE,
}
REJECT6_NAMES = {value: name for name, value in REJECT6_CODES.items()}
# icmpx: the error of the packet's family
REJECTX_CODES = {
    "port-unreachable": ir.RejectWith.ICMPX_PORT_UNREACHABLE,
    "admin-prohibited": ir.RejectWith.ICMPX_ADMIN_PROHIBITED,
    "no-route": ir.RejectWith.ICMPX_NO_ROUTE,
    "host-unreachable": ir.RejectWith.ICMPX_HOST_UNREACHABLE,
}
REJECTX_NAMES = {value: name for name, value in REJECTX_CODES.items()}

REJECT_CODES = {
    "net-unreachable": ir.RejectWith.NET_UNREACHABLE,
    "host-unreachable": ir.RejectWith.HOST_UNREACHABLE,
    "prot-unreachable": ir.RejectWith.PROT_UNREACHABLE,
    "port-unreachable": ir.RejectWith.PORT_UNREACHABLE,
    "net-prohibited": ir.RejectWith.NET_PROHIBITED,
    "host-prohibited": ir.RejectWith.HOST_PROHIBITED,
    "admin-prohibited": ir.RejectWith.ADMIN_PROHIBITED,
}
REJECT_NAMES = {value: name for name, value in REJECT_CODES.items()}

TCP_FLAGS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20,
             "ecn": 0x40, "cwr": 0x80}

CT_STATES = {"invalid": "INVALID", "new": "NEW", "related": "RELATED",
             "established": "ESTABLISHED", "untracked": "UNTRACKED"}
# The status bits bpfilter keeps: what NAT did to the connection.
CT_STATUS_NAT = {"snat": "SNAT", "dnat": "DNAT"}

LOG_LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warn": 4, "notice": 5,
              "info": 6, "debug": 7}
LOG_LEVEL_NAMES = {number: name for name, number in LOG_LEVELS.items()}

LIMIT_UNITS = {"second": "sec", "minute": "min", "hour": "hour", "day": "day"}
LIMIT_UNIT_NAMES = {unit: name for name, unit in LIMIT_UNITS.items()}

# Words nft's scanner reads as its own (a few hundred; these are the ones a rule bpfilter
# reads can meet): never an unquoted interface name.
KEYWORDS = frozenset(
    ["accept", "drop", "reject", "return", "jump", "goto", "continue", "queue", "counter",
     "comment", "limit", "log", "notrack", "meta", "ct", "vmap", "map", "set", "with",
     "rate", "burst", "over", "prefix", "level", "flags", "type", "code", "saddr", "daddr",
     "sport", "dport", "protocol", "l4proto", "nfproto", "iifname", "oifname", "iif",
     "oif", "mark", "length", "ttl", "hoplimit", "state", "direction", "status",
     "original", "reply", "ip", "ip6", "inet", "tcp", "udp", "icmp", "icmpv6", "icmpx",
     "th", "ether", "and", "or", "xor", "table", "chain", "rule", "elements", "packets",
     "bytes", "reset", "new", "established", "related", "invalid", "untracked"]
    + list(PROTOCOLS))

# `fib ... type`'s values (nft's fib_addr_type), the kernel's RTN_* from unspec to
# prohibit: iptables' addrtype names, lower case.
FIB_TYPES = ("unspec", "unicast", "local", "broadcast", "anycast", "multicast", "blackhole",
             "unreachable", "prohibit")
