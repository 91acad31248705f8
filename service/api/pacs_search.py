"""The study search's filters, checked before the PACS is asked: each becomes a QIDO-RS match
key (PatientName, PatientID, StudyDate, ModalitiesInStudy, AccessionNumber) or a 422."""

from __future__ import annotations

import re
from datetime import datetime

from service.errors import InvalidOption

_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_MODALITY = re.compile(r"^[A-Za-z0-9_]{1,16}$")
_NOT_IN_A_MATCH = re.compile(r"[\\\x00-\x1f\x7f]")  # a backslash would make it a list of values


def _match(value: str | None, what: str, longest: int) -> str | None:
    """A match value as typed (DICOM wildcards * and ? allowed), or None when empty."""
    value = (value or "").strip()
    if not value:
        return None
    if len(value) > longest:
        raise InvalidOption(f"{what} is at most {longest} characters, got {len(value)}")
    if _NOT_IN_A_MATCH.search(value):
        raise InvalidOption(f"{what} may not hold a backslash or control characters")
    return value


def _day(text: str, what: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise InvalidOption(f"{what}: {text} is not a calendar date (YYYYMMDD)") from None


def study_date(value: str | None) -> str | None:
    """``YYYYMMDD``, or a DICOM range ``YYYYMMDD-YYYYMMDD`` (either end may be left open)."""
    value = (value or "").strip()
    if not value:
        return None
    found = _DATE.match(value)
    if not found or value == "-" or (found.group(2) is None and found.group(3) is not None):
        raise InvalidOption(f"date must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD, got {value[:40]!r}")
    first, last = found.group(1), found.group(3)
    start = _day(first, "date") if first else None
    end = _day(last, "date") if last else None
    if start and end and start > end:
        raise InvalidOption(f"date range {value} ends before it starts")
    return value


def search_filters(
    patient: str | None, patient_id: str | None, date: str | None, modality: str | None,
    accession: str | None,
) -> dict[str, str]:
    filters: dict[str, str | None] = {
        "PatientName": _match(patient, "patient", 64),
        "PatientID": _match(patient_id, "patient_id", 64),
        "StudyDate": study_date(date),
        "AccessionNumber": _match(accession, "accession", 16),
    }
    if modality and modality.strip():
        if not _MODALITY.match(modality.strip()):
            raise InvalidOption(f"modality must be a DICOM modality such as CT or MR, got {modality[:40]!r}")
        filters["ModalitiesInStudy"] = modality.strip().upper()
    return {key: value for key, value in filters.items() if value is not None}
