"""The images the service writes for a DICOM source, a Parametric Map and a Secondary Capture
per (source file, method, class), and what they share with the report (service.radiology.report).

Every object joins the source's study (patient and study attributes copied, never invented),
names the service in its equipment module (manufacturer ``camserve``, the service's version)
and in Contributing Equipment, and references the source instance and frames. Class labels
are coded in the local scheme :data:`LABEL_SCHEME` (code value: the class index, meaning: the
label), as the README's "Radiology" section documents.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from service.radiology.geometry import frame_count, highdicom_view

LABEL_SCHEME = "99CAMSERVE"
MANUFACTURER = "camserve"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
_MULTIFRAME_TRUE_COLOUR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
_LO = 64  # the longest a Long String (LO) value may be


@dataclass(frozen=True)
class Identity:
    """Who wrote the objects: the service and the model whose maps they hold."""

    software_version: str
    model_name: str
    model_version: str

    @property
    def model(self) -> str:
        return fit_text(f"{self.model_name} {self.model_version}")


@dataclass(frozen=True)
class SourceMap:
    """One (method, class) map over the frames of one source file that have it."""

    method: str
    layer: str
    class_idx: int
    label: str
    frames: tuple[int, ...]  # 0-based frame indices in the source
    scores: tuple[float, ...]  # the class's probability on each of those frames
    maps: np.ndarray  # (len(frames), Rows, Columns) float32 in [0, 1]

    def score_text(self) -> str:
        return (f"{self.scores[0]:.3f}" if len(set(self.scores)) == 1
                else f"{min(self.scores):.3f}-{max(self.scores):.3f}")

    def describe(self) -> str:
        return (f"{self.method} {self.layer} class {self.class_idx} {self.label} "
                f"score {self.score_text()}")

    def short(self, identity: Identity) -> str:
        """Method, layer, class, score and model in one Long String: the label gives way."""
        head = f"{self.method} {self.layer} {self.class_idx}:"
        tail = f"{self.score_text()} {identity.model_name} {identity.model_version}"
        room = _LO - len(head) - len(tail) - 1
        if room < 4:
            return fit_text(f"{head}{self.label} {tail}")
        return f"{head}{fit_text(self.label, room)} {tail}"


@dataclass
class SeriesPlan:
    """One new series per kind of object and study in a request; numbers count up within it."""

    kind: str
    description: str
    number: int
    uids: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def next(self, study_uid: str) -> tuple[str, int]:
        uid = self.uids.setdefault(study_uid, str(hd.UID()))
        self.counts[study_uid] = self.counts.get(study_uid, 0) + 1
        return uid, self.counts[study_uid]


_SINGLE_FRAME_CLASSES = {"1.2.840.10008.5.1.4.1.1.7"}  # SC Image: frames cannot be referenced


def references_frames(source: Dataset) -> bool:
    """Whether references to the source name frame numbers: a multi-frame file of a SOP class
    that has frames (some writers put two frames in a single-frame Secondary Capture)."""
    return frame_count(source) > 1 and str(source.SOPClassUID) not in _SINGLE_FRAME_CLASSES


def label_code(class_idx: int, label: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(str(class_idx), LABEL_SCHEME, fit_text(label) or str(class_idx))


def fit_text(text: str, size: int = _LO) -> str:
    text = " ".join(text.replace("\\", "/").split())
    return text if len(text) <= size else text[: size - 1].rstrip() + "~"


def contributing_equipment(identity: Identity) -> list[hd.ContributingEquipment]:
    return [hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=identity.model,
        software_versions=identity.software_version,
        contribution_description=fit_text(f"class activation maps of {identity.model}"),
    )]


def _laterality(obj: Dataset, source: Dataset) -> None:
    # General Series: Laterality is type 2C (present, empty when unknown); copied when known.
    if "Laterality" not in obj:
        obj.Laterality = source.get("Laterality") or None


_DEIDENTIFICATION = ("PatientIdentityRemoved", "DeidentificationMethod",
                     "DeidentificationMethodCodeSequence")


def copy_deidentification(obj: Dataset, source: Dataset) -> None:
    """A de-identified source's results say so too, and how (type 1C once identity is removed)."""
    for keyword in _DEIDENTIFICATION:
        if keyword in source and keyword not in obj:
            obj[keyword] = source[keyword]
    removed = str(obj.get("PatientIdentityRemoved", "")).upper() == "YES"
    if removed and not ({"DeidentificationMethod", "DeidentificationMethodCodeSequence"} & set(obj.dir())):
        obj.DeidentificationMethod = "not stated by the source"


def parametric_map(
    source: Dataset, smap: SourceMap, identity: Identity, series: SeriesPlan
) -> hd.pm.ParametricMap:
    """A float32 Parametric Map at the source's own rows and columns, one frame per source frame
    that has the map, labelled HEATMAP, values "Class Activation" with no units."""
    view = highdicom_view(source)
    maps = np.ascontiguousarray(smap.maps, dtype=np.float32)
    whole = len(smap.frames) == frame_count(source)
    positions = None
    if not whole:
        # Only some frames have this class (top-1 per frame): place each on its own frame.
        groups = view.PerFrameFunctionalGroupsSequence
        positions = [hd.PlanePositionSequence(
            hd.CoordinateSystemNames.PATIENT,
            groups[i].PlanePositionSequence[0].ImagePositionPatient) for i in smap.frames]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="Class Activation",
        lut_explanation=fit_text(f"class activation of {identity.model_name} for {smap.label}"),
        value_range=(0.0, 1.0),
        quantity_definition=codes.DCM.ClassActivation,
        unit=codes.UCUM.NoUnits,
    )
    series_uid, number = series.next(str(source.StudyInstanceUID))
    pm = hd.pm.ParametricMap(
        source_images=[view],
        pixel_array=maps[0] if frame_count(source) == 1 else maps,
        series_instance_uid=series_uid,
        series_number=series.number,
        sop_instance_uid=str(hd.UID()),
        instance_number=number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=identity.model,
        software_versions=identity.software_version,
        device_serial_number=identity.software_version,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="HEATMAP",
        content_description=smap.short(identity),
        plane_positions=positions,
        pixel_measures=None if whole else hd.PixelMeasuresSequence.from_sequence(
            view.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence),
        contributing_equipment=contributing_equipment(identity),
        series_description=series.description,
    )
    _laterality(pm, source)
    copy_deidentification(pm, source)
    if not whole:
        _reference_frames(pm, view, source, smap.frames)
    full = fit_text(f"{smap.describe()}, model {identity.model_name} {identity.model_version}", 1024)
    for group in pm.PerFrameFunctionalGroupsSequence:
        for derivation in group.get("DerivationImageSequence", []):
            derivation.DerivationDescription = full  # ST: the untrimmed description
    return pm


def _reference_frames(pm: Dataset, view: Dataset, source: Dataset, frames: Sequence[int]) -> None:
    """Explicit plane positions lose highdicom's per-frame derivation links: state them. highdicom
    orders the frames by position, so each is matched to its source frame by its position."""
    groups = view.PerFrameFunctionalGroupsSequence
    by_position = {_position_key(groups[i].PlanePositionSequence[0].ImagePositionPatient): i
                   for i in frames}
    for group in pm.PerFrameFunctionalGroupsSequence:
        frame = by_position[_position_key(group.PlanePositionSequence[0].ImagePositionPatient)]
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        ref.ReferencedFrameNumber = frame + 1
        ref.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
        derivation = Dataset()
        derivation.DerivationCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.DCM.UnspecifiedMethodOfCalculation)]
        derivation.SourceImageSequence = [ref]
        group.DerivationImageSequence = [derivation]


def _position_key(position: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in position)


def secondary_capture(
    source: Dataset, smap: SourceMap, rgb: np.ndarray, identity: Identity, series: SeriesPlan
) -> Dataset:
    """The overlay burned in as RGB at the source's size (``rgb``: (frames, Rows, Columns, 3)
    uint8), BurnedInAnnotation YES; a multi-frame source gives a Multi-frame True Color SC."""
    series_uid, number = series.next(str(source.StudyInstanceUID))
    orientation = _patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb[0]),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series.number,
        sop_instance_uid=str(hd.UID()),
        instance_number=number,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(identity),
        series_description=series.description,
        # highdicom wants letters; an unknown orientation is stated empty (type 2C) below.
        patient_orientation=orientation if all(orientation) else ("L", "P"),
    )
    if not all(orientation):
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", None)
    _laterality(sc, source)
    copy_deidentification(sc, source)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ManufacturerModelName = identity.model
    sc.SoftwareVersions = identity.software_version
    sc.DerivationDescription = fit_text(f"{smap.describe()} overlay, {identity.model}", 1024)
    if "FrameOfReferenceUID" in source:
        sc.FrameOfReferenceUID = source.FrameOfReferenceUID
    multi = frame_count(source) > 1
    refs = []
    for frame in smap.frames if references_frames(source) else (0,):
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if references_frames(source):
            ref.ReferencedFrameNumber = frame + 1
        refs.append(ref)
    sc.SourceImageSequence = refs
    if multi:
        sc.SOPClassUID = _MULTIFRAME_TRUE_COLOUR_SC
        sc.file_meta.MediaStorageSOPClassUID = UID(_MULTIFRAME_TRUE_COLOUR_SC)
        sc.NumberOfFrames = len(smap.frames)
        if len(smap.frames) > 1:  # type 1C: only when there is more than one frame
            sc.FrameIncrementPointer = 0x00182002  # Frame Label Vector
            sc.FrameLabelVector = [f"frame {frame + 1}" for frame in smap.frames]
        sc.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return sc


def _patient_orientation(source: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation, else its row and column directions as letters."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2:
        return str(value[0]), str(value[1])
    cosines = source.get("ImageOrientationPatient")
    if cosines is None and "SharedFunctionalGroupsSequence" in source:
        plane = source.SharedFunctionalGroupsSequence[0].get("PlaneOrientationSequence")
        cosines = plane[0].ImageOrientationPatient if plane else None
    if cosines is None or len(cosines) != 6:
        return "", ""  # unknown: the attribute is type 2C, present and empty
    values = [float(v) for v in cosines]
    return _letters(values[:3]), _letters(values[3:])


def _letters(direction: Sequence[float]) -> str:
    # DICOM's patient axes: +x to the patient's left, +y posterior, +z head.
    names = (("R", "L"), ("A", "P"), ("F", "H"))
    order = sorted(range(3), key=lambda axis: -abs(direction[axis]))
    return "".join(names[axis][direction[axis] > 0] for axis in order if abs(direction[axis]) > 1e-3)


def part10(ds: Dataset) -> bytes:
    """The object as a DICOM Part 10 file (preamble, file meta, data set)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
