"""The TID 1500 Structured Report the service writes per DICOM source file (``dicom_sr``):
what the model predicted on each frame, what each map explains, who computed it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.radiology.geometry import frame_count
from service.radiology.objects import (
    LABEL_SCHEME,
    MANUFACTURER,
    Identity,
    SeriesPlan,
    SourceMap,
    contributing_equipment,
    copy_deidentification,
    fit_text,
    label_code,
    references_frames,
)

_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_IMAGING = hd.sr.CodedConcept("363679005", "SCT", "Imaging")
_SCORE = hd.sr.CodedConcept("CAMSCORE", LABEL_SCHEME, "Class probability")


@dataclass(frozen=True)
class FramePredictions:
    frame: int  # 0-based
    predictions: tuple[tuple[int, str, float], ...]  # (class index, label, probability), best first


def structured_report(
    source: Dataset,
    predictions: Sequence[FramePredictions],
    maps: Sequence[tuple[SourceMap, Dataset | None]],
    identity: Identity,
    series: SeriesPlan,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 measurement report on one source file: per frame, the predicted classes with
    their probabilities; per map, its method and layer, its class and score, and a reference to
    its parametric map (when one was written); the algorithm's identity throughout."""
    multi = references_frames(source)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(hd.UID()), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=identity.model,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=device)

    def images(frames: Sequence[int]) -> list[hd.sr.SourceImageForMeasurementGroup]:
        return [hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            referenced_frame_numbers=[f + 1 for f in frames] if multi else None,
        )]

    def algorithm(parameters: Sequence[str]) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=fit_text(f"camserve {identity.model_name}"), version=fit_text(
                f"{identity.software_version} model {identity.model_version}"),
            parameters=[fit_text(p) for p in parameters], manufacturer=MANUFACTURER,
        )

    groups = []
    for frame in predictions:
        measurements = [hd.sr.Measurement(
            name=label_code(idx, label), value=round(score, 6), unit=_NO_UNITS,
            algorithm_id=algorithm([f"model {identity.model}", f"rank {rank}"]),
        ) for rank, (idx, label, score) in enumerate(frame.predictions, start=1)]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(hd.UID()), identifier=fit_text(f"predictions frame {frame.frame + 1}")),
            finding_type=codes.DCM.Finding,
            measurements=measurements,
            source_images=images([frame.frame]),
            algorithm_id=algorithm([f"model {identity.model}", "top-k classification"]),
        ))
    for smap, pm in maps:
        params = [f"method {smap.method}", f"layer {smap.layer}", f"model {identity.model}"]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=str(hd.UID()), identifier=fit_text(f"{smap.method} map class {smap.class_idx}")),
            finding_type=label_code(smap.class_idx, smap.label),
            measurements=[hd.sr.Measurement(
                name=_SCORE, value=round(max(smap.scores), 6), unit=_NO_UNITS,
                algorithm_id=algorithm(params),
            )],
            # The parametric map is referenced as an image: TID 1500's "real world value map"
            # names RWV Mapping objects, which a parametric map is not.
            source_images=images(smap.frames) + ([hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=pm.SOPClassUID,
                referenced_sop_instance_uid=pm.SOPInstanceUID,
                referenced_frame_numbers=(list(range(1, len(smap.frames) + 1))
                                          if frame_count(source) > 1 else None),
            )] if pm is not None else []),
            algorithm_id=algorithm(params),
        ))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_IMAGING,
        imaging_measurements=groups,
        referenced_images=None,
    )
    series_uid, number = series.next(str(source.StudyInstanceUID))
    evidence = [_with_type2(source)] + [pm for _, pm in maps if pm is not None]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_uid,
        series_number=series.number,
        sop_instance_uid=str(hd.UID()),
        instance_number=number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        series_description=series.description,
    )
    sr.SoftwareVersions = identity.software_version
    sr.ManufacturerModelName = identity.model
    sr.ContributingEquipmentSequence = contributing_equipment(identity)
    copy_deidentification(sr, source)
    return sr


# Type 2 attributes highdicom copies from the first evidence. DICOM lets them be empty, not
# absent, but many files (secondary captures, converters' output) leave them out; the report
# then carries them empty instead of failing.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "StudyID", "StudyDate", "StudyTime")


def _with_type2(source: Dataset) -> Dataset:
    missing = [keyword for keyword in _TYPE2 if keyword not in source]
    if not missing:
        return source
    head = source.copy()  # shallow: the source itself is left as it came
    for keyword in missing:
        setattr(head, keyword, None)
    return head
