"""Compiler passes: pure functions over the IR (they return new values, never mutate)."""

from bpfilter.passes.stages import Stage, plan_stages
from bpfilter.passes.validate import validate

__all__ = ["Stage", "plan_stages", "validate"]
