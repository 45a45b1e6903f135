"""`nft -j list ruleset` (libnftables JSON) -> IR.

Each JSON object is written as the nft command it stands for (`add rule ip t c ...`) and
read by the text front-end, so that both formats mean the same by construction. An error
points at the JSON object it came from (line and column in the JSON text) and quotes the
command it was read as.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.frontend.nft.parser import grammar, parse_nft

_KEYWORD_VALUES = ("accept", "drop", "return", "continue")


@functools.cache
def _plain() -> re.Pattern:
    """What the text grammar reads as one word (grammar/nft.lark's WORD): written bare."""
    return re.compile(grammar().get_terminal("WORD").pattern.to_regexp())


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value if _plain().fullmatch(value) else json.dumps(value)
    if isinstance(value, list):  # flags: ["established", "related"]
        return ",".join(_value(v) for v in value)
    return _expr(value)


def _expr(node: Any) -> str:
    if not isinstance(node, dict):
        return _value(node)
    (key, body), = node.items() if len(node) == 1 else (("?", node),)
    if key == "payload":
        return f"{body.get('protocol')} {body.get('field')}"
    if key == "meta":
        return f"meta {body['key']}"
    if key == "ct":
        way = f"{body['dir']} " if body.get("dir") else ""
        return f"ct {way}{body['key']}"
    if key == "fib":  # flags: the address, then the device it is limited to
        return f"fib {' . '.join(body.get('flags', []))} {body['result']}"
    if key == "numgen":
        offset = f" offset {body['offset']}" if body.get("offset") else ""
        return f"numgen {body['mode']} mod {body['mod']}{offset}"
    if key == "prefix":
        return f"{body['addr']}/{body['len']}"
    if key == "range":
        return f"{_value(body[0])}-{_value(body[1])}"
    if key == "set":
        if isinstance(body, str):
            return body
        return "{ " + ", ".join(_element(e) for e in body) + " }"
    if key == "elem":
        return _value(body["val"])
    if key == "concat":
        return " . ".join(_value(part) for part in body)
    if key in ("&", "|", "^"):
        return f"{_value(body[0])} {key} {_value(body[1])}"
    if key in _KEYWORD_VALUES or key in ("jump", "goto"):
        return _statement(node)
    return key  # an expression the text front-end does not know: it says so


def _element(element: Any) -> str:
    if isinstance(element, list):  # a map's [key, data]
        return f"{_value(element[0])} : {_value(element[1])}"
    return _value(element)


def _statement(node: dict) -> str:
    (key, body), = node.items()
    if key == "match":
        op = {"==": "==", "in": ""}.get(body["op"], body["op"])
        return " ".join(p for p in (_expr(body["left"]), op, _value(body["right"])) if p)
    if key == "counter":
        if isinstance(body, dict) and "packets" in body:
            return f"counter packets {body['packets']} bytes {body['bytes']}"
        return "counter"
    if key in _KEYWORD_VALUES or key == "notrack":
        return key
    if key in ("jump", "goto"):
        return f"{key} {body['target']}"
    if key == "reject":
        if not body:
            return "reject"
        if body.get("type") == "tcp reset":
            return "reject with tcp reset"
        return f"reject with {body.get('type', 'icmp')} type {body.get('expr')}"
    if key == "log":
        words = ["log"]
        for option in ("prefix", "level", "group"):
            if option in (body or {}):
                words.append(f"{option} {_value(body[option])}")
        return " ".join(words)
    if key == "limit":
        over = "over " if body.get("inv") else ""
        unit = body.get("rate_unit", "packets")
        rate = f"{body['rate']}/{body.get('per', 'second')}" if unit == "packets" \
            else f"{body['rate']} {unit}/{body.get('per', 'second')}"
        burst = f" burst {body['burst']} {body.get('burst_unit', 'packets')}" \
            if body.get("burst") else ""
        return f"limit rate {over}{rate}{burst}"
    if key == "mangle":
        return f"{_expr(body['key'])} set {_value(body['value'])}"
    if key == "vmap":
        return f"{_expr(body['key'])} vmap {_value(body['data'])}"
    if key in ("dnat", "snat", "masquerade", "redirect"):
        body = body or {}
        port = body.get("port")
        if isinstance(port, dict) and "range" in port:
            port = "-".join(str(_value(p)) for p in port["range"])
        to = (f"{_value(body['addr'])}" if "addr" in body else "") + (
            f":{_value(port)}" if port is not None else "")
        flags = body.get("flags", [])
        flags = ",".join(flags) if isinstance(flags, list) else flags
        words = key + (f" to {to}" if to else "")
        return words + (f" {flags}" if flags else "")
    return key


def _command(kind: str, body: dict) -> str:
    family = body.get("family", "ip")
    if kind == "table":
        return f"add table {family} {body['name']}"
    if kind == "chain":
        head = f"add chain {family} {body['table']} {body['name']}"
        if "hook" not in body:
            return head
        device = f" device {_value(body['dev'])}" if "dev" in body else ""
        return (f"{head} {{ type {body.get('type', 'filter')} hook {body['hook']}{device} "
                f"priority {body.get('prio', 0)}; policy {body.get('policy', 'accept')}; }}")
    if kind == "rule":
        text = f"add rule {family} {body['table']} {body['chain']} " + " ".join(
            _statement(s) for s in body.get("expr", []))
        if "comment" in body:
            text += f" comment {json.dumps(body['comment'])}"
        return text
    if kind in ("set", "map"):
        types = body["type"] if isinstance(body["type"], list) else [body["type"]]
        key = " . ".join(types) + (f" : {body['map']}" if kind == "map" else "")
        parts = [f"type {key}"]
        if body.get("flags"):
            parts.append("flags " + ",".join(body["flags"]))
        if body.get("elem"):
            parts.append("elements = { " + ", ".join(_element(e) for e in body["elem"]) + " }")
        return f"add {kind} {family} {body['table']} {body['name']} {{ " + \
            "; ".join(parts) + "; }"
    return f"{kind} {json.dumps(body)}"


def _positions(text: str) -> list[int]:
    """Where each object of the `nftables` list starts in the text."""
    start = text.index("[", text.index('"nftables"')) + 1
    decoder, positions, at = json.JSONDecoder(), [], start
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return positions
        positions.append(at)
        _, at = decoder.raw_decode(text, at)


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def parse_nft_json(text: str, source: str = "<stdin>", skip=None) -> ir.Ruleset:
    """`skip`: called with each rule's error instead of raising it (the rule is left out)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(source, exc.lineno, text[exc.pos:exc.pos + 12] or "<end of file>",
                         f"not valid JSON: {exc.msg}", column=exc.colno) from None
    except (ValueError, RecursionError) as exc:  # digits past Python's limit, nesting
        raise InputError(source, 1, text[:12], f"not a JSON ruleset bpfilter reads: {exc}",
                         '`nft -j list ruleset` output', 1) from None
    objects = document.get("nftables") if isinstance(document, dict) else None
    if not isinstance(objects, list):
        raise InputError(source, 1, text[:12], "not an nft JSON ruleset",
                         '{"nftables": [...]}, as `nft -j list ruleset` prints', 1)
    commands, origins = [], []
    for obj, offset in zip(objects, _positions(text)):
        if not isinstance(obj, dict) or len(obj) != 1:
            raise InputError(source, *_line_column(text, offset)[:1], "{",
                             "one command per object expected",
                             column=_line_column(text, offset)[1])
        (kind, body), = obj.items()
        if kind == "metainfo":
            continue
        try:
            commands.append(_command(kind, body))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            line, column = _line_column(text, offset)
            raise InputError(source, line, kind, f"malformed {kind} object ({exc})",
                             column=column) from None
        origins.append(offset)
    script = "\n".join(commands) + "\n"

    def relocated(origin: ir.Origin | None) -> ir.Origin | None:
        """A command's line of the script -> its object's place in the JSON text."""
        if origin is None or not 0 < origin.line <= len(origins):
            return origin
        return ir.Origin(source, *_line_column(text, origins[origin.line - 1]))

    def in_json(exc: InputError) -> InputError:
        offset = origins[exc.line - 1] if 0 < exc.line <= len(origins) else 0
        line, column = _line_column(text, offset)
        command = commands[exc.line - 1] if 0 < exc.line <= len(commands) else ""
        return InputError(source, line, exc.token, f"{exc.why} (in the object read as "
                          f"`{command}`)", exc.supported, column)

    try:
        ruleset = parse_nft(script, source, skip and (lambda exc: skip(in_json(exc))))
        return dataclasses.replace(ruleset, tables=tuple(
            dataclasses.replace(table, origin=relocated(table.origin), chains=tuple(
                dataclasses.replace(chain, origin=relocated(chain.origin), rules=tuple(
                    dataclasses.replace(rule, origin=relocated(rule.origin))
                    for rule in chain.rules))
                for chain in table.chains))
            for table in ruleset.tables))
    except InputError as exc:
        raise in_json(exc) from None
