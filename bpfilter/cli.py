"""The `bpfilter` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bpfilter import __version__
from bpfilter.errors import BuildError, InputError, KernelError

# Piped (a script, grep, a log), nothing is cut with "…" or wrapped at 80 columns, and
# tables are plain columns as iptables prints them.
PIPED = not sys.stdout.isatty()
# No emoji: a MAC address may hold ':cd:', a CD to rich (the demo's LOG lines, list).
console = Console(emoji=False, **({"width": 1 << 16, "no_color": True} if PIPED else {}))
# Errors are not wrapped at 80 columns: a wrapped source line would no longer stand over its
# caret, and a log or grep should find each message on one line.
err_console = Console(stderr=True, soft_wrap=True, emoji=False)

EXIT_INPUT = 2  # bad or unsupported input, as iptables-restore uses
EXIT_FAILURE = 1


def decode(data: bytes) -> str:
    """Ruleset bytes as text: UTF-8, and any other byte kept as it is (a Latin-1 comment
    that iptables-restore takes byte for byte), line ends untouched (a CR is text)."""
    return data.decode("utf-8", "surrogateescape")


def _read_rules(path: str) -> tuple[str, str]:
    if path == "-":
        return decode(sys.stdin.buffer.read()), "<stdin>"
    try:
        return decode(Path(path).read_bytes()), path
    except OSError as exc:
        err_console.print(f"[red]bpfilter: cannot read {path}: {exc.strerror}[/]")
        sys.exit(EXIT_INPUT)


def _read_all(paths: tuple[str, ...], families: tuple[str, ...] = ()) -> tuple[str, str]:
    """One ruleset from one file, or from an iptables-save and an ip6tables-save file
    (both families at once). `families`: --family, once for every file or once per file;
    a family the text does not say of itself is assumed, and said so on stderr."""
    from bpfilter.frontend import combine, dialect, families as family_of
    from bpfilter.ir import Family

    texts = [_read_rules(path) for path in paths]
    if len(texts) > 1 and not all(dialect(*t).endswith("tables") for t in texts):
        err_console.print("[red]bpfilter: several RULES files must each be iptables-save or "
                          "ip6tables-save text (an nftables ruleset holds both families "
                          "in one file)[/]")
        sys.exit(EXIT_INPUT)
    if families and len(families) not in (1, len(texts)):
        err_console.print(f"[red]bpfilter: --family given {len(families)} times for "
                          f"{len(texts)} files: once for all, or once per file[/]")
        sys.exit(EXIT_INPUT)
    given = [Family.IPV6 if f == "ipv6" else Family.IPV4 for f in families]
    given = (given * len(texts) if len(given) == 1 else given) or [None] * len(texts)
    for (text, source), family in zip(texts, given):
        if family is None and dialect(text, source).endswith("tables"):
            try:
                for note in family_of.notes(text, source):
                    err_console.print(f"[yellow]bpfilter: note: {escape(note)}[/]")
            except InputError:
                pass  # the parser says it, with the line
    return combine(texts, given)


FAMILY = click.option("--family", "families", multiple=True,
                      type=click.Choice(["ipv4", "ipv6"]),
                      help="The family of iptables-save RULES, over what the text says of "
                           "itself (its header comment, its addresses and matches): once "
                           "for every file, or once per file in order.")


# RULES of compile, apply, translate: IPv4 and IPv6 rules may come in two files.
_RULES_HELP = ("RULES: iptables-save text (or ip6tables-save text, or one file of each "
               "for both families) or an nftables ruleset, told apart by content; '-' "
               "reads stdin.")


# An error quotes its line and token whole up to these widths: a 1 MB line is cut to a
# window around the token.
_QUOTE_WIDTH, _TOKEN_WIDTH = 160, 60


def _short(token: str) -> str:
    return token if len(token) <= _TOKEN_WIDTH else token[:_TOKEN_WIDTH - 1] + "…"


def _show_input_error(error: InputError, text: Optional[str], label: str = "error") -> None:
    shown = dataclasses.replace(error, token=_short(error.token))
    err_console.print(f"[bold red]bpfilter: {label}:[/] {escape(str(shown))}",
                      highlight=False)
    lines = text.split("\n") if text else []
    if not 0 < error.line <= len(lines):
        return
    line = lines[error.line - 1]
    column = error.column
    if column and not line[column - 1:].startswith(error.token):
        column = line.find(error.token) + 1  # the error names a token later in the rule
    start = max(0, column - 1 - _QUOTE_WIDTH // 2) if len(line) > _QUOTE_WIDTH else 0
    quoted = line[start:start + _QUOTE_WIDTH]
    quoted = ("…" if start else "") + quoted + ("…" if start + _QUOTE_WIDTH < len(line) else "")
    err_console.print(f"  {error.line} | {quoted}", highlight=False, markup=False)
    if column:
        pad = " " * (len(str(error.line)) + 5 + column - 1 - start + (1 if start else 0))
        err_console.print(pad + "^" * max(1, min(len(error.token), _QUOTE_WIDTH)),
                          style="red", highlight=False)


@contextlib.contextmanager
def _quiet():
    """No spinner: the output is JSON."""
    yield None


_CAP_NET_ADMIN, _CAP_SYS_ADMIN, _CAP_BPF = 12, 21, 39


def _need_rights(command: str) -> None:
    """Commands that load, read or attach BPF objects need CAP_BPF (or CAP_SYS_ADMIN) and
    CAP_NET_ADMIN: say so up front, not as a denied map or 'the verifier refused'."""
    with open("/proc/self/status") as status:
        caps = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    missing = [name for name, held in (
        ("CAP_BPF", caps >> _CAP_BPF & 1 or caps >> _CAP_SYS_ADMIN & 1),
        ("CAP_NET_ADMIN", caps >> _CAP_NET_ADMIN & 1)) if not held]
    if missing:
        err_console.print(f"[bold red]bpfilter: {command} needs root (CAP_BPF and "
                          f"CAP_NET_ADMIN; missing {' and '.join(missing)}): it loads, "
                          "reads or attaches BPF programs and maps[/]", highlight=False)
        sys.exit(EXIT_FAILURE)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]bpfilter: {exc}[/]", highlight=False)
    sys.exit(EXIT_FAILURE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bpfilter")
def main() -> None:
    """Compile iptables rulesets into eBPF programs and run them at XDP speed.

    \b
    Typical use:
      iptables-save > rules.v4
      bpfilter compile rules.v4          # check it and see what it becomes
      bpfilter demo                      # watch the examples run on a veth pair
      bpfilter apply rules.v4 -i eth0    # run it on eth0 (again: swap atomically)
      bpfilter list -v                   # the rules with their counters
      bpfilter detach -i eth0            # back to no filtering
    """
    for stream in (sys.stdout, sys.stderr):  # a ruleset's non-UTF-8 bytes, back as read
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


@main.command("compile", epilog=_RULES_HELP)
@click.argument("rules", metavar="RULES...", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Where the .c and .o files go [default: build/<name of RULES>].")
@click.option("--emit", type=click.Choice(["c", "obj"]), default="obj", show_default=True,
              help="Stop after C generation (c), or build and verify objects (obj).")
@click.option("--ignore-unsupported", is_flag=True,
              help="Skip rules bpfilter cannot compile yet, listing each one, instead of "
                   "failing on the first.")
@click.option("--no-verify", is_flag=True,
              help="Do not load the objects into the kernel to verify them.")
@click.option("--attach", type=click.Choice(["xdp", "tc"]), default="xdp", show_default=True,
              help="Build programs for XDP or for TC ingress (the same verdicts; TC runs "
                   "after the kernel has built its packet buffer).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (README: "
              "JSON output).")
@FAMILY
def compile_cmd(rules: tuple[str, ...], output: Optional[Path], emit: str,
                ignore_unsupported: bool, no_verify: bool, attach: str, as_json: bool,
                families: tuple[str, ...]) -> None:
    """Compile RULES into BPF programs.

    \b
      bpfilter compile rules.v4
      bpfilter compile rules.v4 rules.v6      # both families, one program
      nft list ruleset | bpfilter compile -

    Exits 2 on input it cannot compile, naming file, line, token and what works instead.
    """
    from bpfilter.codegen import Attach
    from bpfilter.compiler import compile_ruleset

    if emit != "c" and not no_verify:
        _need_rights("compile (without --no-verify or --emit c)")
    text, source = _read_all(rules, families)
    if output is None:
        stem = "stdin" if rules[0] == "-" else Path(rules[0]).name.replace(".", "_")
        output = Path("build") / stem
    skipped: list[InputError] = []
    try:
        with console.status("compiling…") if not as_json else _quiet():
            result = compile_ruleset(
                text, source, output, emit=emit, verify=not no_verify,
                on_unsupported=skipped.append if ignore_unsupported else None,
                attach=Attach(attach))
    except InputError as exc:
        _show_input_error(exc, text)
        sys.exit(EXIT_INPUT)
    except (BuildError, KernelError) as exc:
        _fail(exc)
    except OSError as exc:
        _fail(f"cannot write {exc.filename or output}: {exc.strerror}")
    for error in skipped:
        _show_input_error(error, text, label="skipped")
    summary = _summary(result, output)
    if as_json:
        _print_json(summary)
        return
    _print_summary(summary)
    if Attach(attach) is Attach.XDP:
        _warn_unseen_marks(result.ruleset)


@main.command("translate", epilog=_RULES_HELP)
@click.argument("rules", metavar="RULES...", nargs=-1, required=True)
@click.option("--to", "to", type=click.Choice(["nft", "iptables"]), required=True,
              help="The syntax to print: nft (an `nft -f` ruleset, family ip) or iptables "
                   "(iptables-save text).")
@FAMILY
def translate_cmd(rules: tuple[str, ...], to: str, families: tuple[str, ...]) -> None:
    """Print RULES in the other syntax, rule for rule.

    \b
      bpfilter translate rules.v4 --to nft > rules.nft
      nft list ruleset | bpfilter translate - --to iptables

    What the other syntax cannot say is an error naming the rule (exit 2), never a
    silent change. nft sets and verdict maps come out as one rule per element.
    """
    from bpfilter.frontend import parse_ruleset
    from bpfilter.frontend.iptables.save import save
    from bpfilter.frontend.nft.save import save_nft
    from bpfilter.passes import validate
    from bpfilter.passes.xtables import to_xtables

    text, source = _read_all(rules, families)
    try:
        ruleset = validate(parse_ruleset(text, source))
        if to == "nft":
            output = save_nft(ruleset)
        else:
            output = save(validate(to_xtables(ruleset)))
    except InputError as exc:
        _show_input_error(exc, text)
        sys.exit(EXIT_INPUT)
    sys.stdout.write(output)


def _warn_unseen_marks(ruleset) -> None:
    """At XDP there is no skb yet: the marks rules set stay within bpfilter's programs.
    Marks are mostly set for policy routing, so say it rather than let routes differ."""
    from bpfilter import ir

    setters = [rule.origin for _t, _c, rule in ruleset.rules()
               if isinstance(rule.target, ir.MarkTarget) or (
                   isinstance(rule.target, ir.ConnmarkTarget)
                   and rule.target.mode is ir.ConnmarkMode.RESTORE)]
    if setters:
        lines = ", ".join(str(o.line) for o in setters[:5]) + (" ..." if len(setters) > 5
                                                              else "")
        console.print(f"[yellow]warning: rules set packet marks (lines {lines}); at XDP "
                      "only bpfilter's own rules see them, not the kernel's routing "
                      "(ip rule fwmark), sockets or tc. At TC (apply --mode tc, compile "
                      "--attach tc) the skb carries them.[/]")


def _compiled_as(chain: tuple[str, str], as_data: set, segments: set, services: set,
                 service_data: set, code: set) -> str:
    """Straight-line code, classifier data (see passes/classify.py), the service map
    (passes/services.py), or code with some of these."""
    if chain in as_data:
        return "data"
    if chain in service_data and chain not in code:
        return "service map"
    return "code" + (" + data" if chain in segments else "") + \
        (" + service map" if chain in services or chain in service_data else "")


def _summary(result, output: Path) -> dict:
    """What compile reports, as data (rendered by _print_summary, or printed as JSON)."""
    from bpfilter.passes.validate import COMPILED_TABLES

    compiled_rules = {(t.key, c.name): len(c.rules) for t in result.ruleset.tables
                      for c in t.chains}
    reached: dict[tuple[str, str], list[str]] = {}
    for stage in result.stages:
        for key, hooks in stage.reached:
            reached.setdefault(key, []).extend(h.value for h in hooks)
    as_data = {chain for s in result.stages for chain, _n in s.classification.data_chains}
    segments = {s.chain for st in result.stages for s in st.classification.segments}
    runs = result.stages[0].services if result.stages else ()
    services = {(run.table, run.chain) for run in runs}
    service_data = {(run.table, chain) for run in runs for chain, _i in run.members}
    code = {ref.key for stage in result.stages for ref in stage.chains if ref.items}
    chains = []
    for table in result.parsed.tables:
        for chain in table.chains:
            if not chain.rules and table.name not in COMPILED_TABLES:
                continue
            key = table.key, chain.name
            chains.append({"table": table.key, "chain": chain.name,
                           "policy": chain.policy.value if chain.policy else None,
                           "rules_read": len(chain.rules),
                           "rules_compiled": compiled_rules.get(key, 0),
                           "runs_at": reached.get(key, []),
                           "builtin": chain.builtin,
                           "as": _compiled_as(key, as_data, segments, services, service_data,
                                              code) if key in reached else None})
    programs = []
    for compiled in result.programs:
        stats, program = compiled.stats, compiled.source
        programs.append({"hooks": [h.value for h in program.hooks],
                         "attach": result.code.where(program), "program": program.name,
                         "c_lines": program.source.count("\n"),
                         "verified_insns": stats.processed_insns if stats else None,
                         "insns": stats.xlated_insns if stats else None,
                         "jited_bytes": stats.jited_bytes if stats else None,
                         "cached": compiled.cached})
    return {"source": result.parsed.source, "output": str(output), "chains": chains,
            "programs": programs,
            "timings_ms": {name: round(sec * 1000, 1) for name, sec in result.timings.items()},
            "skipped": [{"file": e.file, "line": e.line, "column": e.column,
                         "token": e.token, "why": e.why} for e in result.skipped]}


# Chains the summary lists one by one; past that, user chains are counted per table and
# form (kube-proxy writes tens of thousands; `--json` lists every one).
SUMMARY_CHAINS = 40


def _print_summary(summary: dict) -> None:
    chains = _table(f"{summary['source']}: chains")
    for col in ("table", "chain", "policy", "rules read", "rules compiled", "runs at", "as"):
        chains.add_column(col, justify="right" if "rules" in col else "left")
    listed = summary["chains"]
    if len(listed) > SUMMARY_CHAINS:
        builtin = [c for c in listed if c["builtin"]]
        user = [c for c in listed if not c["builtin"]]
        # the longest ones, in their order
        longest = sorted(user, key=lambda c: -c["rules_read"])
        keep = {id(c) for c in longest[:max(0, SUMMARY_CHAINS - len(builtin))]}
        listed = builtin + [c for c in user if id(c) in keep]
    for c in listed:
        chains.add_row(c["table"], c["chain"], c["policy"] or "-", str(c["rules_read"]),
                       str(c["rules_compiled"]),
                       ", ".join(c["runs_at"]) or ("nothing to run" if c["builtin"]
                                                   else "not reached"),
                       c["as"] or "-")
    rest: dict[tuple[str, str], list[int]] = {}
    shown = {id(c) for c in listed}
    for c in summary["chains"]:
        if id(c) not in shown:
            counts = rest.setdefault((c["table"], c["as"] or "-"), [0, 0, 0])
            counts[0] += 1
            counts[1] += c["rules_read"]
            counts[2] += c["rules_compiled"]
    for (table, form), (count, read, compiled) in rest.items():
        more = f"[dim]{count:,} more chain{'s' if count > 1 else ''}[/]"
        chains.add_row(table, more, "-", f"{read:,}", f"{compiled:,}",
                       "[dim](--json lists them)[/]", form)
    console.print(chains)
    programs = _table("programs")
    for col in ("stage", "attach", "program", "C lines", "verified", "insns", "jited"):
        programs.add_column(col, justify="left" if col in ("stage", "attach", "program")
                            else "right")
    for p in summary["programs"]:
        programs.add_row(", ".join(p["hooks"]) or "-", p["attach"], p["program"],
                         str(p["c_lines"]),
                         *(f"{p[k]:,}" + (" B" if k == "jited_bytes" else "")
                           if p[k] is not None else "-"
                           for k in ("verified_insns", "insns", "jited_bytes")))
    console.print(programs)
    console.print("[dim]verified: instructions the verifier processed; insns: program "
                  "size after verification[/]")
    cached = sum(1 for p in summary["programs"] if p["cached"])
    console.print(f"output: {summary['output']}/" + (f" ({cached} object(s) from cache)"
                                                     if cached else ""))
    phases = "  ".join(f"{name} {ms:.0f} ms" for name, ms in summary["timings_ms"].items())
    console.print(f"[dim]time: {phases}[/]")
    if summary["skipped"]:
        console.print(f"[yellow]{len(summary['skipped'])} rule(s) skipped: they are NOT "
                      "enforced, so this firewall differs from the input ruleset: what they "
                      "would have matched goes on to the rules after them.[/]")


MODES = click.Choice(["native", "generic", "offload", "tc"])


@main.command(epilog=_RULES_HELP)
@click.argument("rules", metavar="RULES...", nargs=-1, required=True)
@click.option("-i", "--iface", required=True, help="The interface to filter arriving packets on.")
@click.option("--mode", type=MODES, help="XDP mode (native, generic, offload), or tc: at TC "
              "ingress instead of XDP. Default: where the interface's ruleset runs now, else "
              "native XDP, falling back to generic (announced) where the driver has no "
              "native XDP.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Where the .c and .o files go [default: build/<iface>].")
@click.option("--allow-empty", is_flag=True, help="Apply a ruleset without any table (no "
              "filtering at all). Without it such input (an empty or comment-only file) is "
              "refused, as iptables-restore leaves the running rules alone for it; "
              "`bpfilter detach` takes a ruleset off.")
@FAMILY
def apply(rules: tuple[str, ...], iface: str, mode: Optional[str],
          output: Optional[Path], allow_empty: bool, families: tuple[str, ...]) -> None:
    """Compile RULES and make them live on IFACE, replacing what runs there atomically
    (`apply rules.v4 rules.v6 -i eth0`: both families).

    The new ruleset is compiled, loaded, verified and its maps filled before one kernel
    operation switches to it. If anything fails the running ruleset is left untouched and
    the command exits non-zero (2 for bad input).
    """
    from bpfilter.runtime import deploy, state
    from bpfilter.codegen import Attach
    from bpfilter.frontend import holds_tables
    from bpfilter.loader.xdp import XdpMode

    _need_rights("apply")
    text, source = _read_all(rules, families)
    if not allow_empty and not holds_tables(text):
        _show_input_error(InputError(source, 1, "(no table)",
                                     "the input holds no table: applied, it would take every "
                                     "rule off the interface",
                                     "--allow-empty to run no filter, or bpfilter detach"),
                          text)
        sys.exit(EXIT_INPUT)
    tc = mode == "tc"
    try:
        with console.status("applying…") as status:
            report = deploy.apply(text, source, iface, output or Path("build") / iface,
                                  XdpMode(mode) if mode and not tc else None,
                                  progress=lambda msg: status.update(f"{msg}…"),
                                  attach=Attach.TC if tc else None,
                                  waiting=lambda msg: err_console.print(f"bpfilter: {msg}"))
    except InputError as exc:
        _show_input_error(exc, text)
        sys.exit(EXIT_INPUT)
    except (BuildError, KernelError) as exc:
        _fail(exc)
    except OSError as exc:
        _fail(f"cannot write {exc.filename or output}: {exc.strerror}")
    if report.fallback:
        console.print(f"[yellow]{report.fallback}[/]")
    d = report.deployment
    verb = "replaced the ruleset on" if report.replaced else "attached to"
    if report.edited:
        verb = f"{report.edited} address rule(s) changed in place on"
    elif report.map_only:
        verb = "same program, rewrote the maps of"
    console.print(f"{verb} {iface} ({d.where}): {d.rules} rules from {d.source}, program "
                  f"{d.prog_id}; switch {report.switch_ns / 1e6:.2f} ms, "
                  f"total {report.total_s:.2f} s")
    for warning in report.warnings:
        console.print(f"[bold red]warning:[/] {escape(warning)}")
    if report.interrupted:
        err_console.print(f"[yellow]bpfilter: {report.interrupted} came once the switch had "
                          "begun: the apply finished, the new ruleset IS live[/]")
    # The text test spares parsing again the (large) rulesets that set no marks.
    if d.mode != state.TC_MODE and ("MARK" in text or "mark set" in text):
        from bpfilter.frontend import parse_ruleset

        _warn_unseen_marks(parse_ruleset(text, source))


@main.command()
@click.option("--all-namespaces", is_flag=True, help="Also rulesets in other network namespaces.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (README: JSON output).")
def status(all_namespaces: bool, as_json: bool) -> None:
    """What runs where: interface, mode, program, since when, ruleset; checked against the
    kernel (the links' programs, the namespace), and whether each namespace's watcher
    follows its addresses and interfaces. Exits 1 when something does not agree: `bpfilter
    gc` frees what deleted interfaces and namespaces left."""
    _need_rights("status")
    from bpfilter.runtime import reconcile, watcher

    rulesets, spaces = [], {}
    for paths, d in reconcile.deployments(all_namespaces):
        problem = reconcile.health(paths, d)
        spaces.setdefault(paths.netns, not problem)
        rulesets.append({"iface": d.iface, "netns": d.netns, "hook": d.hook, "mode": d.mode,
                         "prog_id": d.prog_id, "egress_prog_id": d.egress_prog_id,
                         "applied_at": d.applied_at, "rules": d.rules, "source": d.source,
                         "sha256": d.sha256, "state": problem or "attached",
                         "ok": not problem})
    watchers = []
    for netns, alive in spaces.items():
        found = watcher.running(netns)
        following = found is not None and bool(found.pid) and not found.error
        watchers.append({"netns": netns, "pid": found.pid if found else 0,
                         "last_sync": found.last_sync if found else "",
                         "following": following,
                         "error": "" if following else
                         (found.error if found else "no watcher runs"),
                         "ok": following or not alive})
    ok = all(r["ok"] for r in rulesets) and all(w["ok"] for w in watchers)
    if as_json:
        _print_json({"ok": ok, "rulesets": rulesets, "watchers": watchers})
    elif not rulesets:
        console.print("bpfilter runs no ruleset in this network namespace")
    else:
        _status_table(rulesets, watchers)
    if not ok:
        sys.exit(EXIT_FAILURE)


def _status_table(rulesets: list[dict], watchers: list[dict]) -> None:
    table = _table("bpfilter rulesets")
    for col in ("iface", "netns", "hook", "mode", "program", "since", "rules", "source",
                "sha256", "state"):
        table.add_column(col)
    for r in rulesets:
        program = str(r["prog_id"]) + (f" + {r['egress_prog_id']} (egress)"
                                       if r["egress_prog_id"] else "")
        table.add_row(r["iface"], str(r["netns"]), r["hook"], r["mode"], program,
                      r["applied_at"], str(r["rules"]), r["source"], r["sha256"][:12],
                      "attached" if r["ok"] else f"[red]{escape(r['state'])}[/]")
    console.print(table)
    for w in watchers:
        if w["following"]:
            console.print(f"netns {w['netns']}: addresses, routes and interfaces followed by "
                          f"watcher pid {w['pid']} (last sync {w['last_sync']})")
        elif not w["ok"]:
            console.print(f"[red]netns {w['netns']}: addresses, routes and interfaces are "
                          f"NOT followed ({escape(w['error'])}): apply again to start the "
                          "watcher[/]")


def _table(title: Optional[str] = None, **options) -> Table:
    """A table for the console: boxed on a terminal, plain columns when piped."""
    if PIPED:
        options.setdefault("box", None)
    return Table(title=title, title_justify="left", **options)


def _print_json(data) -> None:
    """JSON on stdout, whole, unwrapped, one document."""
    click.echo(json.dumps(data, indent=1))


@main.command()
def gc() -> None:
    """Free what rulesets left behind: the pins and state of rulesets whose interface or
    network namespace is gone, and of applies that were killed half-way (settled first:
    the record of what runs is kept). What still runs is never touched."""
    _need_rights("gc")
    from bpfilter.runtime import reconcile

    freed = reconcile.collect()
    for line in freed:
        console.print(f"freed {line}")
    if not freed:
        console.print("nothing to free")


@main.command("conntrack")
@click.option("-i", "--iface", help="The table the ruleset on this interface reads.")
@click.option("-L", "--list", "list_", is_flag=True,
              help="Accepted for conntrack habits: listing is what this does unless -F.")
@click.option("-F", "--flush", is_flag=True, help="Forget every connection, as conntrack -F.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (README: JSON output).")
def conntrack_cmd(iface: Optional[str], list_: bool, flush: bool, as_json: bool) -> None:
    """The connections bpfilter tracks, like `conntrack -L`: protocol, TCP state, seconds
    left, the endpoints as the side that opened it sees them, the connection's mark
    (CONNMARK), and [UNREPLIED] until the other side answered. There is one table per
    network namespace, as in the kernel, shared by the interfaces whose ruleset reads
    the connection state; none until one does. Also how full the table is, and how many
    connections its LRU pushed out to make room (none, unless the table is too small for
    the traffic)."""
    _need_rights("conntrack")
    from bpfilter.runtime import conntable, reconcile

    found = [(p, d) for p, d in reconcile.deployments() if iface in (None, d.iface)
             and p.conntrack.exists()]
    if not found:
        err_console.print(f"[red]bpfilter: no connection table on {iface or 'any interface'}"
                          "[/]")
        sys.exit(EXIT_FAILURE)
    paths = found[0][0]
    users = ", ".join(d.iface for _p, d in found if d.conntrack) or "no ruleset now"
    if flush:
        console.print(f"flushed: {conntable.flush(paths)} connection(s) forgotten")
        return
    table = _table(f"connections (read by rulesets on {users})")
    for col in ("proto", "state", "timeout", "src", "dst", "sport", "dport", "mark", "dnat",
                "snat", ""):
        table.add_column(col, justify="right" if col in ("timeout", "sport", "dport", "mark")
                         else "left")
    rows = sorted(conntable.connections(paths), key=lambda c: (c.proto, c.src, c.sport))
    use = conntable.table_use(paths)
    if as_json:
        _print_json({"users": users.split(", ") if found[0][1].conntrack else [],
                     "connections": [dataclasses.asdict(c) for c in rows],
                     "entries": use.entries, "capacity": use.capacity,
                     "evicted": use.evicted})
        return
    for c in rows:
        table.add_row(c.proto, c.state, str(c.timeout_s), c.src, c.dst,
                      f"id {c.sport}" if c.proto == "icmp" else str(c.sport),
                      f"type {c.dport}" if c.proto == "icmp" else str(c.dport),
                      str(c.mark), c.dnat or "", c.snat or "",
                      "" if c.replied else "[UNREPLIED]")
    console.print(table)
    console.print(f"{len(rows)} connection(s); the table holds {use.entries:,} of "
                  f"{use.capacity:,} entries (expired ones until reused), "
                  f"{use.evicted:,} evicted while live")


def _deployed(iface: Optional[str]):
    """(paths, deployment, parsed ruleset) of every ruleset to show, or exit 1."""
    from bpfilter.runtime import reconcile, state
    from bpfilter.frontend import parse_ruleset

    found = [(p, d) for p, d in reconcile.deployments() if iface in (None, d.iface)]
    if not found:
        err_console.print(f"[red]bpfilter: nothing runs on {iface or 'any interface'}[/]")
        sys.exit(EXIT_FAILURE)
    return [(p, d, parse_ruleset(state.ruleset_text(p, d), d.source)) for p, d in found]


def _human(value: int, exact: bool) -> str:
    if exact or value < 100000:
        return str(value)
    for unit in ("K", "M", "G", "T"):
        value //= 1000
        if value < 100000:
            return f"{value}{unit}"
    return str(value)


@main.command("list")
@click.option("-i", "--iface", help="Only this interface.")
@click.option("-v", "--verbose", is_flag=True, help="Show packet and byte counters.")
@click.option("-n", "--numeric", is_flag=True, help="Accepted for iptables habits: "
              "addresses and ports are always numeric.")
@click.option("-x", "--exact", is_flag=True, help="Exact counter values, no K/M units.")
@click.option("-t", "--table", "only", metavar="TABLE",
              help="Only this table: raw, mangle or filter (ip6tables' as well), or an "
                   "nftables table's name (default: every table the ruleset has).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (README: JSON output).")
def list_cmd(iface: Optional[str], verbose: bool, numeric: bool, exact: bool,
             only: Optional[str], as_json: bool) -> None:
    """The running rules per chain, with their counters, like `iptables -L -v` (an
    nftables ruleset's rules in nft's words)."""
    _need_rights("list")
    from bpfilter.runtime.deploy import LiveCounters
    from bpfilter.frontend import rule_words

    if as_json:
        _print_json({"rulesets": [_listed(paths, d, ruleset, only)
                                  for paths, d, ruleset in _deployed(iface)]})
        return
    for paths, d, ruleset in _deployed(iface):
        console.print(f"[bold]{d.iface}[/] ({d.where}, {d.source})")
        with LiveCounters(paths, d) as live:
            for table in (t for t in ruleset.tables if only in (None, t.name)):
                for chain in table.chains:
                    if not chain.rules and not chain.builtin:
                        continue
                    policy = live(table.key, chain.name, -1)
                    head = f"Chain {chain.name} "
                    head += (f"(policy {chain.policy.value}" + (
                        f" {_human(policy.packets, exact)} packets, "
                        f"{_human(policy.bytes, exact)} bytes)" if verbose else ")")
                             if chain.builtin else "(user-defined)")
                    console.print(f"[bold]{head}[/]" + (
                        "" if table.key == "filter" else f" [dim]({table.key})[/]"))
                    out = Table(box=None, pad_edge=False)
                    out.add_column("num", justify="right")
                    if verbose:
                        out.add_column("pkts", justify="right")
                        out.add_column("bytes", justify="right")
                    out.add_column("rule")
                    for index, rule in enumerate(chain.rules):
                        c = live(table.key, chain.name, index)
                        counts = [_human(c.packets, exact), _human(c.bytes, exact)] \
                            if verbose else []
                        out.add_row(str(index + 1), *counts,
                                    rule_words(table, chain.name, rule))
                    console.print(out if chain.rules else "")


def _listed(paths, d, ruleset, only: Optional[str]) -> dict:
    """A running ruleset's chains, rules (as written) and counters, as data."""
    from bpfilter.runtime.deploy import LiveCounters
    from bpfilter.frontend import rule_words

    tables = []
    with LiveCounters(paths, d) as live:
        for table in (t for t in ruleset.tables if only in (None, t.name)):
            chains = []
            for chain in table.chains:
                policy = live(table.key, chain.name, -1)
                chains.append({
                    "chain": chain.name, "builtin": chain.builtin,
                    "policy": chain.policy.value if chain.policy else None,
                    "policy_packets": policy.packets, "policy_bytes": policy.bytes,
                    "rules": [{"num": i + 1, "rule": rule_words(table, chain.name, rule),
                               "packets": c.packets, "bytes": c.bytes,
                               "line": rule.origin.line if rule.origin else None}
                              for i, rule in enumerate(chain.rules)
                              for c in [live(table.key, chain.name, i)]]})
            tables.append({"table": table.key, "chains": chains})
    return {"iface": d.iface, "source": d.source, "applied_at": d.applied_at,
            "mode": d.mode, "tables": tables}


@main.command()
@click.option("-i", "--iface", help="Only this interface.")
@click.option("-c", "--counters", is_flag=True, help="Include packet and byte counters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (README: JSON output).")
def save(iface: Optional[str], counters: bool, as_json: bool) -> None:
    """The running ruleset as iptables-save text, or an nftables one as nft text (with -c,
    its live counters)."""
    _need_rights("save")
    from bpfilter.runtime.deploy import LiveCounters
    from bpfilter.frontend.iptables.save import save as save_text
    from bpfilter.frontend.nft.save import save_nft

    saved = []
    for paths, d, ruleset in _deployed(iface):
        with LiveCounters(paths, d) as live:
            xtables = all(t.xtables for t in ruleset.tables)
            text = save_text(ruleset, counters=counters, live=live) if xtables else \
                save_nft(ruleset, live if counters else None)
        saved.append({"iface": d.iface, "applied_at": d.applied_at, "source": d.source,
                      "format": "iptables-save" if xtables else "nft", "text": text})
    if as_json:
        _print_json({"rulesets": saved})
        return
    for r in saved:
        click.echo(f"# bpfilter ruleset on {r['iface']}, applied {r['applied_at']} from "
                   f"{r['source']}")
        click.echo(r["text"], nl=False)


@main.command("log")
@click.option("-i", "--iface", help="Only this interface's ruleset.")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing events as they come, across applies, until Ctrl-C.")
@click.option("-n", "--count", type=click.IntRange(min=1),
              help="Stop after this many events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event and line "
              "(README: JSON output).")
def log_cmd(iface: Optional[str], follow: bool, count: Optional[int], as_json: bool) -> None:
    """Packets that LOG rules (nft's `log`) logged, one line each, as the kernel's LOG
    target writes them to the kernel log: the rule's prefix, IN=, OUT=, MAC=, SRC=, DST=,
    lengths, TTL, PROTO= and ports, TCP flags, ICMP type, MARK=.

    Events wait in each ruleset's ring buffer (256 KiB; when it is full new events are
    lost) until read: reading takes them out, so two readers share them. Fields the
    kernel prints and bpfilter's packet record does not hold are left out (the IPv4 ID,
    the IPv6 flow label, TCP's RES and URGP, an ICMP echo's sequence number, options)."""
    _need_rights("log")
    from bpfilter.runtime import state
    from bpfilter.runtime.logs import LogReader

    names = dict(socket.if_nameindex())
    seen = 0
    boot = time.time() - time.monotonic()

    def show(logged) -> None:
        nonlocal seen
        if count is not None and seen >= count:
            return  # the rest of a batch past --count
        seen += 1
        when = boot + logged.event.timestamp_ns / 1e9
        if as_json:
            table, chain, index = logged.rule
            click.echo(json.dumps({"time": when, "iface": logged.iface, "table": table,
                                   "chain": chain, "rule": index + 1,
                                   "prefix": logged.target.prefix if logged.target else "",
                                   "line": logged.line(names)}))
            return
        click.echo(f"{time.strftime('%b %d %H:%M:%S', time.localtime(when))} "
                   f"{logged.line(names)}")

    def version(d) -> tuple[str, str]:
        """What an apply changes: the maps' generation, or (a change the running program
        takes in place) the ruleset."""
        return d.generation, d.sha256

    def versions() -> list[tuple[str, str]]:
        """Cheaper than _deployed(), which parses the rulesets."""
        return [version(d) for _p, d in state.deployments() if iface in (None, d.iface)]

    current = _deployed(iface)
    if follow:
        err_console.print(f"[dim]bpfilter: following the LOG events of "
                          f"{', '.join(d.iface for _p, d, _r in current)} (Ctrl-C stops)[/]")
    while True:
        with LogReader(current, show) as reader:
            reader.consume()
            while follow and (count is None or seen < count):
                reader.poll(200)
                if [version(d) for _p, d, _r in current] != versions():
                    reader.consume()  # what the old maps still hold, then the new ones
                    current = _deployed(iface)
                    names = dict(socket.if_nameindex())
                    break
            else:
                return


@main.command()
@click.option("-i", "--iface", required=True, help="The interface to stop filtering on.")
def detach(iface: str) -> None:
    """Take the ruleset off IFACE: back to no filtering, pins and state removed."""
    _need_rights("detach")
    from bpfilter.runtime import deploy

    try:
        d = deploy.detach(iface)
    except KernelError as exc:
        _fail(exc)
    egress = f" and egress program {d.egress_prog_id}" if d.egress_prog_id else ""
    console.print(f"detached program {d.prog_id}{egress} from {iface}")


@main.command()
@click.argument("rules", required=False, type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/demo"), show_default=True, help="Where objects go.")
def demo(rules: Optional[Path], output: Path) -> None:
    """Run a ruleset on a throwaway veth pair with real packets, and show what happened.

    Without RULES it uses the bundled examples/host-firewall.v4; RULES may be an nftables
    ruleset too (examples/host-firewall.nft), the frames are the same. Two network
    namespaces are created, joined by a veth pair; the ruleset is attached at XDP on the
    server side, the client sends a scripted set of frames, and the verdicts, replies, LOG
    lines and per-rule counters are printed. Everything is removed afterwards, also on failure.
    """
    _need_rights("demo")
    from bpfilter.testbed.demo import deciding, host_firewall_probes, rule_label, run_demo, verdict
    from bpfilter.resources import resource_dir

    rules = rules or resource_dir("examples") / "host-firewall.v4"
    try:
        result = run_demo(rules, output, host_firewall_probes(),
                          lambda msg: console.print(f"[dim]· {msg}[/]"))
    except InputError as exc:
        _show_input_error(exc, decode(rules.read_bytes()))
        sys.exit(EXIT_INPUT)
    except (BuildError, KernelError, RuntimeError) as exc:
        _fail(exc)
    ruleset = result.ruleset
    verdicts = _table("what each frame met")
    for col in ("#", "frame", "decided by", "verdict", "came back"):
        verdicts.add_column(col)
    for number, obs in enumerate(result.observations, 1):
        decided = rule_label(ruleset, *deciding(ruleset, obs.rules)) if obs.rules else \
            "no rule (left to the kernel)"
        verdicts.add_row(str(number), f"{obs.probe.what}\n[dim]{obs.probe.packet.summary()}[/]",
                         decided, verdict(ruleset, obs.rules), obs.reply)
    console.print(verdicts)
    console.print("[dim]An ACCEPTed frame goes on to the kernel's stack, which answers it "
                  "itself (no service listens in the demo namespace).[/]")
    if result.logged:
        console.print("[bold]what LOG rules logged[/] [dim](bpfilter log)[/]")
        for line in result.logged:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    _print_counters(ruleset, result.counters)


def _print_counters(ruleset, counters) -> None:
    from bpfilter.testbed.demo import rule_label

    table = _table("counters (like iptables -L -v)")
    for col in ("chain", "#", "pkts", "bytes", "rule"):
        table.add_column(col, justify="right" if col in ("#", "pkts", "bytes") else "left")
    for (table_name, chain, index), c in sorted(counters.items(),
                                                key=lambda kv: (kv[0][0], kv[0][1],
                                                                kv[0][2] < 0, kv[0][2])):
        if c.packets == 0 and (index < 0 or table_name != "filter"):
            continue
        where = chain if table_name == "filter" else f"{table_name}/{chain}"
        table.add_row(where, "policy" if index < 0 else str(index + 1), str(c.packets),
                      str(c.bytes), rule_label(ruleset, table_name, chain, index))
    console.print(table)


if __name__ == "__main__":
    main()
