"""The `bpfilter` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.table import Table

from bpfilter import __version__
from bpfilter.errors import BuildError, InputError, KernelError

console = Console()
err_console = Console(stderr=True)

EXIT_INPUT = 2  # bad or unsupported input, as iptables-restore uses
EXIT_FAILURE = 1


def _read_rules(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(path).read_text(), path
    except OSError as exc:
        err_console.print(f"[red]bpfilter: cannot read {path}: {exc.strerror}[/]")
        sys.exit(EXIT_INPUT)


def _show_input_error(error: InputError, text: Optional[str], label: str = "error") -> None:
    err_console.print(f"[bold red]bpfilter: {label}:[/] {error}", highlight=False,
                      markup=True)
    lines = text.splitlines() if text else []
    if 0 < error.line <= len(lines):
        line = lines[error.line - 1]
        err_console.print(f"  {error.line} | {line}", highlight=False, markup=False)
        column = error.column
        if column and not line[column - 1:].startswith(error.token):
            column = line.find(error.token) + 1  # the error names a token later in the rule
        if column:
            pad = " " * (len(str(error.line)) + 5 + column - 1)
            err_console.print(pad + "^" * max(1, len(error.token)), style="red",
                              highlight=False)


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
    """


@main.command("compile")
@click.argument("rules", metavar="RULES", type=str)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Where the .c and .o files go [default: build/<name of RULES>].")
@click.option("--emit", type=click.Choice(["c", "obj"]), default="obj", show_default=True,
              help="Stop after C generation (c), or build and verify objects (obj).")
@click.option("--ignore-unsupported", is_flag=True,
              help="Skip rules bpfilter cannot compile yet, listing each one, instead of "
                   "failing on the first.")
@click.option("--no-verify", is_flag=True,
              help="Do not load the objects into the kernel to verify them.")
def compile_cmd(rules: str, output: Optional[Path], emit: str, ignore_unsupported: bool,
                no_verify: bool) -> None:
    """Compile RULES (iptables-save text; '-' reads stdin) into BPF programs.

    Exits 2 on input it cannot compile, naming file, line, token and what works instead.
    """
    from bpfilter.compiler import compile_ruleset

    text, source = _read_rules(rules)
    if output is None:
        stem = "stdin" if rules == "-" else Path(rules).name.replace(".", "_")
        output = Path("build") / stem
    skipped: list[InputError] = []
    try:
        with console.status("compiling…"):
            result = compile_ruleset(
                text, source, output, emit=emit, verify=not no_verify,
                on_unsupported=skipped.append if ignore_unsupported else None)
    except InputError as exc:
        _show_input_error(exc, text)
        sys.exit(EXIT_INPUT)
    except (BuildError, KernelError) as exc:
        _fail(exc)
    for error in skipped:
        _show_input_error(error, text, label="skipped")
    _print_summary(result, output)


def _print_summary(result, output: Path) -> None:
    from bpfilter.passes.validate import COMPILED_TABLES

    compiled_rules = {(t.name, c.name): len(c.rules) for t in result.ruleset.tables
                      for c in t.chains}
    reached = {(s.stage.table, ref.chain.name): s.stage.hook.value
               for s in result.stages for ref in s.stage.chains}
    chains = Table(title=f"{result.parsed.source}: chains", title_justify="left")
    for col in ("table", "chain", "policy", "rules read", "rules compiled", "runs at"):
        chains.add_column(col, justify="right" if "rules" in col else "left")
    for table in result.parsed.tables:
        for chain in table.chains:
            if not chain.rules and table.name not in COMPILED_TABLES:
                continue
            chains.add_row(table.name, chain.name,
                           chain.policy.value if chain.policy else "-",
                           str(len(chain.rules)),
                           str(compiled_rules.get((table.name, chain.name), 0)),
                           reached.get((table.name, chain.name), "not reached"))
    console.print(chains)

    programs = Table(title="programs", title_justify="left")
    for col in ("stage", "attach", "program", "C lines", "verified", "insns", "jited"):
        programs.add_column(col, justify="left" if col in ("stage", "attach", "program")
                            else "right")
    for stage in result.stages:
        stats = stage.stats
        programs.add_row(
            stage.stage.hook.value, "XDP ingress", stage.program.name,
            str(stage.program.source.count("\n")),
            f"{stats.processed_insns:,}" if stats else "-",
            f"{stats.xlated_insns:,}" if stats else "-",
            f"{stats.jited_bytes:,} B" if stats else "-",
        )
    console.print(programs)
    console.print("[dim]verified: instructions the verifier processed; insns: program "
                  "size after verification[/]")
    cached = sum(1 for s in result.stages if s.cached)
    console.print(f"output: {output}/" + (f" ({cached} object(s) from cache)" if cached
                                          else ""))
    phases = "  ".join(f"{name} {seconds * 1000:.0f} ms"
                       for name, seconds in result.timings.items())
    console.print(f"[dim]time: {phases}[/]")
    if result.skipped:
        console.print(f"[yellow]{len(result.skipped)} rule(s) skipped: they are NOT "
                      "enforced.[/]")


if __name__ == "__main__":
    main()
