"""DICOM: photometric interpretations, modality and VOI transforms, frames, syntaxes, limits."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from service.errors import PayloadTooLarge, UnsupportedMedia
from service.imaging.decode import DecodeLimits, decode_image, is_dicom, window_to_uint8
from tests.imaging import dicom_samples
from tests.imaging.dicom_samples import bundled, grey

LIMITS = DecodeLimits(max_pixels=50_000_000, max_frames=64)
RAMP = np.tile(np.linspace(0, 1000, 40).round().astype(np.uint16), (10, 1))


def frames(data: bytes, limits: DecodeLimits = LIMITS) -> list[np.ndarray]:
    decoded = decode_image(data, limits, "scan.dcm")
    assert [f.frame for f in decoded] == list(range(len(decoded)))
    return [np.asarray(f.image) for f in decoded]


def reference(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(pydicom.dcmread(pydicom.data.get_testdata_file(name)).pixel_array)


def test_dicom_is_sniffed_from_its_preamble() -> None:
    assert is_dicom(bundled("CT_small.dcm"))
    assert not is_dicom(b"\x00" * 128 + b"DIC")


def test_rescale_slope_and_intercept_then_full_range_without_a_window() -> None:
    (pixels,) = frames(bundled("CT_small.dcm"))  # RescaleIntercept -1024, no window
    hounsfield = reference("CT_small.dcm").astype(float) - 1024
    assert np.array_equal(pixels[..., 0], window_to_uint8(hounsfield))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_the_files_own_window_is_applied() -> None:
    (pixels,) = frames(bundled("MR_small.dcm"))  # WindowCenter 600, WindowWidth 1600
    low, high = 600 - 0.5 - 1599 / 2, 600 - 0.5 + 1599 / 2
    assert np.array_equal(pixels[..., 0], window_to_uint8(reference("MR_small.dcm"), low, high))


def test_rescale_and_window_work_together_in_modality_units() -> None:
    # Stored 0..1000 become -100..1900; the window [400, 1400] is in those units.
    data = grey(RAMP, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=900.5, WindowWidth=1001)
    (pixels,) = frames(data)
    row = pixels[0, :, 0]
    stored = RAMP[0]
    assert (row[stored <= 250] == 0).all()
    assert (row[stored >= 750] == 255).all()
    middle = (stored > 250) & (stored < 750)
    assert middle.any() and ((row[middle] > 0) & (row[middle] < 255)).all()


def test_monochrome1_is_inverted_so_higher_is_brighter() -> None:
    (plain,) = frames(grey(RAMP, "MONOCHROME2"))
    (inverted,) = frames(grey(RAMP, "MONOCHROME1"))
    assert plain[0, 0, 0] == 0 and plain[0, -1, 0] == 255
    assert np.array_equal(inverted, 255 - plain)


def test_multi_frame_rgb_gives_every_frame_in_order() -> None:
    decoded = frames(bundled("SC_rgb_rle_2frame.dcm"))
    expected = reference("SC_rgb_rle_2frame.dcm")
    assert len(decoded) == 2
    for pixels, frame in zip(decoded, expected, strict=True):
        assert np.array_equal(pixels, frame)


def test_16_bit_rgb_is_scaled_to_8_bits() -> None:
    (pixels,) = frames(bundled("SC_rgb_rle_16bit.dcm"))
    (eight_bit,) = frames(bundled("SC_rgb_rle.dcm"))
    assert np.abs(pixels.astype(int) - eight_bit.astype(int)).max() <= 1


def test_greyscale_multi_frame() -> None:
    stack = np.stack([RAMP, RAMP[:, ::-1], RAMP])
    decoded = frames(grey(stack))
    assert len(decoded) == 3
    assert decoded[0][0, 0, 0] == 0 and decoded[1][0, 0, 0] == 255


@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
])
def test_compressed_and_other_syntaxes_decode_like_the_original(name: str) -> None:
    (expected,) = frames(bundled("MR_small.dcm"))
    (pixels,) = frames(bundled(name))
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("name, count", [
    ("SC_rgb_jpeg_gdcm.dcm", 1), ("JPEG2000.dcm", 1), ("examples_ybr_color.dcm", 30),
    ("examples_palette.dcm", 1), ("image_dfl.dcm", 1),
])
def test_jpeg_jpeg2000_ybr_palette_and_deflate(name: str, count: int) -> None:
    decoded = frames(bundled(name))
    assert len(decoded) == count
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in decoded)
    assert decoded[0].max() > decoded[0].min()


def test_an_undecodable_transfer_syntax_is_415_naming_it() -> None:
    data = dicom_samples.encapsulated("1.2.840.10008.1.2.4.100")
    with pytest.raises(UnsupportedMedia, match=r"MPEG2.*1\.2\.840\.10008\.1\.2\.4\.100"):
        decode_image(data, LIMITS)


def test_a_corrupt_compressed_stream_is_415_naming_the_syntax() -> None:
    with pytest.raises(UnsupportedMedia, match=r"JPEG-LS Lossless.*1\.2\.840\.10008\.1\.2\.4\.80"):
        decode_image(dicom_samples.encapsulated("1.2.840.10008.1.2.4.80"), LIMITS)


@pytest.mark.parametrize("data", [
    bundled("rtplan.dcm"),  # no pixel data
    bundled("MR_truncated.dcm"),
    bundled("CT_small.dcm")[:1000],
    bundled("CT_small.dcm")[:132] + b"\xff" * 64,
])
def test_dicom_without_usable_pixels_is_415(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia):
        decode_image(data, LIMITS)


def test_frame_and_pixel_limits_apply_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match="30 frames"):
        decode_image(bundled("examples_ybr_color.dcm"), DecodeLimits(50_000_000, max_frames=10))
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(bundled("CT_small.dcm"), DecodeLimits(max_pixels=128 * 127, max_frames=1))


def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it() -> None:
    bomb = grey(np.zeros((2000, 2000), np.uint16), syntax=DeflatedExplicitVRLittleEndian)
    assert len(bomb) < 20_000  # 8 MB of pixels
    with pytest.raises(PayloadTooLarge, match="inflates"):
        decode_image(bomb, DecodeLimits(max_pixels=100_000, max_frames=1))


def test_a_data_set_without_preamble_or_file_meta_still_decodes() -> None:
    data = grey(RAMP)
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    bare = data[meta_end:]  # what older modalities write: the data set alone
    assert bare[:2] == b"\x08\x00" and not is_dicom(bare)
    (pixels,) = frames(bare)
    (expected,) = frames(data)
    assert np.array_equal(pixels, expected)


def test_bare_bytes_that_only_look_like_dicom_are_415() -> None:
    with pytest.raises(UnsupportedMedia):
        decode_image(b"\x08\x00" + b"\x00" * 40, LIMITS)


def test_a_voi_lookup_table_is_applied_when_there_is_no_window() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]  # 4 entries, first stored value 0, 8-bit output
    lut.LUTData = [0, 255, 255, 255]  # 0 -> dark, 1 and above -> bright
    lut["LUTData"].VR = "US"
    data = grey(np.array([[0, 1, 2, 3, 500]], dtype=np.uint16), VOILUTSequence=[lut])
    (pixels,) = frames(data)
    assert pixels[0, :, 0].tolist() == [0, 255, 255, 255, 255]


def test_presentation_lut_shape_inverse_flips_monochrome2() -> None:
    (plain,) = frames(grey(RAMP))
    (flipped,) = frames(grey(RAMP, PresentationLUTShape="INVERSE"))
    assert np.array_equal(flipped, 255 - plain)
