"""State-dict key renaming driven by tables.

A converter is data: a sequence of ``(source, target)`` pattern pairs, read by one generic engine
(:class:`KeyConverter`). Model files declare their tables next to the model; loading code applies them.

Pattern rules (kept deliberately small):

- A pattern is a dotted key prefix such as ``"model.layers"``. It matches a key that equals it or continues
  it after a dot, so ``"model.norm"`` matches ``"model.norm.weight"`` but not ``"model.normalizer.weight"``.
  What follows the matched prefix is carried over unchanged.
- ``{}`` stands for a run of characters without a dot (usually one whole segment, e.g. a block index). The
  texts it matched fill the target's ``{}`` in order, so both sides need the same number of ``{}``.
- An empty target drops the prefix (``("diffusion_model", "")``); an empty source adds the target in front of
  every key (``("", "transformer")``).
- The first rule that matches a key wins; a key that no rule matches passes through unchanged.

``reverse()`` swaps the two sides of every rule. That is the inverse conversion whenever the table is
one-to-one on the keys it sees (no two rules send different keys to the same name); a round-trip test over a
real key list is the way to check a table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from diffusmith.errors import DiffusmithError

__all__ = ["KeyConverter"]

V = TypeVar("V")

_WILDCARD = "{}"


@dataclass(frozen=True)
class _Rule:
    source: str
    target: str
    regex: re.Pattern[str] | None  # None for the empty source, which matches every key


def _check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str):
        raise TypeError(f"key pattern must be a string, got {pattern!r}")
    if pattern and (pattern.startswith(".") or pattern.endswith(".") or ".." in pattern):
        raise ValueError(f"key pattern {pattern!r} must be dotted segments without leading/trailing/double dots")


def _compile_rule(source: str, target: str) -> _Rule:
    _check_pattern(source)
    _check_pattern(target)
    if source.count(_WILDCARD) != target.count(_WILDCARD):
        raise ValueError(f"rule ({source!r}, {target!r}): both sides need the same number of '{{}}' wildcards")
    if not source:
        if _WILDCARD in target:
            raise ValueError(f"rule ({source!r}, {target!r}): an empty source cannot fill wildcards")
        return _Rule(source, target, None)
    body = "([^.]+)".join(re.escape(part) for part in source.split(_WILDCARD))
    # The prefix must end on a segment boundary: at the end of the key or right before a dot.
    return _Rule(source, target, re.compile(f"^{body}(?=\\.|$)"))


def _fill(target: str, values: Sequence[str]) -> str:
    parts = target.split(_WILDCARD)
    out = [parts[0]]
    for value, part in zip(values, parts[1:], strict=False):
        out.append(value)
        out.append(part)
    return "".join(out)


class KeyConverter:
    """Renames state-dict keys with an ordered table of ``(source, target)`` patterns (see module docs)."""

    def __init__(self, rules: Iterable[tuple[str, str]]):
        self.rules: tuple[tuple[str, str], ...] = tuple((source, target) for source, target in rules)
        self._compiled = [_compile_rule(source, target) for source, target in self.rules]

    def __repr__(self) -> str:
        return f"KeyConverter({list(self.rules)!r})"

    def convert_key(self, key: str) -> str:
        """The new name of one key (unchanged when no rule matches)."""
        for rule in self._compiled:
            if rule.regex is None:
                head, rest = rule.target, "." + key
            else:
                match = rule.regex.match(key)
                if match is None:
                    continue
                head, rest = _fill(rule.target, match.groups()), key[match.end():]
            # `rest` is "" or starts with ".": join it to the head, or drop its dot when the head is empty.
            return head + rest if head else rest[1:]
        return key

    def convert(self, state_dict: Mapping[str, V]) -> dict[str, V]:
        """A new dict with every key renamed; values are passed through untouched (no copies)."""
        out: dict[str, V] = {}
        origin: dict[str, str] = {}
        for key, value in state_dict.items():
            new_key = self.convert_key(key)
            if new_key in out:
                raise DiffusmithError(
                    f"keys {origin[new_key]!r} and {key!r} both become {new_key!r}: the checkpoint mixes two key "
                    "layouts; keep only one of them"
                )
            out[new_key] = value
            origin[new_key] = key
        return out

    def reverse(self) -> KeyConverter:
        """The converter that undoes this one (exact when the table is one-to-one, see module docs)."""
        return KeyConverter((target, source) for source, target in self.rules)
