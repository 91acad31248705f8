"""Generated files that declare far more than they carry (issue 21): each small on the wire,
each hundreds of megabytes if decoded as declared."""

from __future__ import annotations

import struct
import zlib

from PIL import Image

from tests.imaging import samples

SIDE = 7000


def jpeg_declaring(width: int = SIDE, height: int = SIDE) -> bytes:
    """A 64x64 JPEG whose frame header was edited to say ``width`` x ``height``: complete in
    structure (every marker, an end marker), its scan far too short for the size."""
    data = bytearray(samples.save(Image.new("RGB", (64, 64), (100, 150, 200)), "JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def jpeg_cut(width: int, height: int, keep: float = 0.5, **options: object) -> bytes:
    """A real encode of a flat picture, cut to ``keep`` of its length with an end marker added,
    as a proxy or a broken upload leaves it."""
    whole = samples.save(Image.new("RGB", (width, height), (90, 120, 30)), "JPEG", **options)
    return whole[: int(len(whole) * keep)] + b"\xff\xd9"


def gif_screen(side: int = SIDE) -> bytes:
    """A GIF whose logical screen is ``side`` x ``side`` and whose one frame is a single pixel."""
    header = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00" * 3 + b"\xff" * 3
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def png16(side: int = SIDE) -> bytes:
    """A valid 16-bit greyscale PNG of zeros, ``side`` x ``side``: about 95 kB for 7000."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side * 2 + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return samples.png_chunks([
        (b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)),
        (b"IDAT", body),
        (b"IEND", b""),
    ])


def gif_frames(count: int) -> bytes:
    """A GIF of ``count`` one-pixel frames (15 bytes each)."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00" * 3 + b"\xff" * 3
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame * count + b"\x3b"
