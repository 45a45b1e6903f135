"""Code generation: stage plans (IR) + templates -> C source. Knows no ruleset syntax."""

from bpfilter.codegen.program import Attach, GeneratedProgram, generate_programs

__all__ = ["Attach", "GeneratedProgram", "generate_programs"]
