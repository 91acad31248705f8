"""Random and mutated bytes fed to the decoders: an image or a 4xx domain error, nothing else."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMedia
from service.imaging.decode import DecodeLimits, decode_image
from tests.imaging import dicom_samples, samples

LIMITS = DecodeLimits(max_pixels=1_000_000, max_frames=16)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SEEDS = [
    samples.still("png-rgb"), samples.still("png-grey16"), samples.still("png-palette"),
    samples.still("jpeg"), samples.jpeg_with_orientation(6), samples.still("tiff-grey16"),
    samples.still("tiff-lzw"), samples.still("bmp"), samples.still("webp"),
    samples.animated("GIF", 3, 8, 8), samples.animated("WEBP", 2, 8, 8),
    dicom_samples.bundled("CT_small.dcm"), dicom_samples.bundled("SC_rgb_rle_2frame.dcm"),
    dicom_samples.bundled("MR_small_jpeg_ls_lossless.dcm"),
]


def decode_or_4xx(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            frames = decode_image(data, LIMITS, "fuzz")
        except (BadRequest, PayloadTooLarge, UnsupportedMedia) as exc:
            assert exc.status_code in (400, 413, 415)
            assert exc.message
            return
    assert 1 <= len(frames) <= LIMITS.max_frames
    for frame in frames:
        pixels = np.asarray(frame.image)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert pixels.shape[0] * pixels.shape[1] <= LIMITS.max_pixels


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decode_or_4xx(data)


@FUZZ
@given(st.sampled_from(SEEDS).flatmap(lambda seed: st.tuples(
    st.just(seed),
    st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=8),
)))
def test_flipped_bytes(case: tuple[bytes, list[tuple[int, int]]]) -> None:
    seed, edits = case
    data = bytearray(seed)
    for position, value in edits:
        data[position] = value
    decode_or_4xx(bytes(data))


@FUZZ
@given(st.sampled_from(SEEDS).flatmap(lambda seed: st.tuples(
    st.just(seed), st.integers(0, len(seed)), st.binary(max_size=64),
)))
def test_truncated_or_spliced(case: tuple[bytes, int, bytes]) -> None:
    seed, cut, tail = case
    decode_or_4xx(seed[:cut] + tail)
