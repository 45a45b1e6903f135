"""Code generation: stage plans (IR) + templates -> C source. Knows no ruleset syntax."""

from bpfilter.codegen.program import GeneratedProgram, generate_stage

__all__ = ["GeneratedProgram", "generate_stage"]
