"""Decoding every supported format to 8-bit RGB frames, under the limits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMedia
from service.imaging.decode import DecodeLimits, decode_image, window_to_uint8
from tests.imaging import samples

LIMITS = DecodeLimits(max_pixels=50_000_000, max_frames=64)


def only_frame(data: bytes) -> np.ndarray:
    frames = decode_image(data, LIMITS, "x")
    assert len(frames) == 1
    assert frames[0].frame == 0
    assert frames[0].image.mode == "RGB"
    return np.asarray(frames[0].image)


def corners(pixels: np.ndarray) -> list[tuple[int, ...]]:
    """Colours a few pixels in from each corner: TL, TR, BL, BR."""
    return [tuple(int(v) for v in pixels[y, x]) for y, x in ((3, 3), (3, -4), (-4, 3), (-4, -4))]


def close(actual: list[tuple[int, ...]], expected: list[tuple[int, ...]], tolerance: int) -> bool:
    return bool(np.all(np.abs(np.array(actual) - np.array(expected)) <= tolerance))


COLOUR_KINDS = ["png-rgb", "png-rgb16", "png-rgba", "png-palette", "jpeg", "jpeg-cmyk", "tiff-rgb",
                "tiff-lzw", "bmp", "bmp-palette", "webp", "webp-lossy", "gif"]


@pytest.mark.parametrize("kind", COLOUR_KINDS)
def test_colour_formats_keep_their_colours(kind: str) -> None:
    pixels = only_frame(samples.still(kind))
    assert pixels.shape == (samples.HEIGHT, samples.WIDTH, 3)
    assert close(corners(pixels), list(samples.QUADRANTS), tolerance=8), corners(pixels)


@pytest.mark.parametrize("kind", ["png-grey", "jpeg-grey", "png-grey-alpha", "png-bilevel"])
def test_greyscale_is_replicated_to_three_equal_channels(kind: str) -> None:
    pixels = only_frame(samples.still(kind))
    assert pixels.shape == (samples.HEIGHT, samples.WIDTH, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


@pytest.mark.parametrize("kind", ["png-grey16", "tiff-grey16", "tiff-float"])
def test_high_bit_depth_is_windowed_over_its_full_range(kind: str) -> None:
    pixels = only_frame(samples.still(kind))
    # The ramp's lowest value becomes 0 and its highest 255, linearly in between.
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, -1].tolist() == [255, 255, 255]
    expected = np.linspace(0, 255, samples.WIDTH)
    assert np.abs(pixels[0, :, 0].astype(float) - expected).max() <= 1.0
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_transparent_pixels_are_shown_on_white() -> None:
    picture = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    pixels = only_frame(samples.save(picture, "PNG"))
    assert pixels[4, 4].tolist() == [255, 255, 255]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_exif_orientation_is_applied(orientation: int) -> None:
    pixels = only_frame(samples.jpeg_with_orientation(orientation))
    assert pixels.shape == (samples.HEIGHT, samples.WIDTH, 3)
    assert close(corners(pixels), list(samples.QUADRANTS), tolerance=8), corners(pixels)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_every_frame_in_order(fmt: str) -> None:
    frames = decode_image(samples.animated(fmt, 3), LIMITS)
    assert [f.frame for f in frames] == [0, 1, 2]
    expected = [img.getpixel((5, 5)) for img in samples.frames_rgb(3)]
    assert [f.image.getpixel((5, 5)) for f in frames] == expected


def test_multipage_tiff_gives_every_page_with_its_own_mode() -> None:
    pages = [Image.fromarray(samples.ramp16()), samples.rgb(), samples.rgb().convert("L")]
    data = samples.multipage_tiff(pages)
    frames = decode_image(data, LIMITS)
    assert [f.frame for f in frames] == [0, 1, 2]
    assert [f.source_mode for f in frames] == ["I;16", "RGB", "L"]
    assert all(f.image.mode == "RGB" for f in frames)


def test_type_comes_from_the_bytes_not_the_name() -> None:
    pixels = only_frame(samples.still("png-rgb"))
    named_as_jpeg = decode_image(samples.still("png-rgb"), LIMITS, "photo.jpg")
    assert np.array_equal(np.asarray(named_as_jpeg[0].image), pixels)


def test_an_empty_file_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="empty"):
        decode_image(b"", LIMITS, "nothing.png")


@pytest.mark.parametrize("data", [
    b"hello, this is text",
    b"%PDF-1.7\n1 0 obj",
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS: never handed to Ghostscript
    samples.still("png-rgb")[:60],  # truncated
    samples.still("jpeg")[:200],
    samples.still("tiff-rgb")[:100],
    samples.save(Image.new("RGB", (4, 4)), "ICO"),  # a real image, not a supported format
])
def test_undecodable_bytes_are_unsupported_media(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia):
        decode_image(data, LIMITS, "f")


def test_too_many_frames_are_refused_from_the_header() -> None:
    with pytest.raises(PayloadTooLarge, match="at most 4"):
        decode_image(samples.animated("GIF", 5, 4, 4), DecodeLimits(10_000, max_frames=4))


def test_the_request_image_budget_bounds_frames_too() -> None:
    with pytest.raises(PayloadTooLarge, match="this request may still carry"):
        decode_image(samples.animated("GIF", 5, 4, 4), DecodeLimits(10_000, 64, images_left=3))


@pytest.mark.parametrize("data", [
    samples.png_header_only(100_000, 100_000),
    samples.gif_header_only(65_535, 65_535),
])
def test_declared_sizes_over_the_limit_are_refused(data: bytes) -> None:
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(data, LIMITS)


def test_a_decompression_bomb_is_refused() -> None:
    bomb = samples.png_bomb(4000, 2000)  # 8 MB of pixels in a few kB
    assert len(bomb) < 50_000
    with pytest.raises(PayloadTooLarge):
        decode_image(bomb, DecodeLimits(max_pixels=1_000_000, max_frames=1))


def test_the_size_is_refused_before_any_pixel_is_decoded() -> None:
    # This file's pixel data is far too short for its header: decoding it would fail as
    # truncated (415). A 413 shows the refusal came from the header alone.
    small_limit = DecodeLimits(max_pixels=100, max_frames=1)
    with pytest.raises(PayloadTooLarge):
        decode_image(samples.png_header_only(20, 20), small_limit)
    with pytest.raises(UnsupportedMedia):
        decode_image(samples.png_header_only(20, 20), LIMITS)


def test_window_maps_the_given_range_and_a_flat_image_to_black() -> None:
    values = np.array([[0, 50, 100, 150]])
    assert window_to_uint8(values, 50, 100).tolist() == [[0, 0, 255, 255]]
    assert window_to_uint8(np.full((2, 2), 7)).tolist() == [[0, 0], [0, 0]]
