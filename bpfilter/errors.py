"""Errors a user sees: where (file:line:column), which token, why, and what works instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class InputError(Exception):
    """Bad or unsupported input. The CLI prints it and exits with status 2."""

    file: str
    line: int
    token: str
    why: str
    supported: Optional[str] = None
    column: int = 0

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "")
        text = f"{where}: {self.token}: {self.why}"
        if self.supported:
            text += f" (supported: {self.supported})"
        return text


class BuildError(Exception):
    """clang or the verifier refused generated code: a bpfilter bug, not a user error."""


class KernelError(Exception):
    """A kernel operation failed; the message names the operation and errno."""
