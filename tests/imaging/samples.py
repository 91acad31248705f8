"""Small image files of every supported kind, built in memory with Pillow and numpy.

Pictures have four differently coloured quadrants so that orientation, frame order and
windowing can be checked from the decoded pixels, not just from the size.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 48, 32
QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))  # TL, TR, BL, BR


def quadrants(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """(H, W, 3) uint8: red, green / blue, yellow."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    h, w = height // 2, width // 2
    pixels[:h, :w], pixels[:h, w:] = QUADRANTS[0], QUADRANTS[1]
    pixels[h:, :w], pixels[h:, w:] = QUADRANTS[2], QUADRANTS[3]
    return pixels


def ramp16(width: int = WIDTH, height: int = HEIGHT, low: int = 1000, high: int = 41000) -> np.ndarray:
    """(H, W) uint16 horizontal ramp from ``low`` to ``high``: a 16-bit greyscale picture."""
    row = np.linspace(low, high, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb() -> Image.Image:
    return Image.fromarray(quadrants())


def jpeg_with_orientation(orientation: int) -> bytes:
    """A JPEG whose stored pixels need EXIF ``orientation`` applied to look like ``quadrants()``."""
    upright = rgb()
    # Store the inverse transform, so applying the tag gives the upright picture back.
    inverse = {
        1: None,
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,  # tag 6 says: rotate 90 clockwise to display
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright.transpose(inverse) if inverse is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(stored, "JPEG", quality=95, exif=exif.tobytes())


def png16_grey(pixels: np.ndarray | None = None) -> bytes:
    return save(Image.fromarray(ramp16() if pixels is None else pixels), "PNG")


def png16_rgb(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one: written chunk by chunk)."""
    pixels = quadrants(width, height).astype(">u2") * 257
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels.reshape(height, width * 3))
    return png_chunks([
        (b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)),
        (b"IDAT", zlib.compress(raw)),
        (b"IEND", b""),
    ])


def png_chunks(chunks: Sequence[tuple[bytes, bytes]]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
    return b"".join(out)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of zeros: tiny on the wire, ``width*height`` bytes decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_chunks([
        (b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
        (b"IDAT", body),
        (b"IEND", b""),
    ])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size and has (almost) no pixel data."""
    return png_chunks([
        (b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
        (b"IDAT", zlib.compress(b"\x00")),
        (b"IEND", b""),
    ])


def gif_header_only(width: int, height: int) -> bytes:
    """A GIF whose logical screen and single frame declare ``width`` x ``height``."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 3 + b"\xff" * 3
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return header + frame + b"\x3b"


def frames_rgb(count: int, width: int = WIDTH, height: int = HEIGHT) -> list[Image.Image]:
    """Frames of one flat colour each, distinct and in a known order."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    return [Image.new("RGB", (width, height), colours[i % len(colours)]) for i in range(count)]


def animated(fmt: str, count: int, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    first, *rest = frames_rgb(count, width, height)
    options: dict[str, object] = {"save_all": True, "append_images": rest, "duration": 50}
    if fmt == "GIF":
        options["loop"] = 0
        options["disposal"] = 1
    if fmt == "WEBP":
        options["lossless"] = True
    return save(first, fmt, **options)


def multipage_tiff(pages: Sequence[Image.Image]) -> bytes:
    first, *rest = pages
    return save(first, "TIFF", save_all=True, append_images=list(rest))


def still(kind: str) -> bytes:
    """One still image of the named kind (the keys of STILL_KINDS)."""
    picture = rgb()
    if kind == "png-rgb":
        return save(picture, "PNG")
    if kind == "png-grey":
        return save(picture.convert("L"), "PNG")
    if kind == "png-grey16":
        return png16_grey()
    if kind == "png-rgb16":
        return png16_rgb()
    if kind == "png-rgba":
        return save(picture.convert("RGBA"), "PNG")
    if kind == "png-palette":
        return save(picture.quantize(8), "PNG")
    if kind == "png-palette-transparent":
        return save(picture.quantize(8), "PNG", transparency=0)
    if kind == "png-grey-alpha":
        return save(picture.convert("LA"), "PNG")
    if kind == "png-bilevel":
        return save(picture.convert("1"), "PNG")
    if kind == "jpeg":
        return save(picture, "JPEG", quality=95)
    if kind == "jpeg-grey":
        return save(picture.convert("L"), "JPEG", quality=95)
    if kind == "jpeg-cmyk":
        return save(picture.convert("CMYK"), "JPEG", quality=95)
    if kind == "tiff-rgb":
        return save(picture, "TIFF")
    if kind == "tiff-grey16":
        return save(Image.fromarray(ramp16()), "TIFF")
    if kind == "tiff-float":
        return save(Image.fromarray(ramp16().astype(np.float32) / 7.0), "TIFF")
    if kind == "tiff-lzw":
        return save(picture, "TIFF", compression="tiff_lzw")
    if kind == "bmp":
        return save(picture, "BMP")
    if kind == "bmp-palette":
        return save(picture.quantize(8), "BMP")
    if kind == "webp":
        return save(picture, "WEBP", lossless=True)
    if kind == "webp-lossy":
        return save(picture, "WEBP", quality=90)
    if kind == "gif":
        return save(picture, "GIF")
    raise KeyError(kind)


STILL_KINDS = (
    "png-rgb", "png-grey", "png-grey16", "png-rgb16", "png-rgba", "png-palette",
    "png-palette-transparent", "png-grey-alpha", "png-bilevel", "jpeg", "jpeg-grey", "jpeg-cmyk",
    "tiff-rgb", "tiff-grey16", "tiff-float", "tiff-lzw", "bmp", "bmp-palette", "webp", "webp-lossy",
    "gif",
)


def tiff_pages(count: int) -> bytes:
    """A little-endian TIFF of ``count`` one-pixel greyscale pages, written IFD by IFD (Pillow's
    own writer takes minutes for tens of thousands of pages). Every page's strip is the same
    single byte, right after the header, so the file is about 114 bytes a page."""
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (273, 4, 8), (277, 3, 1), (278, 3, 1), (279, 4, 1),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    first = 10  # 8-byte header, the pixel byte, a pad byte: IFDs start on a word boundary
    out = [b"II*\x00" + struct.pack("<I", first) + b"\x80\x00"]
    for page in range(count):
        following = first + (page + 1) * ifd_size if page + 1 < count else 0
        body = b"".join(
            struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                                                 else struct.pack("<I", value))
            for tag, kind, value in entries
        )
        out.append(struct.pack("<H", len(entries)) + body + struct.pack("<I", following))
    return b"".join(out)
