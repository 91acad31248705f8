"""What the PACS browsing routes answer (:mod:`service.api.routes.dicomweb_browse`): plain JSON
for the review page, not DICOM JSON."""

from __future__ import annotations

from pydantic import BaseModel, Field

MAX_LISTED = 2000  # series of a study, instances of a series: more are cut off and said so
_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
_SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


class StudyOut(BaseModel):
    study_uid: str = Field(description="Study Instance UID", examples=[_STUDY])
    patient_name: str | None = Field(description="as the PACS holds it, DICOM's ^ between parts",
                                      examples=["DOE^JOHN"])
    patient_id: str | None = Field(description="Patient ID", examples=["1CT1"])
    date: str | None = Field(description="study date, YYYY-MM-DD", examples=["2004-01-19"])
    time: str | None = Field(description="study time, HH:MM:SS", examples=["07:27:30"])
    description: str | None = Field(description="Study Description", examples=["CT chest"])
    accession: str | None = Field(description="Accession Number", examples=["A12345"])
    modalities: list[str] = Field(description="Modalities in Study", examples=[["CT", "SR"]])
    series_count: int | None = Field(description="series in the study, when the PACS says",
                                     examples=[2])
    instance_count: int | None = Field(description="instances in the study, when the PACS says",
                                       examples=[41])


class StudiesOut(BaseModel):
    studies: list[StudyOut] = Field(description="the page of studies found, in the PACS's order")
    limit: int = Field(description="studies per page, as asked", examples=[25])
    offset: int = Field(description="studies skipped before this page", examples=[0])
    more: bool = Field(description="the PACS has more matches past this page (ask with offset)",
                       examples=[False])


class SeriesOut(BaseModel):
    series_uid: str = Field(description="Series Instance UID", examples=[_SERIES])
    modality: str | None = Field(description="Modality", examples=["CT"])
    number: int | None = Field(description="Series Number", examples=[1])
    description: str | None = Field(description="Series Description", examples=["axial 5 mm"])
    instance_count: int | None = Field(description="instances in the series, when the PACS says",
                                       examples=[40])


class SeriesListOut(BaseModel):
    study_uid: str = Field(description="the study listed", examples=[_STUDY])
    series: list[SeriesOut] = Field(description="its series, by series number")
    truncated: bool = Field(description=f"more series than one listing holds ({MAX_LISTED})",
                           examples=[False])


class InstanceOut(BaseModel):
    sop_instance_uid: str = Field(description="SOP Instance UID", examples=[_SOP])
    sop_class_uid: str | None = Field(description="SOP Class UID", examples=["1.2.840.10008.5.1.4.1.1.2"])
    number: int | None = Field(description="Instance Number", examples=[1])
    frames: int = Field(description="Number of Frames (1 when not multi-frame)", examples=[1])
    rows: int | None = Field(description="Rows", examples=[512])
    columns: int | None = Field(description="Columns", examples=[512])
    image: bool = Field(description="an image POST /dicomweb/explain would explain", examples=[True])
    skip_reason: str | None = Field(description="why it would be skipped, when it is not an image",
                                    examples=[None])


class InstancesOut(BaseModel):
    study_uid: str = Field(description="the study", examples=[_STUDY])
    series_uid: str = Field(description="the series listed", examples=[_SERIES])
    instances: list[InstanceOut] = Field(description="the images in the order the explanation of "
                                         "the series takes them (position along the slice normal, "
                                         "else instance number), then the other instances")
    truncated: bool = Field(description=f"more instances than one listing holds ({MAX_LISTED})",
                           examples=[False])
