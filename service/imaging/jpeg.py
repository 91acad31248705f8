"""Whether a JPEG's scan data can hold the picture its header declares.

libjpeg fills in whatever a scan lacks when it meets a marker early (say a small picture
whose frame header was edited to 7000x7000, or a cut-off file with an end marker added),
and Pillow does not report it. Every 8x8 block of a Huffman-coded scan costs at least one
code from each of its tables, so the shortest code lengths in the file's own tables give a
lower bound on each scan's size; a scan shorter than that bound is certainly truncated. The
bound never refuses a complete file. Arithmetic-coded and hierarchical files, whose scans
have no such bound, are not judged here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

_SEQUENTIAL = {0xC0, 0xC1}
_PROGRESSIVE = 0xC2
_LOSSLESS = 0xC3
_UNJUDGED = {0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # hierarchical, arithmetic
# A marker ends a scan's entropy-coded data, except stuffed 0xFF00 and the restart markers.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# Real files have tens of segments; past this many the walk (Python, per segment) stops and
# leaves the file to Pillow, whose reduced decoding and the byte limits still bound it.
_MAX_SEGMENTS = 10_000


@dataclass(frozen=True)
class _Component:
    ident: int
    h: int
    v: int


@dataclass(frozen=True)
class Shortfall:
    scan: int  # 0-based index of the first scan found too short
    have: int  # bytes of entropy-coded data in it
    need: int  # the fewest bytes that scan can take for the declared size


def scan_shortfall(data: bytes) -> Shortfall | None:
    """The first scan of the first picture too short for the declared size, or None (also
    for bytes this parser cannot follow: Pillow then judges them)."""
    try:
        return _walk(data)
    except (IndexError, struct.error, ZeroDivisionError):
        return None


def _walk(data: bytes) -> Shortfall | None:
    if data[:2] != b"\xff\xd8":
        return None
    shortest: dict[tuple[int, int], int] = {}  # (class 0=DC 1=AC, table id) -> shortest code
    kind: int | None = None
    width = height = 0
    components: dict[int, _Component] = {}
    scans = 0
    pos = 2
    for _ in range(_MAX_SEGMENTS):
        if pos + 4 > len(data):
            break
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = data[pos + 4: pos + 2 + length]
        pos += 2 + length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            kind = marker
            height, width = struct.unpack_from(">HH", body, 1)
            components = {
                body[6 + 3 * i]: _Component(body[6 + 3 * i], body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15)
                for i in range(body[5])
            }
        elif marker == 0xC4:
            _read_tables(body, shortest)
        elif marker == 0xDA:
            end = _SCAN_END.search(data, pos)
            stop = end.start() if end else len(data)
            if kind is None or kind in _UNJUDGED or height == 0:
                return None
            need = _fewest_bits(kind, body, components, shortest, width, height)
            have = stop - pos
            if have * 8 < need:
                return Shortfall(scans, have, -(-need // 8))
            scans += 1
            pos = stop
    return None


def _read_tables(body: bytes, shortest: dict[tuple[int, int], int]) -> None:
    at = 0
    while at + 17 <= len(body):
        table_class, table_id = body[at] >> 4, body[at] & 15
        counts = body[at + 1: at + 17]
        shortest[(table_class, table_id)] = next((n + 1 for n, c in enumerate(counts) if c), 16)
        at += 17 + sum(counts)


def _fewest_bits(
    kind: int, scan: bytes, components: dict[int, _Component],
    shortest: dict[tuple[int, int], int], width: int, height: int,
) -> int:
    count = scan[0]
    start, _, approx = scan[1 + 2 * count], scan[2 + 2 * count], scan[3 + 2 * count]
    h_max = max(c.h for c in components.values())
    v_max = max(c.v for c in components.values())
    bits = 0
    for i in range(count):
        ident, tables = scan[1 + 2 * i], scan[2 + 2 * i]
        part = components[ident]
        # A missing table is one libjpeg substitutes: its codes are at least one bit long.
        dc = shortest.get((0, tables >> 4), 1)
        ac = shortest.get((1, tables & 15), 1)
        cols = -(-width * part.h // h_max)
        rows = -(-height * part.v // v_max)
        blocks = -(-cols // 8) * -(-rows // 8)
        if kind in _SEQUENTIAL:
            bits += blocks * (dc + ac)  # a DC code and at least one AC code (maybe end-of-block)
        elif kind == _PROGRESSIVE and start == 0 and approx >> 4 == 0:
            bits += blocks * dc  # a first DC scan codes every block; later scans may skip runs
        elif kind == _LOSSLESS:
            bits += cols * rows * dc  # one code per sample
    return bits


BASELINE = 0xC0


def frame_marker(data: bytes) -> int | None:
    """The marker of the first picture's frame header (0xC0 baseline, 0xC2 progressive, ...),
    or None when the segments up to it cannot be followed."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    try:
        for _ in range(_MAX_SEGMENTS):
            if pos + 4 > len(data) or data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte before a marker
                pos += 1
                continue
            if marker in (0xD9, 0xDA):  # the image ended, or a scan began, before any frame
                return None
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return marker
            (length,) = struct.unpack_from(">H", data, pos + 2)
            pos += 2 + length
    except struct.error:
        return None
    return None
