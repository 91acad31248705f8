"""Progress of a long command-line run: a tqdm bar on a terminal, plain lines elsewhere.

``python -m service.evaluate`` and ``python -m loadtests`` go through their methods one by one
for minutes; on a terminal a bar shows how far they are and what runs now; in a log (CI, a
pipe) one line per step says the same without control characters.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def tracked(
    items: Iterable[T], total: int, description: str, label: Callable[[T], str] = str,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """``items`` one by one, reporting each step (``label(item)``) on ``stream`` (stderr)."""
    out = stream or sys.stderr
    if out.isatty():
        from tqdm import tqdm

        with tqdm(items, total=total, desc=description, file=out, dynamic_ncols=True) as bar:
            for item in bar:
                bar.set_postfix_str(label(item), refresh=True)
                yield item
        return
    began = time.perf_counter()
    for number, item in enumerate(items, start=1):
        print(f"{description}: {number}/{total} {label(item)} ({time.perf_counter() - began:.0f} s so far)",
              file=out, flush=True)
        yield item
