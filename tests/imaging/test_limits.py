"""Decoding within a memory budget (issue 21): truncated data refused, decoded bytes bounded
per frame and per request from the headers, JPEGs decoded reduced, frames counted with a cap
and the deadline checked between them."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile, TiffImagePlugin

from service.errors import DeadlineExceeded, PayloadTooLarge, UnsupportedMedia
from service.imaging import limits as limits_module
from service.imaging.decode import decode_image, shrink, window_to_uint8
from service.imaging.jpeg import scan_shortfall
from service.imaging.limits import MB, ByteBudget, DecodeLimits, reduction
from tests.imaging import dicom_samples, hostile, samples

LIMITS = DecodeLimits(max_pixels=50_000_000, max_frames=64)
BUDGET = DecodeLimits(50_000_000, 64, max_frame_bytes=100 * MB)


# Truncated data -------------------------------------------------------------------------

def test_a_jpeg_whose_header_declares_7000x7000_over_a_tiny_scan_is_415() -> None:
    data = hostile.jpeg_declaring()
    assert len(data) < 1000
    with pytest.raises(UnsupportedMedia, match=r"truncated.*7000x7000 JPEG needs at least"):
        decode_image(data, LIMITS, "x.jpg")


@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"subsampling": 0}])
def test_a_cut_jpeg_with_an_end_marker_added_is_415(options: dict[str, object]) -> None:
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_image(hostile.jpeg_cut(3000, 2000, **options), LIMITS, "cut.jpg")


def test_a_cut_jpeg_without_an_end_marker_is_415_as_truncated() -> None:
    whole = samples.save(Image.new("RGB", (600, 400), (1, 2, 3)), "JPEG")
    with pytest.raises(UnsupportedMedia, match="is truncated"):
        decode_image(whole[: len(whole) // 2], LIMITS, "cut.jpg")


RNG = np.random.default_rng(21)
PICTURES = {
    "flat-rgb": Image.new("RGB", (2000, 1500), (10, 20, 30)),
    "noise-rgb": Image.fromarray(RNG.integers(0, 256, (300, 451, 3), dtype=np.uint8)),
    "flat-grey": Image.new("L", (1500, 900), 7),
    "flat-cmyk": Image.new("CMYK", (800, 800)),
}
ENCODINGS = [{"quality": 50}, {"quality": 95, "optimize": True}, {"progressive": True},
             {"quality": 10, "subsampling": 2}, {"quality": 90, "subsampling": 0}]


@pytest.mark.parametrize("picture", PICTURES)
@pytest.mark.parametrize("options", ENCODINGS, ids=lambda o: ",".join(map(str, o.items())))
def test_a_complete_jpeg_is_never_judged_truncated(picture: str, options: dict[str, object]) -> None:
    data = samples.save(PICTURES[picture], "JPEG", **options)
    assert scan_shortfall(data) is None
    assert decode_image(data, LIMITS)[0].width == PICTURES[picture].width


def test_truncated_files_decode_when_the_setting_allows_them() -> None:
    allowing = DecodeLimits(50_000_000, 64, allow_truncated=True, reduce_to=(1024, 224))
    (frame,) = decode_image(hostile.jpeg_declaring(), allowing)
    assert (frame.width, frame.height) == (7000, 7000)
    assert frame.image.size == (1750, 1750)  # decoded at a quarter scale: cheap even so
    (png,) = decode_image(samples.png_header_only(20, 20), allowing)
    assert png.image.size == (20, 20)
    with pytest.raises(UnsupportedMedia):
        decode_image(samples.png_header_only(20, 20), LIMITS)


def test_one_thread_allowing_truncated_files_does_not_allow_them_on_another() -> None:
    allowed_there = threading.Event()
    proceed = threading.Event()
    decoded: list[int] = []

    def allowing_thread() -> None:
        allowing = DecodeLimits(50_000_000, 64, allow_truncated=True)
        decoded.append(len(decode_image(samples.png_header_only(20, 20), allowing)))
        allowed_there.set()
        proceed.wait(10)
        decoded.append(len(decode_image(samples.png_header_only(20, 20), allowing)))

    thread = threading.Thread(target=allowing_thread)
    thread.start()
    assert allowed_there.wait(10)
    with pytest.raises(UnsupportedMedia, match="truncated"):  # while that thread still allows
        decode_image(samples.png_header_only(20, 20), LIMITS)
    proceed.set()
    thread.join(10)
    assert decoded == [1, 1]


def test_pillows_global_switch_set_by_other_code_is_not_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_image(samples.png_header_only(20, 20), LIMITS)
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_image(hostile.jpeg_declaring(), LIMITS)


# Decoded bytes, from the headers ----------------------------------------------------------

def test_a_gif_with_a_7000x7000_screen_is_413_by_its_decoded_bytes() -> None:
    data = hostile.gif_screen()
    assert len(data) < 64
    refusal = r"7000x7000 at 3 bytes per pixel: 140\.2 MB decoded.*100\.0 MB"
    with pytest.raises(PayloadTooLarge, match=refusal):
        decode_image(data, BUDGET, "screen.gif")
    # Under the pixel limit: the byte limit is what refuses it.
    assert decode_image(data, LIMITS)[0].image.size == (7000, 7000)


def test_a_16_bit_png_at_7000x7000_is_413_before_it_is_inflated() -> None:
    data = hostile.png16()
    assert len(data) < 120_000
    with pytest.raises(PayloadTooLarge, match="7000x7000"):
        decode_image(data, BUDGET, "deep.png")


def test_16_bit_channels_count_two_bytes() -> None:
    # A 100x100 16-bit RGB DICOM decodes to 6 bytes a pixel; refused from its header alone.
    rgb16 = dicom_samples.grey(np.zeros((100, 100), np.uint16), SamplesPerPixel=3,
                               PhotometricInterpretation="RGB")
    with pytest.raises(PayloadTooLarge, match="100x100 at 6 bytes per pixel"):
        decode_image(rgb16, DecodeLimits(50_000_000, 64, max_frame_bytes=50_000))
    assert limits_module.frame_bytes(10, 10, limits_module.mode_bytes("I;16")) == 300  # as RGB


def test_a_multi_frame_dicom_is_charged_for_every_frame_from_its_header() -> None:
    frames = dicom_samples.grey(np.zeros((4, 50, 50), np.uint16))
    budget = ByteBudget(limit=20_000)  # room for two of its four 7,500-byte frames
    with pytest.raises(PayloadTooLarge, match="frame 2 decodes to"):
        decode_image(frames, DecodeLimits(50_000_000, 64, request_bytes=budget))


def test_the_request_budget_counts_every_file_and_frame_together() -> None:
    shared = ByteBudget(limit=10 * 48 * 32 * 3)
    per_request = DecodeLimits(50_000_000, 64, request_bytes=shared)
    assert len(decode_image(samples.animated("GIF", 6), per_request)) == 6
    assert shared.spent == 6 * 48 * 32 * 3
    with pytest.raises(PayloadTooLarge, match=r"earlier frames decode to.*per request"):
        decode_image(samples.animated("GIF", 6), per_request, "second.gif")


def test_the_byte_limit_counts_what_a_reduced_jpeg_decodes_to() -> None:
    photo = samples.save(Image.fromarray(samples.quadrants(4000, 3000)), "JPEG")
    tight = DecodeLimits(50_000_000, 1, max_frame_bytes=20 * MB, reduce_to=(1024, 224))
    (frame,) = decode_image(photo, tight)  # 36 MB at full size, 9 MB at half
    assert frame.image.size == (2000, 1500)
    with pytest.raises(PayloadTooLarge, match="4000x3000"):
        decode_image(photo, DecodeLimits(50_000_000, 1, max_frame_bytes=20 * MB))


# Reduced decoding -------------------------------------------------------------------------

def test_a_large_jpeg_is_decoded_reduced_and_reports_its_own_size() -> None:
    photo = samples.save(Image.fromarray(samples.quadrants(4000, 2000)), "JPEG")
    (frame,) = decode_image(photo, DecodeLimits(50_000_000, 1, reduce_to=(1024, 224)))
    assert (frame.width, frame.height) == (4000, 2000)
    assert frame.image.size == (2000, 1000)  # a quarter would leave 1000, under the overlay's 1024
    pixels = np.asarray(frame.image)
    assert tuple(pixels[5, 5]) == pytest.approx(samples.QUADRANTS[0], abs=8)


def test_orientation_turns_the_reported_size_of_a_reduced_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    photo = samples.save(Image.fromarray(samples.quadrants(4000, 3000)), "JPEG", exif=exif.tobytes())
    (frame,) = decode_image(photo, DecodeLimits(50_000_000, 1, reduce_to=(1024, 224)))
    assert (frame.width, frame.height) == (3000, 4000)
    assert frame.image.size == (1500, 2000)


@pytest.mark.parametrize("size, need, scale", [
    ((7000, 7000), (1024, 224), 4),  # 1750 a side still covers the 1024 overlay
    ((7000, 7000), (0, 224), 8),  # classification only: 875 a side
    ((4000, 300), (1024, 224), 1),  # halving the short side would fall under the model's input
    ((800, 600), (1024, 224), 1),  # already smaller than the overlay: kept whole
])
def test_the_reduction_keeps_what_the_outputs_need(
    size: tuple[int, int], need: tuple[int, int], scale: int
) -> None:
    assert reduction(*size, need) == scale


def test_shrink_keeps_the_reported_size_and_what_overlays_need() -> None:
    (frame,) = decode_image(samples.save(Image.fromarray(samples.quadrants(3000, 2000)), "PNG"), LIMITS)
    small = shrink(frame, (1024, 224))
    assert small.image.size == (1024, 683)
    assert (small.width, small.height) == (3000, 2000)
    long_strip = shrink(frame, (1024, 2000))  # each side must keep 2000: nothing to gain
    assert long_strip.image.size == (3000, 2000)


# Frame counts and the deadline ------------------------------------------------------------

def test_a_tiff_of_100000_pages_is_413_after_reading_only_65_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = samples.tiff_pages(100_000)
    assert len(data) < 12 * MB
    real_seek = TiffImagePlugin.TiffImageFile._seek
    pages_read: list[int] = []

    def counting_seek(self: TiffImagePlugin.TiffImageFile, frame: int) -> None:
        pages_read.append(frame)
        real_seek(self, frame)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_seek", counting_seek)
    with pytest.raises(PayloadTooLarge, match="at least 65 frames; at most 64"):
        decode_image(data, LIMITS, "pages.tif")
    assert max(pages_read) == 64  # one past the limit, whatever the file holds
    assert len(pages_read) < 200


def test_a_tiff_under_the_frame_limit_gives_every_page() -> None:
    frames = decode_image(samples.tiff_pages(5), LIMITS)
    assert [f.frame for f in frames] == [0, 1, 2, 3, 4]
    assert all(f.image.getpixel((0, 0)) == (128, 128, 128) for f in frames)


def test_a_gif_of_100000_frames_is_counted_only_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    real_seek = GifImagePlugin.GifImageFile._seek
    steps: list[int] = []

    def counting_seek(self: GifImagePlugin.GifImageFile, frame: int, update_image: bool = True) -> None:
        steps.append(frame)
        real_seek(self, frame, update_image)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", counting_seek)
    with pytest.raises(PayloadTooLarge, match="at least 65 frames"):
        decode_image(hostile.gif_frames(100_000), LIMITS, "long.gif")
    assert max(steps) == 64


def test_the_deadline_is_checked_between_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 100.0, 100.0, 100.0])
    monkeypatch.setattr(limits_module, "monotonic", lambda: next(clock))
    timed = DecodeLimits(50_000_000, 64, deadline=50.0)
    with pytest.raises(DeadlineExceeded, match="frame 2"):
        decode_image(samples.animated("GIF", 4), timed, "slow.gif")


def test_an_expired_deadline_stops_decoding_before_the_first_frame() -> None:
    with pytest.raises(DeadlineExceeded, match="while decoding"):
        decode_image(samples.still("png-rgb"), DecodeLimits(50_000_000, 64, deadline=0.0))


# Windowing in slices ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_windowing_a_large_frame_in_slices_matches_the_whole_frame_formula(dtype: type) -> None:
    pixels = RNG.integers(0, 60_000, (1500, 1000)).astype(dtype)  # 1.5 M values: several slices
    pixels[3, 3] = 65_000
    values = pixels.astype(np.float64)
    expected = np.clip(np.rint((values - values.min()) * (255.0 / np.ptp(values))), 0, 255)
    assert np.array_equal(window_to_uint8(pixels), expected.astype(np.uint8))
    windowed = np.clip(np.rint((values - 1000) * (255.0 / 9000)), 0, 255).astype(np.uint8)
    assert np.array_equal(window_to_uint8(pixels, 1000, 10_000), windowed)


def test_windowing_treats_nan_and_infinity_as_zero_across_slices() -> None:
    pixels = np.full((1100, 1000), 5.0, dtype=np.float32)
    pixels[0, 0], pixels[-1, -1], pixels[600, 5] = np.nan, np.inf, 10.0
    out = window_to_uint8(pixels)
    assert out[0, 0] == 0 and out[-1, -1] == 0 and out[600, 5] == 255 and out[1, 1] == 128


def test_a_frame_reported_through_io_still_matches_the_file() -> None:
    # The sizes a response reports come from the file: a small PNG's frame is untouched.
    data = samples.still("png-rgb")
    (frame,) = decode_image(data, LIMITS)
    assert (frame.width, frame.height) == Image.open(io.BytesIO(data)).size == frame.image.size
