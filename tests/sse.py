"""Server-sent events as the tests read them: (event, data) pairs from a streamed response."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each ``data:`` line with the ``event:`` named before it, its JSON decoded."""
    name = "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: "):])
