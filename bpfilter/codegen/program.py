"""Renders one stage plan into a C program with the stage template."""

from __future__ import annotations

import enum
import functools
import hashlib
import re
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import jinja2

from bpfilter import ir
from bpfilter.errors import InputError
from bpfilter.codegen.classifier import ClassifierTables, classifier_tables, walk_steps
from bpfilter.codegen.matchers import MatchContext, match_lines
from bpfilter.codegen.services import ServiceTables, service_lines, service_tables
from bpfilter.codegen.targets import return_lines, target_lines, uses_conntrack
from bpfilter.passes.classify import MAX_DEPTH, Segment, entry_rules
from bpfilter.passes.fold import PrefixRun, RuleItem, item_target
from bpfilter.passes.services import MAX_ENDPOINTS, ServiceRun
from bpfilter.passes.stages import ChainRef, Stage
from bpfilter.resources import resource_dir

# The runtime the generated programs include: packet parsing, maps, targets; the classifier.
RUNTIME_HEADERS = ("bpfilter.h", "classify.h", "conntrack.h", "addrtype.h", "nat.h",
                   "numgen.h", "services.h", "recent.h")
# Chains longer than this are split into functions of this many rules: clang's time grows
# faster than linearly with the size of one function.
PART_RULES = 32
# The kernel verifies at most 256 functions in a program (BPF_MAX_SUBPROGS); the runtime
# headers take a few dozen.
MAX_CHAIN_FUNCTIONS = 224
# A user chain whose rules times its callers are at most this is inlined into them: no
# function of its own (kube-proxy's thousands of two-rule KUBE-SEP and short KUBE-SVC
# chains would pass the kernel's 256 functions), at the cost of its code once per caller.
INLINE_RULE_CALLS = 16
# bpf_loop() runs at most this many steps (BPF_MAX_LOOPS), the classifier's walk one each.
MAX_WALK_STEPS = 1 << 23


class Attach(enum.Enum):
    """Where a stage program runs: the same C, built for XDP or for TC."""

    XDP = "xdp"
    TC = "tc"

    @property
    def label(self) -> str:
        return f"{self.name} ingress"


@dataclass(frozen=True)
class FoldedRun:
    """Where a folded run's rules are, so that `apply` can add or remove one of them in
    the running maps (only in runs that are code: a classifier entry's run is also in the
    classifier's address classes)."""

    table: str
    chain: str
    first: int  # rule indexes in the chain, inclusive
    last: int
    number: int  # the run's key in bf_prefixes / bf_exact
    length: Optional[int]  # the prefix length every rule has (bf_exact), or None
    direction: str
    data: bool


@dataclass(frozen=True)
class ProgramSource:
    """One program of a ruleset: where it runs, the hooks it walks, its C."""

    name: str  # the BPF function and section name
    hooks: tuple[ir.Hook, ...]
    egress: bool  # at TC egress (else at the ingress the ruleset is built for)
    source: str


@dataclass(frozen=True)
class GeneratedProgram:
    """The C of a ruleset's programs (the ingress one first) plus what the loader must put
    in the maps before they run. The programs declare the same maps and share them: one
    counter, limit and folded-run numbering serves both."""

    programs: tuple[ProgramSource, ...]
    if_patterns: tuple[ir.InterfaceMatch, ...]
    # their bf_limits slots
    limits: tuple[Union[ir.LimitMatch, ir.StatisticMatch, ir.NumgenMatch], ...]
    nslots: int
    # Folded runs: (run, prefix, slot) for the LPM tries (bf_prefixes, IPv6's
    # bf_prefixes6), (run, address, slot) for the hash of IPv4 runs whose prefixes share
    # one length.
    prefixes: tuple[tuple[int, ir.IPNetwork, int], ...] = ()
    exact: tuple[tuple[int, int, int], ...] = ()
    classifier: ClassifierTables | None = None
    # Capacities in the C source, which the loader must lay the tables out by.
    classifier_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    runs: tuple[FoldedRun, ...] = ()
    attach: Attach = Attach.XDP  # of the ingress program
    conntrack: bool = False  # rules read the connection state: bf_conntrack is shared
    nat: bool = False  # rules translate addresses: replies are translated where it runs
    services: ServiceTables = ServiceTables()  # the service map's rows
    recent_lists: int = 0  # -m recent's lists: bf_recent_lists is shared

    @property
    def name(self) -> str:
        return self.programs[0].name

    @property
    def source(self) -> str:
        """Every program's C, for what depends on all of them (the ruleset's identity)."""
        return "".join(p.source for p in self.programs)

    def where(self, program: ProgramSource) -> str:
        return "TC egress" if program.egress else self.attach.label


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def runtime_headers() -> dict[str, str]:
    return {name: (resource_dir("templates") / name).read_text() for name in RUNTIME_HEADERS}


def code_digest(source: str) -> str:
    """The program's identity: its C without comments (which name lines and counts)."""
    return hashlib.sha256(re.sub(r"/\*.*?\*/", "", source, flags=re.S).encode()).hexdigest()


def room(count: int) -> int:
    """Room for `count` classifier rows: a quarter to spare, in steps of 64 (the
    classifier's maps are large, and the bitsets are as wide as the entry room)."""
    return max(64, (count * 5 // 4 // 64 + 1) * 64)


def capacity(count: int) -> int:
    """Room for `count` entries, rounded up (at least 64, then powers of two with half
    to spare) so that adding or removing an entry rarely changes the program."""
    return max(64, 1 << (2 * count - 1).bit_length())


def _c_comment(text: str) -> str:
    return text.replace("*/", "* /")


def _function_name(index: int, table: str, chain: str) -> str:
    plain = lambda name: re.sub(r"[^A-Za-z0-9_]", "_", name)[:40]  # noqa: E731
    return f"bf_chain_{index}_{plain(table)}_{plain(chain)}"


INGRESS, EGRESS = "bf_ingress", "bf_egress"
# The IP version of the packets a base chain runs for (None: every packet, an inet chain).
_VERSIONS = {ir.Family.IPV4: 4, ir.Family.IPV6: 6, None: None}
# Where the kernel tracks connections (the first packet's hook on each path).
TRACKING_HOOKS = (ir.Hook.PREROUTING, ir.Hook.OUTPUT)
NAT_OUTPUT_PRIORITY = -100  # NF_IP_PRI_NAT_DST


def _base_name(key: tuple[str, str], hook: ir.Hook) -> str:
    """iptables' built-in chains by their table alone; nftables' as table/chain."""
    table, chain = key
    return table if chain == hook.value else f"{table}/{chain}"


def generate_programs(stages: tuple[Stage, ...], nslots: int, source: str,
                      attach: Attach = Attach.XDP) -> GeneratedProgram:
    """The ingress stage, then the egress one: each chain's code is made once (one
    counter slot, one rate-limit bucket, one folded run per rule) and goes into every
    program that reaches it. An egress program with no hook to run and no connection to
    follow is left out."""
    ctx = MatchContext()
    # Folded runs, with their chain's rule slots and where they are (see FoldedRun).
    runs: list[tuple[PrefixRun, tuple[int, ...], tuple[str, str], bool]] = []
    refs = {ref.key: ref for stage in stages for ref in stage.chains}
    functions: dict[str, dict[str, str]] = {}  # per table, per chain
    for i, (table, name) in enumerate(refs):
        functions.setdefault(table, {})[name] = _function_name(i, table, name)
    callers = _callers(refs.values())
    code = {key: _chain_code(ref, functions[ref.table], runs, ctx,
                             len(ref.items) * callers.get(key, 0) <= INLINE_RULE_CALLS)
            for key, ref in refs.items()}
    tables, sizes = _classifier(stages[0], runs, ctx)
    services = service_tables([ctx.services[n] for n in sorted(ctx.services)],
                               stages[0].service_slots)
    families = {ref.family for ref in refs.values()}
    # Each base chain runs for its family's packets (an inet one for both; with IPv4
    # chains alone the parser lets only IPv4 in), a netdev one for its device's frames.
    conditions = {ref.key: _condition(ref, families != {ir.Family.IPV4}, ctx)
                  for ref in refs.values() if ref.chain.builtin}
    defines = dict(
        source=_c_comment(source), tc=attach is Attach.TC, conntrack=ctx.conntrack,
        nat=ctx.nat,
        ipv6=bool(families - {ir.Family.IPV4}),
        nslots=capacity(nslots), nlimits=capacity(len(ctx.limits)),
        nnumgen=len(ctx.numgens), recent_lists=len(ctx.recent_lists),
        recent_stamps=1 << max(ctx.recent_hits - 1, 0).bit_length(),
        nifpatterns=len(ctx.if_patterns),
        nprefixes=capacity(sum(len(r.prefixes) for r, *_ in runs
                               if r.uniform_length is None and r.version == 4)),
        nprefixes6=capacity(sum(len(r.prefixes) for r, *_ in runs if r.version == 6)),
        nexact=capacity(sum(len(r.prefixes) for r, *_ in runs if r.uniform_length is not None)),
        nservices=capacity(len(services.keys)) if services.keys else 0,
        nendpoints=capacity(len(services.endpoints)), max_endpoints=MAX_ENDPOINTS,
        ifbits_in=_pattern_bits(ctx, "in"), ifbits_out=_pattern_bits(ctx, "out"),
        classifier=sizes)
    programs = []
    for stage, (name, egress) in zip(stages, ((INGRESS, False), (EGRESS, True))):
        if egress and not stage.hooks and not ctx.conntrack:
            continue
        # Per hook, the base chains (the call, the condition it runs on) before
        # connection tracking and those after it.
        early, entries = {}, {}
        for hook in ir.Hook:
            bases = [((f"{functions[t][c]}(p)", conditions[(t, c)]),
                      refs[(t, c)].chain.before_tracking and hook in TRACKING_HOOKS,
                      refs[(t, c)].chain.priority) for t, c in stage.base_chains(hook)]
            early[hook.name.lower()] = [f for f, before, _ in bases if before]
            later = [(f, priority) for f, before, priority in bases if not before]
            if egress and ctx.nat and hook is ir.Hook.OUTPUT:
                # The host's own packet gets OUTPUT DNAT's destination at nat's place.
                at = sum(1 for _f, priority in later if priority <= NAT_OUTPUT_PRIORITY)
                later.insert(at, (("bf_nat_output(ctx, p)", None), NAT_OUTPUT_PRIORITY))
            entries[hook.name.lower()] = [f for f, _priority in later]
        _check_size(stage, code)
        text = _environment().get_template("stage.c.j2").render(
            **defines, program=name, egress=egress, rejects=_rejects(stage),
            walks="; ".join(f"{h.value} ({', '.join(_base_name(k, h) for k in keys)})"
                            for h, keys in stage.walks),
            chains=[code[ref.key] for ref in stage.chains], early=early, entries=entries)
        programs.append(ProgramSource(name, stage.hooks, egress, text))
    prefixes = tuple((number, net, slots[index]) for number, (run, slots, *_) in enumerate(runs)
                     if run.uniform_length is None for net, index in run.prefixes)
    exact = tuple((number, int(net.network_address), slots[index])
                  for number, (run, slots, *_) in enumerate(runs)
                  if run.uniform_length is not None for net, index in run.prefixes)
    folded = tuple(FoldedRun(table, chain, run.indexes[0], run.indexes[-1], number,
                             run.uniform_length, run.direction, data)
                   for number, (run, _slots, (table, chain), data) in enumerate(runs))
    return GeneratedProgram(tuple(programs), tuple(ctx.if_patterns), tuple(ctx.limits),
                            nslots, prefixes, exact, tables, sizes, folded, attach,
                            ctx.conntrack, ctx.nat, services, len(ctx.recent_lists))


def _condition(ref: ChainRef, guard: bool, ctx: MatchContext) -> Optional[str]:
    """What a base chain's packets have, in C; None: every packet of the program."""
    tests = []
    if guard and ref.family is not None:
        tests.append(f"p->family == {_VERSIONS[ref.family]}")
    if ref.chain.device is not None:
        index = ctx.if_pattern(ir.InterfaceMatch("in", ref.chain.device))
        tests.append(f"(p->ifbits >> {index}) & 1")
    if ref.chain.nat:  # a packet that opens a connection (nf_nat_inet_fn)
        ctx.conntrack = True
        tests.append("p->ct_create != sNO")
    return " && ".join(tests) or None


def _callers(refs) -> dict[tuple[str, str], int]:
    """How many rules of code (or folded runs) jump to each chain."""
    found: dict[tuple[str, str], int] = {}
    for ref in refs:
        for item in ref.items:
            target = item_target(item)
            if isinstance(target, ir.JumpTarget):
                key = (ref.table, target.chain)
                found[key] = found.get(key, 0) + 1
    return found


def _chain_code(ref: ChainRef, functions: dict[str, str], runs: list,
                ctx: MatchContext, small: bool) -> dict:
    """What the template renders of one chain: its rules, split into parts if long, or
    inlined into its callers if `small` (a user chain). `functions`: the C function of
    each chain of its table."""
    chain = ref.chain
    ctx.family = ref.family
    parted = len(ref.items) > PART_RULES
    to_policy = "return BF_POLICY;" if parted else "goto policy;"
    rules = []
    for item in ref.items:
        if isinstance(item, Segment):
            exit_ = return_lines(chain.builtin, to_policy)
            lines = ["{", f"\tint v = bf_classify(p, {item.number});", "",
                     "\tif (v == BF_CONTINUE)", *("\t\t" + x for x in exit_),
                     "\tif (v != BF_NEXT)", "\t\treturn v;", "}"]
            title, origin = (f"segment {item.number}: {len(item.entries)} rules as data",
                             # (an empty user chain a classified rule jumps to is data too)
                             _entry_origin(item) if item.entries else chain.origin)
            ctx.skip = f"seg{item.number}"
        elif isinstance(item, ServiceRun):
            lines = service_lines(item)
            ctx.skip = f"svc{item.number}"
            ctx.services[item.number] = item
            ctx.conntrack = ctx.nat = True
            title = f"service run {item.number}: {len(item.services)} services in one lookup"
            origin = chain.rules[item.services[0].index].origin
        elif isinstance(item, RuleItem):
            slot = ref.rule_slots[item.index]
            ctx.skip = f"r{slot}"
            lines = _rule_lines(item.rule.matches, item.rule.target, str(slot),
                                chain.builtin, functions, to_policy, ctx)
            title, origin = f"rule {slot}", item.rule.origin
        else:
            ctx.skip = f"run{len(runs)}"
            lines = _run_lines(item, len(runs), chain.builtin, functions, to_policy, ctx)
            runs.append((item, ref.rule_slots, ref.key, False))
            title = f"run {len(runs) - 1}: {len(item.prefixes)} prefixes in one lookup"
            origin = item.rules[0].origin
        rules.append({"title": title, "origin": _c_comment(str(origin)),
                      "lines": lines, "label": ctx.skip})
    parts = []
    if parted:
        for start in range(0, len(rules), PART_RULES):
            parts.append({"function": f"{functions[chain.name]}_part{len(parts)}",
                          "rules": rules[start:start + PART_RULES],
                          "first": start + 1,
                          "last": min(start + PART_RULES, len(rules))})
    if chain.builtin:
        tail = ["policy:", f"bf_count({ref.policy_slot}, p);",
                f"return BF_{chain.policy.value};"]
    else:
        tail = ["return BF_CONTINUE;"]
    return {"name": _c_comment(f"{ref.table} {chain.name}"),
            "function": functions[chain.name],
            "inline": small and not chain.builtin and not parted,
            "origin": chain.origin and _c_comment(str(chain.origin)),
            "rules": [] if parted else rules, "parts": parts, "tail": tail}


def _check_size(stage: Stage, code: dict) -> None:
    """Refuse, naming the chain, a program with more functions than the kernel verifies
    (rules that stay code: what neither folding nor the classifier takes)."""
    functions = sum(0 if code[ref.key]["inline"] else max(1, len(code[ref.key]["parts"]))
                    for ref in stage.chains)
    if functions <= MAX_CHAIN_FUNCTIONS:
        return
    longest = max(stage.chains, key=lambda ref: len(code[ref.key]["parts"]))
    origin = longest.chain.origin or next(
        (r.origin for r in longest.chain.rules), ir.Origin("<input>", 0))
    raise InputError(origin.file, origin.line, longest.chain.name,
                     f"too many rules stay code: {functions} functions of {PART_RULES} "
                     f"rules, the kernel verifies {MAX_CHAIN_FUNCTIONS} (chain "
                     f"'{longest.chain.name}' has {len(longest.chain.rules)} rules; the "
                     "classifier takes IPv4 chains only, IPv6 and inet ones fold only their "
                     "address runs)",
                     f"up to about {MAX_CHAIN_FUNCTIONS * PART_RULES} rules that stay code, "
                     "or runs of rules differing only in their address", origin.column)


def _rejects(stage: Stage) -> bool:
    """Whether a packet can meet a REJECT in this program: a rule of a chain it runs as
    code, or a classifier entry."""
    return any(isinstance(rule.target, ir.RejectTarget)
               for ref in stage.chains for rule in ref.chain.rules) or any(
        isinstance(entry.target, ir.RejectTarget) for entry in stage.classification.entries)


def _pattern_bits(ctx: MatchContext, direction: str) -> str:
    """The bits of bf_ifmatch's masks that name patterns of `-i` or of `-o`."""
    bits = sum(1 << k for k, p in enumerate(ctx.if_patterns) if p.direction == direction)
    return f"0x{bits:x}ULL"


def _entry_origin(segment: Segment) -> ir.Origin:
    item = segment.entries[0].item
    return item.rules[0].origin if isinstance(item, PrefixRun) else item.rule.origin


def _classifier(stage: Stage, runs: list, ctx: MatchContext):
    """The classifier's tables and the capacities the C source declares for them (none
    when nothing is classified). Its folded runs join `runs`."""
    classification = stage.classification
    if not classification.segments:
        return None, {"entries": 0}
    entry_slots, entry_runs = [], []
    for segment in classification.segments:
        slots = stage.segment_slots[segment.number]
        for entry in segment.entries:
            entry_slots.append(slots[entry_rules(entry)[0]])
            entry_runs.append(len(runs))
            if isinstance(entry.item, PrefixRun):
                runs.append((entry.item, slots, segment.chain, True))
    tables = classifier_tables(classification, entry_slots, entry_runs, ctx)
    sizes = {"entries": room(len(entry_slots)), "classes": room(len(tables.bitsets)),
             "prefixes": room(max(len(tables.saddr), len(tables.daddr))),
             "segments": room(len(tables.segments)), "depth": MAX_DEPTH,
             "steps": _walk_steps(classification)}
    sizes["words"] = 1 << (sizes["entries"] // 64 - 1).bit_length()  # see classify.h
    return tables, sizes


def _walk_steps(classification) -> int:
    """Steps for the walk's loop: its longest walk, rounded up so that rulesets of about
    one size share a program; refused, naming the chain, past what bpf_loop() runs."""
    steps = walk_steps(classification)
    if steps <= MAX_WALK_STEPS:
        return min(MAX_WALK_STEPS, max(1 << 16, 1 << (steps - 1).bit_length()))
    segment = max(classification.segments, key=lambda s: len(s.entries))
    origin = _entry_origin(segment)
    raise InputError(origin.file, origin.line, segment.chain[1],
                     f"a packet could meet {steps:,} classifier steps in chain "
                     f"'{segment.chain[1]}' and the chains it jumps to, more than one "
                     f"bpf_loop() runs ({MAX_WALK_STEPS:,}): too many jumps into long chains",
                     "fewer rules jumping into long user chains, or shorter chains behind "
                     "the jumps", origin.column)


def _rule_lines(matches, target, slot: str, builtin: bool, functions, to_policy: str,
                ctx: MatchContext) -> list[str]:
    lines = []
    for match in matches:
        lines.extend(match_lines(match, ctx))
    ctx.conntrack |= uses_conntrack(target)
    ctx.nat |= isinstance(target, ir.NAT_TARGETS)
    return lines + target_lines(target, slot, builtin, functions, to_policy)


def _run_lines(run: PrefixRun, number: int, builtin: bool, functions, to_policy: str,
               ctx: MatchContext) -> list[str]:
    """The lookup finds the one rule of the run that can match; the rest is that rule."""
    field = "p->saddr" if run.direction == "src" else "p->daddr"
    length = run.uniform_length
    if run.version == 6:
        lookup = f"bf_prefix6_lookup(p, {number}, p->{run.direction})"
    elif length is None:
        lookup = f"bf_prefix_lookup(p, {number}, {field})"
    else:
        mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
        lookup = f"bf_exact_lookup(p, {number}, {field} & 0x{mask:08x})"
    body = _rule_lines(run.rest, run.target, "slot", builtin, functions, to_policy, ctx)
    return (["{", f"\t__u32 *hit = {lookup}, slot;",
             f"\tif (!hit) goto {ctx.skip};", "\tslot = *hit;"]
            + ["\t" + line for line in body] + ["}"])
