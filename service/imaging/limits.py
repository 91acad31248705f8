"""What one request may cost to decode, checked from headers before pixels are allocated.

A file's header declares its frames, their size and their pixel mode; all of it is checked
here before any decoder runs: frames per file and per request, pixels per frame, and decoded
bytes per frame and per request (all files and frames together). The request's deadline is
checked between frames, so a slow file cannot outlive the request it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic

from service.errors import DeadlineExceeded, PayloadTooLarge, UnsupportedMedia

MB = 1024 * 1024

# Bytes per pixel as decoded, by Pillow mode (16-bit channels count two bytes). Modes not
# listed count four, the most any of them takes.
_MODE_BYTES = {
    "1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
    "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2,
    "I;16N": 2, "I;16S": 2,
}
RGB_BYTES = 3  # every frame becomes 8-bit RGB, whatever it was decoded as


def frame_bytes(width: int, height: int, bytes_per_pixel: int) -> int:
    """Decoded bytes of one frame: the larger of its own pixels and the RGB frame it becomes."""
    return width * height * max(bytes_per_pixel, RGB_BYTES)


def mode_bytes(mode: str) -> int:
    return _MODE_BYTES.get(mode, 4)


def megabytes(nbytes: float) -> str:
    return f"{nbytes / MB:.1f} MB"


@dataclass
class ByteBudget:
    """Decoded bytes a request may still spend, shared by all of its files and frames."""

    limit: int
    spent: int = 0

    def spend(self, nbytes: int, label: str) -> None:
        if self.spent + nbytes > self.limit:
            raise PayloadTooLarge(
                f"{label} decodes to {megabytes(nbytes)}, which with the {megabytes(self.spent)} "
                f"this request's earlier frames decode to is over its limit of "
                f"{megabytes(self.limit)} decoded per request; send fewer or smaller images"
            )
        self.spent += nbytes


@dataclass(frozen=True)
class DecodeLimits:
    """The bounds one file is decoded under. Only the first two are required, so a caller
    (or a test) that does not care about the others gets no limit from them."""

    max_pixels: int  # per frame
    max_frames: int  # per file
    images_left: int | None = None  # what the request's image budget still allows
    max_frame_bytes: int | None = None  # decoded bytes per frame (see frame_bytes)
    request_bytes: ByteBudget | None = None  # decoded bytes the request may still spend
    deadline: float | None = None  # the request's time.monotonic() deadline
    allow_truncated: bool = False  # decode files whose data ends early (the rest padded)
    # (longer side, each side) the caller needs at least: a JPEG is then decoded at the
    # smallest of 1/8, 1/4, 1/2 of its size that still has them. None: full size.
    reduce_to: tuple[int, int] | None = None

    @property
    def frames_cap(self) -> int:
        """Counting a file's frames can stop one past this: the file is refused either way.
        (Not at the request's images left, which may be fewer: counting on to the per-file
        limit gives the exact count, or the per-file refusal, in the message.)"""
        return self.max_frames

    def check_frames(self, n_frames: int, label: str, at_least: bool = False) -> None:
        """Refuse a file by its frame count, before decoding any frame. ``at_least``: the count
        stopped at the limit, the file may have more."""
        count = f"at least {n_frames}" if at_least else str(n_frames)
        if n_frames > self.max_frames:
            raise PayloadTooLarge(
                f"{label} has {count} frames; at most {self.max_frames} are accepted per file"
            )
        if self.images_left is not None and n_frames > self.images_left:
            raise PayloadTooLarge(
                f"{label} has {count} frames, more than the {self.images_left} images "
                "(frames included) this request may still carry; split it"
            )

    def check_pixels(self, width: int, height: int, label: str) -> None:
        """Refuse a frame by its declared size, before its pixels are allocated."""
        if width * height > self.max_pixels:
            raise PayloadTooLarge(
                f"{label} is {width}x{height} = {width * height} pixels; "
                f"at most {self.max_pixels} are accepted per frame"
            )
        if width <= 0 or height <= 0:
            raise UnsupportedMedia(f"{label} has no pixels")

    def check_bytes(self, width: int, height: int, bytes_per_pixel: int, label: str) -> None:
        """Refuse a frame by the bytes it decodes to, and charge them to the request."""
        nbytes = frame_bytes(width, height, bytes_per_pixel)
        if self.max_frame_bytes is not None and nbytes > self.max_frame_bytes:
            as_rgb = " (as the 8-bit RGB frame it becomes)" if bytes_per_pixel < RGB_BYTES else ""
            raise PayloadTooLarge(
                f"{label} is {width}x{height} at {max(bytes_per_pixel, RGB_BYTES)} bytes per pixel: "
                f"{megabytes(nbytes)} decoded{as_rgb}, over the limit of "
                f"{megabytes(self.max_frame_bytes)} per frame; send a smaller image"
            )
        if self.request_bytes is not None:
            self.request_bytes.spend(nbytes, label)

    def check_deadline(self, label: str) -> None:
        if self.deadline is not None and monotonic() > self.deadline:
            raise DeadlineExceeded(
                f"the request's deadline passed while decoding {label}; "
                "raise X-Request-Timeout or send fewer frames"
            )


def reduction(width: int, height: int, reduce_to: tuple[int, int] | None) -> int:
    """The largest of 8, 4, 2 (else 1) that ``width`` x ``height`` can be divided by and still
    have ``reduce_to`` = (longer side, each side), as far as the full size has them."""
    if reduce_to is None:
        return 1
    keep_longer, keep_each = reduce_to
    for scale in (8, 4, 2):
        w, h = -(-width // scale), -(-height // scale)
        if (max(w, h) >= min(max(width, height), keep_longer)
                and w >= min(width, keep_each) and h >= min(height, keep_each)):
            return scale
    return 1


def shrunk_size(width: int, height: int, reduce_to: tuple[int, int] | None) -> tuple[int, int]:
    """The smallest size with ``reduce_to`` (see :func:`reduction`), aspect kept, never larger."""
    if reduce_to is None:
        return width, height
    keep_longer, keep_each = reduce_to
    scale = max(keep_longer / max(width, height), keep_each / width, keep_each / height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))
