"""The words of an nft statement, as the grammar gives them: a word or string with its
position, and an anonymous set of elements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from bpfilter.errors import InputError


@dataclass(frozen=True)
class Word:
    value: str
    line: int
    column: int
    quoted: bool = False


@dataclass(frozen=True)
class SetLiteral:
    """`{ a, b . c, d : accept }`: each element is the words between commas."""

    elements: tuple[tuple[Union[Word, "SetLiteral"], ...], ...]
    word: Word  # the opening brace


Item = Union[Word, SetLiteral]


def word_of(item: Item) -> Word:
    """Where an item is: a set by its opening brace."""
    return item.word if isinstance(item, SetLiteral) else item


def error_at(source: str, item: Item, why: str,
             supported: Optional[str] = None) -> InputError:
    word = word_of(item)
    return InputError(source, word.line, word.value, why, supported, word.column)
