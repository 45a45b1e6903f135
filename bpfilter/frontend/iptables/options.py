"""Reads one rule's argument vector into typed matches and a target.

This mirrors iptables' own option loop: base options (`-s -d -i -o -p -f`) are always
known, `-m NAME` loads a match module whose options are then accepted, and a protocol given
with `-p tcp|udp|icmp` loads that module implicitly, as iptables does. Every token keeps its
position so an error can point at it.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
import socket
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.frontend.iptables import names


class Token(NamedTuple):
    """A word of a rule and where it starts (a tuple: a large ruleset makes millions)."""

    value: str
    line: int
    column: int


SUPPORTED_MATCHES = ("tcp", "udp", "icmp", "icmp6", "multiport", "iprange", "comment",
                     "length", "ttl", "hl", "mac", "limit", "conntrack", "state", "mark",
                     "connmark", "addrtype", "statistic", "rt", "recent", "tos", "dscp",
                     "ecn", "esp")
# Modules of one family only: iptables' ICMP and TTL, ip6tables' ICMPv6 and hop limit.
_FAMILY_MODULES = {"icmp": (ir.Family.IPV4, "icmp6"), "ttl": (ir.Family.IPV4, "hl"),
                   "icmp6": (ir.Family.IPV6, "icmp"), "hl": (ir.Family.IPV6, "ttl"),
                   "rt": (ir.Family.IPV6, None)}
# The module a protocol loads by itself (`-p tcp --dport 22`).
_PROTOCOL_MODULES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6", 50: "esp"}
SUPPORTED_TARGETS = ("ACCEPT, DROP, RETURN, REJECT, LOG, NFLOG, MARK, CONNMARK, NOTRACK, "
                     "CHECKSUM, "
                     "CT --notrack, DNAT (nat PREROUTING, OUTPUT), REDIRECT (nat PREROUTING), "
                     "SNAT and MASQUERADE (nat POSTROUTING), or a user-defined chain")
PLANNED_MATCHES = {
    "set": "ipsets are not supported yet",
}


@dataclass
class _Module:
    """A loaded match module collecting its options until the rule ends."""

    name: str
    token: Token
    values: dict = field(default_factory=dict)


class RuleReader:
    def __init__(self, tokens: list[Token], file: str, table: str,
                 family: ir.Family = ir.Family.IPV4):
        self.tokens = tokens
        self.pos = 0
        self.file = file
        self.table = table
        self.family = family
        self.base: dict[str, ir.Match] = {}
        self.seen_base: set[str] = set()  # -s -d -i -o -p -f: each once, as iptables
        self.seen_target_options: set[Callable] = set()
        self.modules: list[_Module] = []
        self.target: Optional[ir.Target] = None
        self.target_token: Optional[Token] = None
        self.target_options: dict = {}

    # ----------------------------------------------------------------- token helpers

    def error(self, tok: Token, why: str, supported: Optional[str] = None) -> InputError:
        return InputError(self.file, tok.line, tok.value, why, supported, tok.column)

    def _next(self) -> Optional[Token]:
        if self.pos >= len(self.tokens):
            return None
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def argument(self, option: Token) -> Token:
        tok = self._next()
        if tok is None or (tok.value.startswith("-") and len(tok.value) > 1
                           and not tok.value[1].isdigit()):
            raise self.error(option, "option needs an argument")
        return tok

    # ----------------------------------------------------------------- main loop

    def read(self) -> tuple[tuple[ir.Match, ...], Optional[ir.Target]]:
        while (tok := self._next()) is not None:
            negate = False
            if tok.value == "!":
                negate = True
                tok = self._next()
                if tok is None:
                    raise self.error(self.tokens[-1], "'!' must be followed by an option")
            self._option(tok, negate)
        return self._matches(), self._finish_target()

    def _option(self, tok: Token, negate: bool) -> None:
        opt = tok.value
        base = _BASE_OPTIONS.get(opt)
        if base is not None:
            letter = _BASE_LETTERS[opt]
            if letter in self.seen_base:
                raise self.error(tok, f"multiple {letter} flags not allowed")
            self.seen_base.add(letter)
            base(self, tok, negate)
            return
        if opt in ("-m", "--match"):
            self._no_negate(tok, negate)
            self._load_module(self.argument(tok))
            return
        if opt in ("-j", "--jump", "-g", "--goto"):
            self._no_negate(tok, negate)
            self._set_target(tok, self.argument(tok), goto=opt in ("-g", "--goto"))
            return
        if self.target_token is not None and opt in _TARGET_OPTIONS.get(
                self.target_token.value, {}):
            self._no_negate(tok, negate)
            handler = _TARGET_OPTIONS[self.target_token.value][opt]
            if handler in self.seen_target_options:
                raise self.error(tok, f"{self.target_token.value}: option \"{opt}\" can only "
                                 "be used once")
            self.seen_target_options.add(handler)
            handler(self, tok)
            return
        for module in reversed(self.modules):
            handler = _MODULE_OPTIONS[module.name].get(opt)
            if handler is not None:
                handler(self, module, tok, negate)
                return
        implicit = self._implicit_module(opt)
        if implicit is not None:
            _MODULE_OPTIONS[implicit.name][opt](self, implicit, tok, negate)
            return
        loaded = ", ".join(m.name for m in self.modules) or "none"
        raise self.error(tok, f"unknown option (match modules loaded: {loaded})",
                         "-s -d -i -o -p -f -m -j -g and the options of the loaded modules")

    def _no_negate(self, tok: Token, negate: bool) -> None:
        if negate:
            raise self.error(tok, "cannot be negated with '!'")

    def _implicit_module(self, opt: str) -> Optional[_Module]:
        """`-p tcp --dport 22` loads the tcp match without `-m tcp`, as iptables does."""
        proto = self.base.get("proto")
        if not isinstance(proto, ir.ProtocolMatch) or proto.negate:
            return None
        name = _PROTOCOL_MODULES.get(proto.protocol)
        if name is not None and opt in _MODULE_OPTIONS[name] and \
                _FAMILY_MODULES.get(name, (self.family,))[0] is self.family:
            tok = Token(name, 0, 0)
            module = _Module(name, tok)
            self.modules.append(module)
            return module
        return None

    def _load_module(self, tok: Token) -> None:
        name = tok.value
        if name in PLANNED_MATCHES:
            raise self.error(tok, f"match module '{name}': {PLANNED_MATCHES[name]}",
                             ", ".join(SUPPORTED_MATCHES))
        if name not in _MODULE_OPTIONS:
            raise self.error(tok, f"unknown or unsupported match module '{name}'",
                             ", ".join(SUPPORTED_MATCHES))
        family, other = _FAMILY_MODULES.get(name, (self.family, name))
        if family is not self.family:
            raise self.error(tok, f"'-m {name}' is an IPv{family.value[-1]} match; this is "
                             f"an IPv{self.family.value[-1]} ruleset",
                             other and f"-m {other}")
        self.modules.append(_Module(name, tok))

    # ----------------------------------------------------------------- results

    def _check_protocols(self) -> None:
        """A protocol's match needs the rule's `-p` of that protocol, anywhere in the rule
        (the kernel checks the whole rule when it loads it)."""
        proto = self.base.get("proto")
        for module in self.modules:
            number = next((n for n, m in _PROTOCOL_MODULES.items() if m == module.name), None)
            if number is not None and not (isinstance(proto, ir.ProtocolMatch)
                                           and not proto.negate and proto.protocol == number):
                raise self.error(module.token, f"'-m {module.name}' needs "
                                 f"'-p {names.PROTOCOL_NAMES[number]}' in the rule (the "
                                 "kernel refuses the rule otherwise)")

    def _matches(self) -> tuple[ir.Match, ...]:
        self._check_protocols()
        ordered = [self.base[k] for k in ("src", "dst", "in", "out", "proto", "frag")
                   if k in self.base]
        for module in self.modules:
            ordered.append(_BUILDERS[module.name](self, module))
        return tuple(ordered)

    def _set_target(self, opt: Token, tok: Token, goto: bool) -> None:
        if self.target_token is not None:
            raise self.error(opt, "a rule can have only one target")
        self.target_token = tok
        name = tok.value
        if goto:
            if name in _TARGET_OPTIONS or name in ("ACCEPT", "DROP", "RETURN"):
                raise self.error(tok, "-g needs a user-defined chain")
            self.target = ir.JumpTarget(name, goto=True)
        elif name in ("ACCEPT", "DROP"):
            self.target = ir.VerdictTarget(ir.Verdict(name))
        elif name == "RETURN":
            self.target = ir.ReturnTarget()
        elif name in _TARGET_OPTIONS:
            self.target = None  # built when the rule ends, from its options
        elif name in _KNOWN_UNSUPPORTED_TARGETS:
            raise self.error(tok, "target not supported yet", SUPPORTED_TARGETS)
        else:
            self.target = ir.JumpTarget(name)

    def _finish_target(self) -> Optional[ir.Target]:
        if self.target_token is None:
            return None
        name = self.target_token.value
        if name == "REJECT":
            with_ = self.target_options.get("with", ir.RejectWith.ICMP6_PORT_UNREACHABLE
                                            if self.family is ir.Family.IPV6
                                            else ir.RejectWith.PORT_UNREACHABLE)
            if with_ is ir.RejectWith.TCP_RESET:
                proto = self.base.get("proto")
                if not (isinstance(proto, ir.ProtocolMatch) and proto.protocol == 6
                        and not proto.negate):
                    raise self.error(self.target_token,
                                     "--reject-with tcp-reset needs '-p tcp'")
            return ir.RejectTarget(with_)
        if name == "LOG":
            return ir.LogTarget(**self.target_options)
        if name == "NFLOG":
            return ir.LogTarget(nflog=True, **self.target_options)
        if name == "MARK":
            return ir.MarkTarget(*_require_target(self, "mark", _MARK_FORMS))
        if name == "CONNMARK":
            return _connmark_target(self)
        if name in ("NOTRACK", "CT"):
            if name == "CT" and not self.target_options.get("notrack"):
                raise self.error(self.target_token, "CT needs --notrack",
                                 "CT --notrack (zones, helpers, timeouts, events: not "
                                 "supported yet)")
            return ir.NotrackTarget(name)
        if name == "CHECKSUM":
            _require_target(self, "fill", "--checksum-fill")
            return ir.ChecksumTarget()
        if name in ("DNAT", "REDIRECT"):
            return _dnat_target(self)
        if name in ("SNAT", "MASQUERADE"):
            return _snat_target(self)
        return self.target


# Any other name is taken as a user chain; the validation pass reports it if none exists.
_KNOWN_UNSUPPORTED_TARGETS = {
    "TPROXY",
    "NFQUEUE", "QUEUE", "TCPMSS", "TOS", "DSCP", "TTL", "CLASSIFY", "ULOG", "TEE",
    "SET", "AUDIT", "SECMARK", "CONNSECMARK", "TRACE", "IDLETIMER", "LED",
    "HMARK", "SYNPROXY", "NETMAP", "CLUSTERIP", "ECN",
}

# --------------------------------------------------------------------------- values


@functools.lru_cache(maxsize=65536)
def _address_value(kind: type, text: str, **options):
    """ipaddress' reading of `text` (None: not one), once per text: a generated ruleset
    names each address many times, and the objects are immutable."""
    try:
        return kind(text, **options)
    except ValueError:
        return None


def _parse_network(reader: RuleReader, tok: Token) -> ir.IPNetwork:
    v6 = reader.family is ir.Family.IPV6
    network = _address_value(ipaddress.IPv6Network if v6 else ipaddress.IPv4Network,
                             tok.value, strict=False)
    if network is None:
        raise reader.error(tok, f"not an IPv{6 if v6 else 4} address or prefix",
                           "x:y::z or x:y::/len" if v6 else
                           "a.b.c.d or a.b.c.d/len (host names are not resolved)")
    return network


def _parse_address(reader: RuleReader, tok: Token, text: str) -> ir.IPAddress:
    v6 = reader.family is ir.Family.IPV6
    address = _address_value(ipaddress.IPv6Address if v6 else ipaddress.IPv4Address, text)
    if address is None:
        raise reader.error(tok, f"'{text}' is not an IPv{6 if v6 else 4} address")
    return address


# Numbers as iptables reads most of them (xtables_strtoul: C's strtoumax in base 0): 0x
# is hex and a leading 0 octal (`--dport 026` is port 22), ASCII digits only. Ports of a
# range option (udp's, conntrack's: getaddrinfo) and the limit rate (atoi) are decimal.
_C_NUMBER = re.compile(r"\+?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_DECIMAL = re.compile(r"\+?[0-9]+")


def _c_number(text: str, decimal: bool = False) -> Optional[int]:
    if not (_DECIMAL if decimal else _C_NUMBER).fullmatch(text):
        return None
    digits = text.lstrip("+")
    if decimal:
        return int(digits)
    if digits[:2] in ("0x", "0X"):
        return int(digits, 16)
    return int(digits, 8) if digits.startswith("0") else int(digits)


def _parse_int(reader: RuleReader, tok: Token, text: str, low: int, high: int,
               what: str, decimal: bool = False) -> int:
    value = _c_number(text, decimal)
    if value is None:
        raise reader.error(tok, f"'{text}' is not a {what}",
                           "decimal numbers" if decimal else
                           "decimal, 0x hexadecimal or 0-prefixed octal numbers")
    if not low <= value <= high:
        raise reader.error(tok, f"{what} {value} is out of range {low}-{high}")
    return value


def _parse_port(reader: RuleReader, tok: Token, text: str, proto: str,
                decimal: bool = False) -> int:
    """A port number or service name. `decimal`: a port of a range option (any
    protocol's service names, as getaddrinfo finds them)."""
    value = _c_number(text, decimal)
    if value is not None:
        return _parse_int(reader, tok, text, 0, 65535, "port", decimal)
    try:
        return socket.getservbyname(*((text,) if decimal else (text, proto)))
    except OSError:
        raise reader.error(tok, f"unknown service name '{text}'",
                           "port numbers, or names in /etc/services") from None


def _parse_port_range(reader: RuleReader, tok: Token, text: str, proto: str,
                      decimal: bool = False) -> ir.Range:
    """`decimal`: a range option's (udp, conntrack), which takes an inverted range and
    then matches nothing; the others (tcp, multiport) refuse one, as iptables does."""
    if ":" not in text:
        port = _parse_port(reader, tok, text, proto, decimal)
        return ir.Range(port, port)
    low_text, high_text = text.split(":", 1)
    low = _parse_port(reader, tok, low_text, proto, decimal) if low_text else 0
    high = _parse_port(reader, tok, high_text, proto, decimal) if high_text else 65535
    if low > high:
        if not decimal:
            raise reader.error(tok, "invalid port range (min > max)")
        raise reader.error(tok, "empty port range: the kernel takes it and then matches no "
                           "packet (negated: every packet); bpfilter does not compile it",
                           "a range low:high with low <= high")
    return ir.Range(low, high)


def _parse_int_range(reader: RuleReader, tok: Token, high_max: int, what: str) -> ir.Range:
    text = tok.value
    if ":" not in text:
        value = _parse_int(reader, tok, text, 0, high_max, what)
        return ir.Range(value, value)
    low_text, high_text = text.split(":", 1)
    low = _parse_int(reader, tok, low_text, 0, high_max, what) if low_text else 0
    high = _parse_int(reader, tok, high_text, 0, high_max, what) if high_text else high_max
    if low > high:
        raise reader.error(tok, f"empty {what} range")
    return ir.Range(low, high)


def _parse_tcp_flag_list(reader: RuleReader, tok: Token) -> int:
    value = 0
    for flag in tok.value.split(","):
        flag = flag.upper()
        if flag == "ALL":
            value |= names.TCP_FLAGS_ALL
        elif flag == "NONE":
            continue
        elif flag in names.TCP_FLAGS:
            value |= names.TCP_FLAGS[flag]
        else:
            raise reader.error(tok, f"unknown TCP flag '{flag}'",
                               "FIN SYN RST PSH ACK URG ALL NONE")
    return value


# --------------------------------------------------------------------------- base options


def _base_address(key: str):
    def handler(reader: RuleReader, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        if "," in arg.value:
            raise reader.error(arg, "several addresses in one rule are expanded by "
                               "iptables into several rules; write one rule each")
        reader.base[key] = ir.AddressMatch(key, _parse_network(reader, arg), negate)
    return handler


def _base_interface(key: str):
    def handler(reader: RuleReader, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        if len(arg.value) > 15:
            raise reader.error(arg, "interface names are at most 15 characters")
        reader.base[key] = ir.InterfaceMatch(key, arg.value, negate)
    return handler


def _base_protocol(reader: RuleReader, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    text = arg.value.lower()
    if text in names.PROTOCOL_ALIASES:
        number = names.PROTOCOL_ALIASES[text]
    elif text in names.PROTOCOLS:
        number = names.PROTOCOLS[text]
    else:
        number = _parse_int(reader, arg, text, 0, 255, "protocol number")
    if number == 0:
        if negate:
            raise reader.error(arg, "'! -p all' matches nothing; iptables refuses it")
        reader.base.pop("proto", None)
        return
    reader.base["proto"] = ir.ProtocolMatch(number, negate)


def _base_fragment(reader: RuleReader, tok: Token, negate: bool) -> None:
    if reader.family is ir.Family.IPV6:
        raise reader.error(tok, "ip6tables has no -f (IPv6 fragments are an extension "
                           "header: -m frag, not supported yet)")
    reader.base["frag"] = ir.FragmentMatch(negate)


_BASE_OPTIONS: dict[str, Callable] = {
    "-s": _base_address("src"), "--source": _base_address("src"),
    "--src": _base_address("src"),
    "-d": _base_address("dst"), "--destination": _base_address("dst"),
    "--dst": _base_address("dst"),
    "-i": _base_interface("in"), "--in-interface": _base_interface("in"),
    "-o": _base_interface("out"), "--out-interface": _base_interface("out"),
    "-p": _base_protocol, "--protocol": _base_protocol,
    "-f": _base_fragment, "--fragment": _base_fragment,
}
# Each base option's short name (iptables allows each once, by any of its names).
_BASE_LETTERS = {"-s": "-s", "--source": "-s", "--src": "-s",
                 "-d": "-d", "--destination": "-d", "--dst": "-d",
                 "-i": "-i", "--in-interface": "-i", "-o": "-o", "--out-interface": "-o",
                 "-p": "-p", "--protocol": "-p", "-f": "-f", "--fragment": "-f"}

# --------------------------------------------------------------------------- match modules


def _once(reader: RuleReader, module: _Module, key: str, tok: Token, value) -> None:
    if key in module.values:
        raise reader.error(tok, f"given twice in one '-m {module.name}'")
    module.values[key] = value


def _port_option(key: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        ports = _parse_port_range(reader, arg, arg.value, module.name, module.name == "udp")
        _once(reader, module, key, tok, ir.PortSpec(ports, negate))
    return handler


def _tcp_flags(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    mask = _parse_tcp_flag_list(reader, reader.argument(tok))
    comp = _parse_tcp_flag_list(reader, reader.argument(tok))
    _once(reader, module, "flags", tok, ir.TcpFlagsSpec(mask, comp, negate))


def _tcp_syn(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    flags = names.TCP_FLAGS
    mask = flags["FIN"] | flags["SYN"] | flags["RST"] | flags["ACK"]
    _once(reader, module, "flags", tok, ir.TcpFlagsSpec(mask, flags["SYN"], negate))


def _tcp_option(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    raise reader.error(tok, "TCP option matching is not supported yet",
                       "--sport --dport --tcp-flags --syn")


def _icmp_type(version: int):
    known = names.ICMP6_TYPES if version == 6 else names.ICMP_TYPES

    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        if arg.value in known:
            icmp_type, low, high = known[arg.value]
        else:
            type_text, _, code_text = arg.value.partition("/")
            icmp_type = _parse_int(reader, arg, type_text, 0, 255, "ICMP type")
            if code_text:
                low = high = _parse_int(reader, arg, code_text, 0, 255, "ICMP code")
            else:
                low, high = 0, 255
        _once(reader, module, "type", tok,
              ir.IcmpMatch(icmp_type, ir.Range(low, high), negate, version=version))
    return handler


def _multiport(direction: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        proto = reader.base.get("proto")
        proto_name = names.PROTOCOL_NAMES.get(getattr(proto, "protocol", 0), "tcp")
        if proto is None or proto.negate or proto.protocol not in (6, 17, 132, 136, 33):
            raise reader.error(module.token, "multiport needs '-p tcp', '-p udp', "
                               "'-p udplite', '-p sctp' or '-p dccp'")
        ports = tuple(_parse_port_range(reader, arg, part, proto_name)
                      for part in arg.value.split(","))
        if sum(1 if p.single else 2 for p in ports) > 15:
            raise reader.error(arg, "multiport takes at most 15 ports (a range counts 2)")
        _once(reader, module, "ports", tok, ir.MultiportMatch(direction, ports, negate))
    return handler


def _iprange(key: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        low_text, sep, high_text = arg.value.partition("-")
        low = _parse_address(reader, arg, low_text)
        high = _parse_address(reader, arg, high_text) if sep else low
        _once(reader, module, key, tok, ir.AddressRangeSpec(low, high, negate))
    return handler


def _comment(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    arg = reader.argument(tok)
    if len(arg.value) > 255:
        raise reader.error(arg, "comments are at most 255 characters")
    _once(reader, module, "text", tok, arg.value)


def _length(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    _once(reader, module, "length", tok,
          ir.LengthMatch(_parse_int_range(reader, arg, 65535, "length"), negate))


def _ttl(op: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        if negate and op != "eq":
            raise reader.error(tok, "only --ttl-eq can be negated")
        arg = reader.argument(tok)
        value = _parse_int(reader, arg, arg.value, 0, 255, "TTL")
        _once(reader, module, "ttl", tok, ir.TtlMatch(op, value, negate))
    return handler


_U32 = 0xFFFFFFFF


def _rt_number(field_: str):
    """--rt-type and --rt-len: 32-bit numbers, as libip6t_rt reads them (a type past 255
    never matches)."""
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        value = _parse_int(reader, arg, arg.value, 0, _U32, f"routing header {field_}")
        key = "rt_type" if field_ == "type" else field_
        _once(reader, module, field_, tok, {key: value, f"{field_}_negate": negate})
    return handler


def _rt_segsleft(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    _once(reader, module, "segsleft", tok,
          {"segsleft": _parse_int_range(reader, arg, _U32, "segments left"),
           "segsleft_negate": negate})


def _rt_reserved(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    given = module.values.get("type", {})
    if given.get("rt_type") != 0 or given.get("type_negate"):
        raise reader.error(tok, "`--rt-type 0' required before `--rt-0-res'")
    _once(reader, module, "reserved", tok, {"reserved_zero": True})


def _rt_addresses(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    raise reader.error(tok, "type 0 routing headers' address lists are not compiled (RFC "
                       "5095 deprecated type 0: hosts drop such headers)",
                       "--rt-type, --rt-segsleft, --rt-len, --rt-0-res")


# libxt_tos's names (a value of the precedence-less TOS bits: mask 0x3f), any case
_TOS_NAMES = {"minimize-delay": 0x10, "maximize-throughput": 0x08,
              "maximize-reliability": 0x04, "minimize-cost": 0x02, "normal-service": 0x00}
# dscp_helper.c's classes, any case
_DSCP_CLASSES = {"CS0": 0x00, "CS1": 0x08, "CS2": 0x10, "CS3": 0x18, "CS4": 0x20, "CS5": 0x28,
                 "CS6": 0x30, "CS7": 0x38, "BE": 0x00, "AF11": 0x0a, "AF12": 0x0c,
                 "AF13": 0x0e, "AF21": 0x12, "AF22": 0x14, "AF23": 0x16, "AF31": 0x1a,
                 "AF32": 0x1c, "AF33": 0x1e, "AF41": 0x22, "AF42": 0x24, "AF43": 0x26,
                 "EF": 0x2e}


def _tos(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    """xtables_parse_tos(): VALUE[/MASK] (a number alone: mask 0xff) or a name (0x3f)."""
    arg = reader.argument(tok)
    named = _TOS_NAMES.get(arg.value.lower())
    if named is not None:
        value, mask = named, 0x3f
    else:
        text, _sep, mask_text = arg.value.partition("/")
        value = _parse_int(reader, arg, text, 0, 255, "TOS value")
        mask = _parse_int(reader, arg, mask_text, 0, 255, "TOS mask") if _sep else 0xff
    _once(reader, module, "tos", tok, ir.TosMatch(value, mask, negate))


def _dscp(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    _once(reader, module, "dscp", tok,
          ir.DscpMatch(_parse_int(reader, arg, arg.value, 0, 0x3f, "DSCP value"), negate))


def _dscp_class(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    value = _DSCP_CLASSES.get(arg.value.upper())
    if value is None:
        raise reader.error(arg, f"invalid DSCP class '{arg.value}'", ", ".join(_DSCP_CLASSES))
    _once(reader, module, "dscp", tok, ir.DscpMatch(value, negate))


def _ecn_flag(flag: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        _once(reader, module, flag, tok, not negate)
    return handler


def _ecn_ect(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    _once(reader, module, "ect", tok, _parse_int(reader, arg, arg.value, 0, 3, "ECN codepoint"))
    module.values["ect_negate"] = negate


def _ecn(reader: RuleReader, module: _Module) -> ir.EcnMatch:
    """libxt_ecn needs one test; the kernel refuses TCP's flags without `-p tcp`."""
    if not module.values:
        raise reader.error(module.token, "'-m ecn' needs --ecn-tcp-ece, --ecn-tcp-cwr or "
                           "--ecn-ip-ect")
    proto = reader.base.get("proto")
    if ("ece" in module.values or "cwr" in module.values) and not (
            isinstance(proto, ir.ProtocolMatch) and proto.protocol == 6 and not proto.negate):
        raise reader.error(module.token, "'-m ecn' tests TCP's flags only with '-p tcp' in "
                           "the rule (the kernel refuses the rule otherwise)")
    return ir.EcnMatch(**module.values)


def _esp_spi(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    """SPI[:SPI] (either end may be left out), as libxt_esp reads it, in any order."""
    arg = reader.argument(tok)
    low_text, sep, high_text = arg.value.partition(":")
    low = _parse_int(reader, arg, low_text, 0, _U32, "SPI") if low_text or not sep else 0
    high = (_parse_int(reader, arg, high_text, 0, _U32, "SPI") if high_text else _U32) \
        if sep else low
    _once(reader, module, "spi", tok, ir.EspMatch(low, high, negate))


def _recent_mode(mode: str):
    """--set, --rcheck, --update, --remove: one per match; `!` inverts the answer."""
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        if "mode" in module.values:
            raise reader.error(tok, "only one of --set, --rcheck, --update, --remove per "
                               "'-m recent'")
        module.values["mode"] = (mode, tok)
        module.values["invert"] = negate
    return handler


def _recent_number(key: str, top: int):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        reader._no_negate(tok, negate)
        arg = reader.argument(tok)
        what = "hit count (the kernel keeps at most 255 sightings)" if key == "hitcount" \
            else "number of seconds"
        _once(reader, module, key, tok, _parse_int(reader, arg, arg.value, 0, top, what))
    return handler


def _recent_flag(key: str, value):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        reader._no_negate(tok, negate)
        module.values[key] = value  # libxt_recent: the last of --rsource/--rdest wins
    return handler


def _recent_name(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    arg = reader.argument(tok)
    if not arg.value or len(arg.value) >= 200 or "/" in arg.value:
        raise reader.error(arg, "a recent list's name is 1 to 199 characters without '/' "
                           "(the kernel names /proc/net/xt_recent/NAME by it)")
    _once(reader, module, "name", tok, arg.value)


def _recent_mask(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    arg = reader.argument(tok)
    mask = _parse_address(reader, arg, arg.value)
    hosts = ~int(mask) & (2 ** 128 - 1)
    if mask.version == 6 and hosts & (hosts + 1):
        raise reader.error(arg, "an IPv6 mask other than a prefix's is not compiled")
    _once(reader, module, "mask", tok, mask)


def _recent_reap(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    raise reader.error(tok, "--reap (the kernel drops a list's oldest address when it is "
                       "older than --seconds) is not compiled", "--set, --rcheck, --update, "
                       "--remove, --seconds, --hitcount, --rttl, --name, --mask, --rsource, "
                       "--rdest")


def _recent(reader: RuleReader, module: _Module) -> ir.RecentMatch:
    """As libxt_recent and the kernel's checkentry take the options."""
    if "mode" not in module.values:
        raise reader.error(module.token, "'-m recent' needs one of --set, --rcheck, "
                           "--update or --remove")
    values = dict(module.values)
    mode, tok = values.pop("mode")
    if mode in ("set", "remove") and (values.get("seconds") or values.get("hitcount")
                                      or values.get("rttl")):
        raise reader.error(tok, f"--{mode} takes no --seconds, --hitcount or --rttl (the "
                           "kernel refuses the rule)")
    ones = ipaddress.IPv6Address(2 ** 128 - 1) if reader.family is ir.Family.IPV6 \
        else ipaddress.IPv4Address(2 ** 32 - 1)
    values.setdefault("mask", ones)
    return ir.RecentMatch(mode, **values)


def _mac_source(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    parts = arg.value.split(":")
    try:
        address = bytes(int(p, 16) for p in parts)
    except ValueError:
        address = b""
    if len(parts) != 6 or len(address) != 6 or any(len(p) > 2 for p in parts):
        raise reader.error(arg, "not a MAC address", "xx:xx:xx:xx:xx:xx")
    _once(reader, module, "mac", tok, ir.MacSourceMatch(address, negate))


def _ct_state(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    given = arg.value.upper().split(",")
    known = ir.ConntrackMatch.STATES if module.name == "conntrack" \
        else ir.ConntrackMatch.TRACKING_STATES
    unknown = [s for s in given if s not in known]
    if unknown:
        raise reader.error(arg, f"unknown state '{unknown[0]}'", ",".join(known))
    states = tuple(s for s in ir.ConntrackMatch.STATES if s in given)
    _once(reader, module, "states", tok, (states, negate))


def _ct_direction(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    arg = reader.argument(tok)
    if arg.value.upper() not in ("ORIGINAL", "REPLY"):
        raise reader.error(arg, "not a direction", "ORIGINAL, REPLY")
    _once(reader, module, "direction", tok, arg.value.upper())


def _ct_address(key: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        net = _parse_network(reader, reader.argument(tok))
        _once(reader, module, key, tok, ir.ConntrackAddress(net, negate))
    return handler


def _ct_protocol(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    arg = reader.argument(tok)
    # Unlike -p, not lower-cased first: iptables takes a name as /etc/protocols spells it
    # (`TCP`, its alias, but not `Tcp`).
    text = arg.value
    number = names.PROTOCOL_ALIASES.get(text, names.PROTOCOLS.get(text))
    if number is None and _c_number(text, False) is None:
        try:
            number = socket.getprotobyname(text)
        except OSError:
            raise reader.error(arg, f"unknown protocol '{text}'",
                               "names as /etc/protocols spells them, or 1-255") from None
    if number is None:
        number = _parse_int(reader, arg, text, 0, 255, "protocol number")
    _once(reader, module, "protocol", tok, ir.ProtocolMatch(number, negate))


def _addr_types(key: str):
    """A comma list of route types, each a case-insensitive prefix of a name (the first
    in RTN_* order wins: `U` is UNSPEC), as libxt_addrtype reads it."""
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        found = set()
        for word in arg.value.split(","):
            kind = next((t for t in ir.AddrTypeMatch.TYPES
                         if word and t.startswith(word.upper())), None)
            if kind is None:
                raise reader.error(arg, f"addrtype: bad type '{word}'",
                                   ", ".join(ir.AddrTypeMatch.TYPES))
            found.add(kind)
        types = tuple(t for t in ir.AddrTypeMatch.TYPES if t in found)
        _once(reader, module, key, tok, (types, negate))
    return handler


def _addr_type_limit(direction: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        reader._no_negate(tok, negate)
        if "limit" in module.values:
            raise reader.error(tok, "--limit-iface-in and --limit-iface-out exclude each "
                               "other" if module.values["limit"] != direction else
                               f"given twice in one '-m {module.name}'")
        module.values["limit"] = direction
    return handler


def _statistic_mode(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    arg = reader.argument(tok)
    if arg.value not in ("random", "nth"):
        raise reader.error(arg, f'bad mode "{arg.value}"', "random, nth")
    _once(reader, module, "mode", tok, arg.value)


def _statistic_number(key: str):
    """--probability (a decimal 0-1, kept as libxt_statistic keeps it: lround(2**31 * p)),
    --every (1 or more) and --packet; `!` goes before --probability or --every."""
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        if key == "packet":
            reader._no_negate(tok, negate)
        arg = reader.argument(tok)
        if key == "probability":  # strtod's forms, hexadecimal too
            try:
                chance = float.fromhex(arg.value) if "0x" in arg.value.lower() \
                    else float(arg.value)
            except ValueError:
                chance = 2.0
            if chance > 1 or chance < 0:  # (NaN passes libxt_statistic's test)
                raise reader.error(arg, f"'{arg.value}' is not a probability",
                                   "a decimal between 0 and 1")
            # lround(); of NaN, x86's lround() gives what the kernel keeps as 0
            value = 0 if math.isnan(chance) else math.floor(ir.StatisticMatch.ONE * chance
                                                            + 0.5)
        else:
            value = _parse_int(reader, arg, arg.value, 1 if key == "every" else 0,
                               0xFFFFFFFF, key, decimal=True)
        _once(reader, module, key, tok, value)
        if negate:
            module.values["negate"] = True
    return handler


def _statistic(reader: RuleReader, module: _Module) -> ir.StatisticMatch:
    mode, values = _require(reader, module, "mode", "--mode random or --mode nth"), \
        module.values
    random_options = {"probability"} & set(values)
    nth_options = {"every", "packet"} & set(values)
    if mode == "random":
        if nth_options or not random_options:
            raise reader.error(module.token, "--mode random takes --probability (only)")
        return ir.StatisticMatch(mode, values["probability"],
                                 negate=values.get("negate", False))
    if random_options or nth_options != {"every", "packet"}:
        raise reader.error(module.token, "--mode nth takes --every and --packet (both)")
    if values["packet"] >= values["every"]:
        raise reader.error(module.token, "the --packet p must be 0 <= p <= n-1")
    return ir.StatisticMatch(mode, every=values["every"], packet=values["packet"],
                             negate=values.get("negate", False))


def _addrtype(reader: RuleReader, module: _Module) -> ir.AddrTypeMatch:
    if "src" not in module.values and "dst" not in module.values:
        raise reader.error(module.token, "'-m addrtype' needs --src-type or --dst-type")
    if reader.family is ir.Family.IPV6:
        raise reader.error(module.token, "ip6tables' -m addrtype is not compiled yet (the "
                           "kernel's IPv6 match looks routes up in every table)",
                           "iptables' (IPv4) -m addrtype")
    src, src_negate = module.values.get("src", ((), False))
    dst, dst_negate = module.values.get("dst", ((), False))
    return ir.AddrTypeMatch(src, dst, src_negate, dst_negate, module.values.get("limit"))


def _ct_port(key: str):
    def handler(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
        arg = reader.argument(tok)
        ports = _parse_port_range(reader, arg, arg.value, "tcp", decimal=True)
        _once(reader, module, key, tok, ir.PortSpec(ports, negate))
    return handler


def _conntrack(reader: RuleReader, module: _Module) -> ir.ConntrackMatch:
    values = module.values
    if not values:
        raise reader.error(module.token, f"'-m {module.name}' needs an option",
                           "--ctstate, --ctproto, --ctdir, --ctorigsrc, --ctorigdst, "
                           "--ctreplsrc, --ctrepldst and their ports"
                           if module.name == "conntrack" else "--state")
    states, negate = values.get("states", ((), False))
    return ir.ConntrackMatch(states, negate, module.name, values.get("direction"),
                             *(values.get(a) for a in ir.ConntrackMatch.ADDRESSES),
                             values.get("protocol"),
                             *(values.get(p) for p in ir.ConntrackMatch.PORTS))


def _limit(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    arg = reader.argument(tok)
    count_text, _, unit_text = arg.value.partition("/")
    count = _parse_int(reader, arg, count_text, 1, 10000, "rate", decimal=True)
    unit = names.LIMIT_UNITS.get(unit_text or "sec")
    if unit is None:
        raise reader.error(arg, f"unknown rate unit '{unit_text}'", "/sec /min /hour /day")
    if ir.LimitMatch.UNIT_SECONDS[unit] * 10000 // count == 0:
        raise reader.error(arg, "rate too fast for the kernel's limit match")
    _once(reader, module, "rate", tok, (count, unit))


def _limit_burst(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    reader._no_negate(tok, negate)
    arg = reader.argument(tok)
    _once(reader, module, "burst", tok, _parse_int(reader, arg, arg.value, 1, 10000, "burst"))


def _mark_value(reader: RuleReader, tok: Token, masked: bool = True) -> tuple[int, int]:
    """`value[/mask]` as iptables reads it (mask all ones when not given)."""
    arg = reader.argument(tok)
    value_text, slash, mask_text = arg.value.partition("/")
    if slash and not masked:
        raise reader.error(arg, f"{tok.value} takes no mask")
    value = _parse_int(reader, arg, value_text, 0, 0xFFFFFFFF, "mark")
    mask = _parse_int(reader, arg, mask_text, 0, 0xFFFFFFFF, "mask") if slash else 0xFFFFFFFF
    return value, mask


def _mark(reader: RuleReader, module: _Module, tok: Token, negate: bool) -> None:
    value, mask = _mark_value(reader, tok)
    _once(reader, module, "mark", tok, ir.MarkMatch(value, mask, negate,
                                                    module.name == "connmark"))


_MODULE_OPTIONS: dict[str, dict[str, Callable]] = {
    "tcp": {
        "--sport": _port_option("sport"), "--source-port": _port_option("sport"),
        "--dport": _port_option("dport"), "--destination-port": _port_option("dport"),
        "--tcp-flags": _tcp_flags, "--syn": _tcp_syn, "--tcp-option": _tcp_option,
    },
    "udp": {
        "--sport": _port_option("sport"), "--source-port": _port_option("sport"),
        "--dport": _port_option("dport"), "--destination-port": _port_option("dport"),
    },
    "icmp": {"--icmp-type": _icmp_type(4)},
    "icmp6": {"--icmpv6-type": _icmp_type(6)},
    "multiport": {
        "--sports": _multiport("src"), "--source-ports": _multiport("src"),
        "--dports": _multiport("dst"), "--destination-ports": _multiport("dst"),
        "--ports": _multiport("any"),
    },
    "iprange": {"--src-range": _iprange("src"), "--dst-range": _iprange("dst")},
    "comment": {"--comment": _comment},
    "length": {"--length": _length},
    "ttl": {"--ttl-eq": _ttl("eq"), "--ttl-lt": _ttl("lt"), "--ttl-gt": _ttl("gt")},
    "hl": {"--hl-eq": _ttl("eq"), "--hl-lt": _ttl("lt"), "--hl-gt": _ttl("gt")},
    "mac": {"--mac-source": _mac_source},
    "limit": {"--limit": _limit, "--limit-burst": _limit_burst},
    "conntrack": {"--ctstate": _ct_state, "--ctdir": _ct_direction,
                  "--ctproto": _ct_protocol,
                  **{f"--ct{a}": _ct_address(a) for a in ir.ConntrackMatch.ADDRESSES},
                  **{f"--ct{p}": _ct_port(p) for p in ir.ConntrackMatch.PORTS}},
    "state": {"--state": _ct_state},
    "statistic": {"--mode": _statistic_mode, "--probability": _statistic_number("probability"),
                  "--every": _statistic_number("every"),
                  "--packet": _statistic_number("packet")},
    "addrtype": {"--src-type": _addr_types("src"), "--dst-type": _addr_types("dst"),
                 "--limit-iface-in": _addr_type_limit("in"),
                 "--limit-iface-out": _addr_type_limit("out")},
    "mark": {"--mark": _mark},
    "connmark": {"--mark": _mark},
    "tos": {"--tos": _tos},
    "dscp": {"--dscp": _dscp, "--dscp-class": _dscp_class},
    "ecn": {"--ecn-tcp-ece": _ecn_flag("ece"), "--ecn-tcp-cwr": _ecn_flag("cwr"),
            "--ecn-ip-ect": _ecn_ect},
    "esp": {"--espspi": _esp_spi},
    "recent": {"--set": _recent_mode("set"), "--rcheck": _recent_mode("rcheck"),
               "--update": _recent_mode("update"), "--remove": _recent_mode("remove"),
               "--seconds": _recent_number("seconds", _U32),
               "--hitcount": _recent_number("hitcount", 255),
               "--rttl": _recent_flag("rttl", True), "--name": _recent_name,
               "--rsource": _recent_flag("side", "src"), "--rdest": _recent_flag("side", "dst"),
               "--mask": _recent_mask, "--reap": _recent_reap},
    "rt": {"--rt-type": _rt_number("type"), "--rt-segsleft": _rt_segsleft,
           "--rt-len": _rt_number("length"), "--rt-0-res": _rt_reserved,
           "--rt-0-addrs": _rt_addresses, "--rt-0-not-strict": _rt_addresses},
}


def _require(reader: RuleReader, module: _Module, key: str, option: str):
    if key not in module.values:
        raise reader.error(module.token, f"'-m {module.name}' needs {option}")
    return module.values[key]


_BUILDERS: dict[str, Callable[[RuleReader, _Module], ir.Match]] = {
    "tcp": lambda r, m: ir.TcpMatch(m.values.get("sport"), m.values.get("dport"),
                                    m.values.get("flags")),
    "udp": lambda r, m: ir.UdpMatch(m.values.get("sport"), m.values.get("dport")),
    "icmp": lambda r, m: m.values.get("type") or ir.IcmpMatch(ir.IcmpMatch.ANY),
    "icmp6": lambda r, m: _require(r, m, "type", "--icmpv6-type"),
    "multiport": lambda r, m: _require(r, m, "ports", "--sports, --dports or --ports"),
    "iprange": lambda r, m: ir.IpRangeMatch(m.values.get("src"), m.values.get("dst"))
    if m.values else _require(r, m, "src", "--src-range or --dst-range"),
    "comment": lambda r, m: ir.CommentMatch(_require(r, m, "text", "--comment")),
    "length": lambda r, m: _require(r, m, "length", "--length"),
    "ttl": lambda r, m: _require(r, m, "ttl", "--ttl-eq, --ttl-lt or --ttl-gt"),
    "hl": lambda r, m: _require(r, m, "ttl", "--hl-eq, --hl-lt or --hl-gt"),
    "mac": lambda r, m: _require(r, m, "mac", "--mac-source"),
    "limit": lambda r, m: ir.LimitMatch(*m.values.get("rate", (3, "hour")),
                                        burst=m.values.get("burst", 5)),
    "conntrack": _conntrack,
    "state": _conntrack,
    "addrtype": _addrtype,
    "statistic": _statistic,
    "mark": lambda r, m: _require(r, m, "mark", "--mark"),
    "connmark": lambda r, m: _require(r, m, "mark", "--mark"),
    "recent": lambda r, m: _recent(r, m),
    "tos": lambda r, m: _require(r, m, "tos", "--tos"),
    "dscp": lambda r, m: _require(r, m, "dscp", "--dscp or --dscp-class"),
    "ecn": lambda r, m: _ecn(r, m),
    "esp": lambda r, m: m.values.get("spi", ir.EspMatch()),
    "rt": lambda r, m: ir.RoutingHeaderMatch(**{k: v for pair in m.values.values()
                                                for k, v in pair.items()}),
}

# --------------------------------------------------------------------------- target options


def _reject_with(reader: RuleReader, tok: Token) -> None:
    arg = reader.argument(tok)
    aliases = names.REJECT_ALIASES6 if reader.family is ir.Family.IPV6 else {}
    value = aliases.get(arg.value) or names.REJECT_ALIASES.get(arg.value, arg.value)
    usable = [w.value for w in ir.RejectWith.of_family(reader.family)]
    if value not in usable:
        raise reader.error(arg, "unknown reject type for this family", ", ".join(usable))
    reader.target_options["with"] = ir.RejectWith(value)


def _log_level(reader: RuleReader, tok: Token) -> None:
    arg = reader.argument(tok)
    level = names.LOG_LEVELS.get(arg.value)
    if level is None and _c_number(arg.value, False) is None:
        raise reader.error(arg, f"unknown log level '{arg.value}'",
                           ", ".join(names.LOG_LEVELS) + ", or 0-7")
    if level is None:
        level = _parse_int(reader, arg, arg.value, 0, 7, "log level")
    reader.target_options["level"] = level


def _log_prefix(reader: RuleReader, tok: Token) -> None:
    arg = reader.argument(tok)
    if len(arg.value) > 29:
        raise reader.error(arg, "log prefixes are at most 29 characters")
    reader.target_options["prefix"] = arg.value


def _nflog_number(key: str, top: int):
    def handler(reader: RuleReader, tok: Token) -> None:
        arg = reader.argument(tok)
        reader.target_options[key] = _parse_int(reader, arg, arg.value, 0, top,
                                                f"NFLOG {key}")
    return handler


def _nflog_prefix(reader: RuleReader, tok: Token) -> None:
    """libxt_NFLOG keeps the first 63 characters (its 64 bytes end in a NUL)."""
    reader.target_options["prefix"] = reader.argument(tok).value[:63]


def _flag(key: str):
    def handler(reader: RuleReader, tok: Token) -> None:
        reader.target_options[key] = True
    return handler


def _xmark(form: str):
    """The forms of MARK and CONNMARK that set bits, as the (value, mask) of --set-xmark
    (libxt_MARK's arithmetic)."""
    def handler(reader: RuleReader, tok: Token) -> None:
        if "mark" in reader.target_options:
            raise reader.error(tok, "only one of " + _MARK_FORMS + " per rule")
        value, mask = _mark_value(reader, tok, masked=form in ("set-xmark", "set-mark"))
        reader.target_options["mark"] = {
            "set-xmark": (value, mask), "set-mark": (value, value | mask),
            "and-mark": (0, ~value & 0xFFFFFFFF), "or-mark": (value, value),
            "xor-mark": (value, 0)}[form]
    return handler


_MARK_FORMS = "--set-xmark, --set-mark, --and-mark, --or-mark, --xor-mark"


def _require_target(reader: RuleReader, key: str, options: str):
    if key not in reader.target_options:
        raise reader.error(reader.target_token,
                           f"{reader.target_token.value} needs one of {options}")
    return reader.target_options[key]


def _connmark_copy(mode: ir.ConnmarkMode):
    def handler(reader: RuleReader, tok: Token) -> None:
        if "mark" in reader.target_options or "mode" in reader.target_options:
            raise reader.error(tok, "only one of " + _CONNMARK_FORMS + " per rule")
        reader.target_options["mode"] = mode
    return handler


def _connmark_mask(*keys: str):
    def handler(reader: RuleReader, tok: Token) -> None:
        arg = reader.argument(tok)
        mask = _parse_int(reader, arg, arg.value, 0, 0xFFFFFFFF, "mask")
        reader.target_options.update(dict.fromkeys(keys, mask))
    return handler


_CONNMARK_FORMS = _MARK_FORMS + ", --save-mark, --restore-mark"


def _connmark_target(reader: RuleReader) -> ir.ConnmarkTarget:
    options = reader.target_options
    masks = {k: options[k] for k in ("ctmask", "nfmask") if k in options}
    if "mark" in options:
        if masks:
            raise reader.error(reader.target_token, "--mask, --ctmask and --nfmask go "
                               "with --save-mark or --restore-mark")
        value, ctmask = options["mark"]
        return ir.ConnmarkTarget(ir.ConnmarkMode.SET, value, ctmask)
    return ir.ConnmarkTarget(_require_target(reader, "mode", _CONNMARK_FORMS), **masks)


def _unsupported_option(why: str, supported: str):
    def handler(reader: RuleReader, tok: Token) -> None:
        raise reader.error(tok, why, supported)
    return handler


def _nat_to(option: str, form: str, address: bool = True, shifts: bool = False):
    """libxt_NAT's `A[-B]`, `A[-B]:p[-q]`, `:p[-q]` (a range whose ends are equal is one
    value; `shifts`: DNAT's `p-q/base` too), MASQUERADE's and REDIRECT's --to-ports
    without the address. `form`: what the target compiles, for the messages."""
    def handler(reader: RuleReader, tok: Token) -> None:
        if "to" in reader.target_options:
            raise reader.error(tok, f"{option} can be given only once")
        if reader.family is ir.Family.IPV6:  # (before its `[A]:p` would be misread)
            raise reader.error(reader.target_token, "IPv6 NAT is not compiled yet",
                               f"{reader.target_token.value} in iptables (IPv4) rulesets")
        arg = reader.argument(tok)
        text, _, ports = arg.value.partition(":") if address else ("", "", arg.value)
        where = (None, None)
        if text:  # a range as libxt_NAT takes it: its ends in either order
            low, _, high = text.partition("-")
            where = _parse_address(reader, arg, low)
            last = _parse_address(reader, arg, high) if high else where
            where = (where, None if last == where else last)
        span = None
        if ports:
            span = _nat_ports(reader, arg, ports, form, shifts)
            if 0 in span[:2]:
                raise reader.error(arg, "port 0 is not compiled", "a port 1-65535")
            if span[0] > span[1]:
                raise reader.error(arg, "invalid port range (min > max)")
        reader.target_options["to"] = (where, span, arg)
    return handler


def _nat_ports(reader: RuleReader, arg: Token, text: str, form: str,
               shifts: bool) -> tuple[int, ...]:
    """(first, last) or, shifted, (first, last, base), as libxt_NAT reads them: a first
    port that is not a number is a service name, the whole text (names have dashes); a
    range's last port is a number; its base a port or a name."""
    low, dash, rest = text.partition("-")
    if _c_number(low) is None:
        return (_parse_port(reader, arg, text, "tcp"),) * 2
    high, slash, base = rest.partition("/")
    if dash and _c_number(high) is None:
        raise reader.error(arg, f"'{high}': the last port of a range is a number, as "
                           "libxt_NAT reads it", form)
    first = _parse_port(reader, arg, low, "tcp")
    span = (first, _parse_port(reader, arg, high, "tcp") if dash else first)
    if not slash:
        return span
    if not shifts:
        raise reader.error(arg, "only DNAT shifts ports (FIRST-LAST/BASE)", form)
    shift = _parse_port(reader, arg, base, "tcp")
    if not shift:
        raise reader.error(arg, "a shift's base port is 1-65535, as libxt_NAT takes it")
    return span + (shift,)


def _nat_target(reader: RuleReader, option: str):
    """What every NAT target checks: IPv4, and a port only where the protocol has
    ports. The address range (first, last: None for one), port range and flags its
    option gave."""
    if reader.family is ir.Family.IPV6:
        raise reader.error(reader.target_token, "IPv6 NAT is not compiled yet",
                           f"{reader.target_token.value} in iptables (IPv4) rulesets")
    where, span, arg = reader.target_options.get("to") or ((None, None), None, None)
    if arg is None and option:
        _require_target(reader, "to", option)
    proto = reader.base.get("proto")
    if span is not None and not (isinstance(proto, ir.ProtocolMatch) and not proto.negate
                                 and proto.protocol in (6, 17)):
        raise reader.error(arg, "a port needs '-p tcp' or '-p udp' in the rule (the kernel "
                           "refuses it without a protocol that has ports)",
                           "-p tcp or -p udp (SCTP and DCCP are not compiled yet)")
    flags = {k: reader.target_options.get(k, False)
             for k in ("random", "random_fully", "persistent")}
    if span is not None and len(span) == 3:
        flags["port_base"] = span[2]
    return where, span and span[:2], flags


def _dnat_target(reader: RuleReader) -> ir.DnatTarget:
    redirect = reader.target_token.value == "REDIRECT"
    where, span, flags = _nat_target(reader, "" if redirect else "--to-destination")
    del flags["random_fully"]  # not an option of DNAT's
    return ir.DnatTarget(where[0], span, redirect=redirect, last_address=where[1], **flags)


def _snat_target(reader: RuleReader) -> ir.SnatTarget:
    masquerade = reader.target_token.value == "MASQUERADE"
    where, span, flags = _nat_target(reader, "" if masquerade else "--to-source")
    return ir.SnatTarget(where[0], span, masquerade=masquerade, last_address=where[1],
                         **flags)


_MARK_OPTIONS = {f"--{form}": _xmark(form)
                 for form in ("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark")}

_TARGET_OPTIONS: dict[str, dict[str, Callable]] = {
    "REJECT": {"--reject-with": _reject_with},
    "NFLOG": {
        "--nflog-group": _nflog_number("group", 0xFFFF),
        "--nflog-prefix": _nflog_prefix,
        "--nflog-size": _nflog_number("size", 0xFFFFFFFF),
        "--nflog-range": _nflog_number("range", 0xFFFFFFFF),
        "--nflog-threshold": _nflog_number("threshold", 0xFFFF),
    },
    "LOG": {
        "--log-level": _log_level, "--log-prefix": _log_prefix,
        "--log-tcp-sequence": _flag("tcp_sequence"),
        "--log-tcp-options": _flag("tcp_options"),
        "--log-ip-options": _flag("ip_options"), "--log-uid": _flag("uid"),
    },
    "MARK": _MARK_OPTIONS,
    "CONNMARK": {
        **_MARK_OPTIONS,
        "--save-mark": _connmark_copy(ir.ConnmarkMode.SAVE),
        "--restore-mark": _connmark_copy(ir.ConnmarkMode.RESTORE),
        "--mask": _connmark_mask("ctmask", "nfmask"),
        "--ctmask": _connmark_mask("ctmask"), "--nfmask": _connmark_mask("nfmask"),
        **dict.fromkeys(("--left-shift-mark", "--right-shift-mark"), _unsupported_option(
            "shifting marks is not supported yet", _CONNMARK_FORMS + " with masks")),
    },
    "NOTRACK": {},
    "CHECKSUM": {"--checksum-fill": _flag("fill")},
    # DNAT's and REDIRECT's --random draws the port (the kernel's random start); with one
    # address --persistent changes nothing.
    "DNAT": {"--to-destination": _nat_to("--to-destination", "DNAT --to-destination "
                                         "a.b.c.d[-e.f.g.h][:port[-port[/base]]]",
                                         shifts=True),
             "--random": _flag("random"), "--persistent": _flag("persistent")},
    "SNAT": {"--to-source": _nat_to("--to-source", "SNAT --to-source "
                                       "a.b.c.d[-e.f.g.h][:port[-port]]"),
             "--random": _flag("random"), "--random-fully": _flag("random_fully"),
             "--persistent": _flag("persistent")},
    "MASQUERADE": {"--to-ports": _nat_to("--to-ports", "MASQUERADE --to-ports port[-port]",
                                         address=False),
                   "--random": _flag("random"), "--random-fully": _flag("random_fully")},
    "REDIRECT": {"--to-ports": _nat_to("--to-ports", "REDIRECT --to-ports port[-port]",
                                       address=False),
                 "--random": _flag("random")},
    "CT": {
        "--notrack": _flag("notrack"),
        **dict.fromkeys(("--zone", "--zone-orig", "--zone-reply", "--helper", "--ctevents",
                         "--expevents", "--timeout", "--notrack-tmpl"), _unsupported_option(
            "only CT --notrack is supported yet", "CT --notrack, NOTRACK")),
    },
}
