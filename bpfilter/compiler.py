"""The pipeline: ruleset text -> IR -> passes -> C -> BPF objects, verified by the kernel."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bpfilter import ir
from bpfilter.build import build_source
from bpfilter.codegen import Attach, GeneratedProgram, generate_programs
from bpfilter.codegen.program import ProgramSource
from bpfilter.errors import InputError
from bpfilter.frontend import parse_ruleset
from bpfilter.loader.objects import Object, VerifierStats
from bpfilter.passes import Stage, plan_stages, validate
from bpfilter.passes.classify import classify
from bpfilter.passes.fold import fold_chains
from bpfilter.passes.services import find_services
from bpfilter.passes.stages import counter_slots


@dataclass(frozen=True)
class CompiledProgram:
    source: ProgramSource
    object_path: Optional[Path]  # None with emit="c"
    cached: bool = False
    stats: Optional[VerifierStats] = None


@dataclass
class Compilation:
    parsed: ir.Ruleset  # as read, for counting what was dropped
    ruleset: ir.Ruleset  # as compiled
    slots: dict[tuple[str, str, int], int]
    stages: tuple[Stage, ...] = ()
    code: Optional[GeneratedProgram] = None
    programs: list[CompiledProgram] = field(default_factory=list)  # the ingress one first
    skipped: list[InputError] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


def compile_ruleset(text: str, source: str, out_dir: Path, emit: str = "obj",
                    verify: bool = True,
                    on_unsupported: Optional[Callable[[InputError], None]] = None,
                    attach: Attach = Attach.XDP) -> Compilation:
    """Compile to `out_dir`. `emit="c"` stops after code generation; `verify` loads each
    object once so the kernel's verifier has accepted it (and reports its cost)."""
    timings: dict[str, float] = {}
    skipped: list[InputError] = []

    def skip(error: InputError) -> None:
        skipped.append(error)
        if on_unsupported is not None:
            on_unsupported(error)

    skipping = skip if on_unsupported is not None else None
    with _timed(timings, "parse"):
        parsed = parse_ruleset(text, source, skipping)
    with _timed(timings, "passes"):
        ruleset = validate(parsed, skipping)
        folds, classification = classify(ruleset, find_services(ruleset, fold_chains(ruleset)))
        slots = counter_slots(ruleset, folds)
        stages = plan_stages(ruleset, folds=folds, slots=slots,
                             classification=classification)
    result = Compilation(parsed, ruleset, slots, stages, skipped=skipped, timings=timings)
    with _timed(timings, "codegen"):
        result.code = generate_programs(stages, len(slots), source, attach)
    for program in result.code.programs:
        if emit == "c":
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{program.name}.c").write_text(program.source)
            result.programs.append(CompiledProgram(program, None))
            continue
        with _timed(timings, "clang"):
            path, cached = build_source(program.name, program.source, out_dir)
        stats = None
        if verify:
            with _timed(timings, "load+verify"), Object(path) as obj:
                stats = obj.programs[program.name].stats()
        result.programs.append(CompiledProgram(program, path, cached, stats))
    return result
