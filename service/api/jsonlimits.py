"""Parsing client JSON within limits: bounded nesting depth, finite numbers only.

Python's ``json`` recurses once per nesting level (100,000 levels end in ``RecursionError``)
and accepts ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON and turn into floats that
overflow or poison a computation further on. :func:`loads_bounded` measures the depth first, in
one linear pass that skips string contents, and refuses the non-finite constants while parsing.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # method_params needs 2 levels ({"method": {"param": value}}); generous margin


class JsonRefused(ValueError):
    """The text is JSON the service will not take: too deep, or with a non-finite number."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in ``text``, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number; numbers must be finite")


def loads_bounded(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises :class:`JsonRefused` for nesting deeper than ``max_depth`` or
    a non-finite number, and ``ValueError`` for text that is not JSON."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonRefused(f"nested {depth} levels deep; at most {max_depth} are accepted")
    # Numbers too large for a float (1e999) parse to inf without reaching parse_constant.
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise JsonRefused(f"{literal} is too large for a float; numbers must be finite")
    return value
