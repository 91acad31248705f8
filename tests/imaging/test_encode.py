"""PNG files, overlays and heatmaps as the service encodes them."""

from __future__ import annotations

import base64
import io
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from service.imaging import encode
from service.imaging.colormaps import COLORMAPS, apply_colormap, lookup_table, to_indices

CAT = Path(__file__).resolve().parent.parent / "data" / "chelsea.png"


def decoded(png: bytes) -> tuple[Image.Image, np.ndarray]:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image, np.asarray(image)


def smooth_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A CAM-like map: a few blobs, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    total = np.zeros((height, width), np.float32)
    for _ in range(3):
        cy, cx, spread = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, 40)
        total += np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * spread**2)).astype(np.float32)
    return (total - total.min()) / (total.max() - total.min())


def reference_overlay(image: Image.Image, mask: np.ndarray, colormap: str, alpha: float) -> np.ndarray:
    """The blend written out plainly, in float32."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    colour = lookup_table(colormap)[np.clip(np.rint(mask * 255.0), 0, 255).astype(np.uint8)]
    blended = (1.0 - alpha) * base + alpha * colour.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("level", [0, 1, 3, 9])
def test_png_decodes_to_the_same_pixels(channels: int | None, level: int) -> None:
    rng = np.random.default_rng(level)
    shape = (37, 53) if channels is None else (37, 53, channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    image, back = decoded(encode.png_bytes(pixels, level))
    assert image.format == "PNG" and image.size == (53, 37)
    assert np.array_equal(back.reshape(pixels.shape), pixels)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 9, 4), (9, 1, 3), (2, 2)])
def test_png_of_tiny_images(shape: tuple[int, ...]) -> None:
    pixels = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    _, back = decoded(encode.png_bytes(pixels, 3))
    assert np.array_equal(back.reshape(shape), pixels)


def test_png_file_structure_is_valid() -> None:
    """Signature, IHDR/IDAT/IEND with correct lengths and CRCs, 8-bit RGB, no interlace."""
    png = encode.png_bytes(np.zeros((4, 5, 3), np.uint8), 1)
    assert png.startswith(encode.PNG_SIGNATURE)
    at, kinds = len(encode.PNG_SIGNATURE), []
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        kind, data = png[at + 4:at + 8], png[at + 8:at + 8 + length]
        crc = int.from_bytes(png[at + 8 + length:at + 12 + length], "big")
        assert zlib.crc32(kind + data) == crc
        kinds.append(kind)
        if kind == b"IHDR":
            assert data == (5).to_bytes(4, "big") + (4).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
        at += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_png_of_an_array_it_does_not_write_itself_goes_through_pillow() -> None:
    pixels = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    image, back = decoded(encode.png_bytes(pixels, 1))
    assert image.mode.startswith("I") and np.array_equal(back, pixels)


def test_png_base64_is_the_png_file() -> None:
    pixels = np.full((3, 3, 3), 7, np.uint8)
    assert base64.b64decode(encode.png_base64(pixels)) == encode.png_bytes(pixels)


def test_photo_overlay_png_is_no_larger_than_pillows() -> None:
    image = Image.open(CAT).convert("RGB")
    blended = encode.overlay(image, smooth_map(image.height, image.width), "jet", 0.5)
    ours = encode.png_bytes(blended, 3)
    theirs = io.BytesIO()
    Image.fromarray(blended).save(theirs, format="PNG", compress_level=3)
    assert len(ours) <= len(theirs.getvalue()) * 1.05
    assert np.array_equal(decoded(ours)[1], blended)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("colormap", ["jet", "viridis", "gray"])
def test_overlay_equals_the_float_blend(alpha: float, colormap: str) -> None:
    image = Image.open(CAT).convert("RGB")
    mask = smooth_map(image.height, image.width, seed=int(alpha * 10))
    assert np.array_equal(encode.overlay(image, mask, colormap, alpha),
                          reference_overlay(image, mask, colormap, alpha))


def test_overlay_converts_other_modes_to_rgb() -> None:
    grey = Image.fromarray(np.full((6, 8), 100, np.uint8), mode="L")
    out = encode.overlay(grey, np.zeros((6, 8), np.float32), "gray", 0.5)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8 and (out == 50).all()


def test_overlay_refuses_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match="does not match"):
        encode.overlay(Image.new("RGB", (8, 6)), np.zeros((5, 8), np.float32), "jet", 0.5)


def test_colormap_indices_round_and_clip() -> None:
    mask = np.array([[-0.5, 0.0, 0.5 / 255, 0.25, 1.0, 2.0]], np.float32)
    assert to_indices(mask).tolist() == [[0, 0, 0, 64, 255, 255]]
    for name in COLORMAPS:
        assert np.array_equal(apply_colormap(mask, name), lookup_table(name)[to_indices(mask)])


def test_heatmap_alpha_is_the_map() -> None:
    mask = smooth_map(20, 30)
    rgba = encode.heatmap_rgba(mask, "turbo")
    assert rgba.shape == (20, 30, 4) and rgba.dtype == np.uint8
    assert np.array_equal(rgba[..., 3], np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8))
    assert np.array_equal(rgba[..., :3], apply_colormap(mask, "turbo"))


def test_mask_as_json_lists_round_trips_float32_exactly() -> None:
    """orjson writes float32 values with the shortest decimal that reads back as the same float32."""
    mask = smooth_map(224, 224)
    parsed = orjson.loads(orjson.dumps({"data": mask}, option=orjson.OPT_SERIALIZE_NUMPY))["data"]
    assert np.array_equal(np.asarray(parsed, dtype=np.float32), mask)


def test_mask_base64_round_trips() -> None:
    mask = smooth_map(7, 9)
    assert np.array_equal(encode.mask_from_base64(encode.mask_to_base64(mask), mask.shape), mask)


@pytest.mark.parametrize("level", [1, 5, 9])
def test_png_without_isal_falls_back_to_zlib(monkeypatch: pytest.MonkeyPatch, level: int) -> None:
    pixels = np.random.default_rng(level).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    assert encode._fast_deflate is not None, "isal, a dependency, is not installed"
    with_isal = encode.png_bytes(pixels, level)
    monkeypatch.setattr(encode, "_fast_deflate", None)
    with_zlib = encode.png_bytes(pixels, level)
    assert with_zlib != with_isal  # another deflate wrote it ...
    assert np.array_equal(decoded(with_zlib)[1], pixels)  # ... and it decodes to the same pixels
