"""The one PACS the service talks to, over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).

Its address comes from ``CAMSERVE_DICOMWEB_URL`` alone (with ``CAMSERVE_DICOMWEB_TOKEN`` for a
bearer token, or ``CAMSERVE_DICOMWEB_USER`` and ``CAMSERVE_DICOMWEB_PASSWORD`` for basic auth):
requests name studies, series and instances by UID, never a URL, so the service cannot be
turned into a proxy to other hosts. UIDs are checked against DICOM's UID syntax before any
call. The protocol is ``dicomweb-client``'s; every call has ``CAMSERVE_DICOMWEB_TIMEOUT_S``.

Errors: the PACS has no such study, series or instance -> :class:`NotFound` (what it answered);
it cannot be reached or does not answer in time -> :class:`PacsUnavailable`, with its address
in the log only; it refuses a store -> :class:`PacsRefused` with its status.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.config import Settings
from service.errors import InvalidOption, NotFound, PacsRefused, PacsUnavailable, PayloadTooLarge

log = logging.getLogger(__name__)

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PING_TIMEOUT_S = 2.0
PING_EVERY_S = 5.0
T = TypeVar("T")
# What dicomweb-client or pydicom raise on an answer they cannot read (not JSON, not multipart,
# not DICOM, no Content-Type).
_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, IndexError, InvalidDicomError)


def check_uid(value: str, what: str) -> str:
    value = value.strip()
    if len(value) > 64 or not UID.match(value):
        raise InvalidOption(f"{what} must be a DICOM UID (digits and dots, at most 64), got {value[:80]!r}")
    return value


class AnswerTooLarge(Exception):
    """The PACS's answer was longer than the session reads (``_TimedSession.max_bytes``)."""


class _TimedSession(requests.Session):
    """A session whose every request has a time limit (dicomweb-client sets none) and whose
    every answer is read up to ``max_bytes`` only: one instance from the PACS is bounded like
    an upload (CAMSERVE_MAX_UPLOAD_MB), whatever the PACS sends."""

    def __init__(self, timeout_s: float, max_bytes: int) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def request(self, *args: Any, limit_s: float | None = None, **kwargs: Any) -> requests.Response:
        # dicomweb-client passes a timeout of its own (20 s by default) to every call, which
        # ``setdefault`` would keep: CAMSERVE_DICOMWEB_TIMEOUT_S wins (``limit_s``: a shorter one).
        kwargs["timeout"] = limit_s if limit_s is not None else self.timeout_s
        kwargs["allow_redirects"] = False  # a redirect would lead to a host nobody configured
        response = super().request(*args, **kwargs)
        if response.is_redirect:  # not followed, nor read as an empty answer ("no studies")
            raise requests.HTTPError(f"redirected with HTTP {response.status_code}", response=response)
        return response

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if request.url and "?" in request.url:
            path, query = request.url.split("?", 1)
            request.url = f"{path}?{_as_typed(query)}"
        kwargs["stream"] = True  # the body is read below, at most max_bytes of it
        response = super().send(request, **kwargs)
        try:
            declared = int(response.headers.get("Content-Length", "0"))
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            response.close()
            raise AnswerTooLarge(declared)
        body, size = [], 0
        for chunk in response.iter_content(64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                response.close()
                raise AnswerTooLarge(size)
            body.append(chunk)
        # What requests would have read itself without ``stream``: .content and .json() work.
        response._content = b"".join(body)
        response._content_consumed = True
        return response


# DICOM's matching characters and the person-name separator, as dicomweb-client percent-encodes
# them. Orthanc (1.10, Debian's) matches query values without decoding them, so "DOE%2A"
# would match no one; sent as typed, they read the same to a server that does decode. A raw ^
# is not allowed in a URL (urllib3 encodes it again), so it goes as ?, the one-character
# wildcard: "DOE^JANE" matches DOE^JANE (and "DOE JANE"), never fewer than it should.
# For the same reason every other character that must be encoded would never match there (a
# space, sent as + or %20, an & or a %): each goes as ?, and a run of non-ASCII characters
# (UTF-8 bytes %80-%FF, which Orthanc's ? does not match one by one) as *, so "Müller" is
# asked as "M*ller". A server that decodes reads plain wildcards: never fewer than it should.
# Only the match values of the searches carry such characters (UIDs, dates, modalities, tags
# and numbers never do).
_MATCHING = {"%2A": "*", "%3F": "?", "%5E": "?"}
_ENCODED = re.compile(r"(?:%[89A-F][0-9A-F])+|%[0-7][0-9A-F]|\+", re.IGNORECASE)


def _as_typed(query: str) -> str:
    def typed(found: re.Match[str]) -> str:
        text = found.group(0).upper()
        if text in _MATCHING:
            return _MATCHING[text]
        return "*" if text[1:2] in tuple("89ABCDEF") else "?"

    return _ENCODED.sub(typed, query)


@dataclass(frozen=True)
class Instance:
    study_uid: str
    series_uid: str
    sop_uid: str
    dataset: Dataset

    @property
    def skip_reason(self) -> str | None:
        """Why this instance is not explained (None: it is an image to explain)."""
        ds = self.dataset
        return skip_reason(ds, is_map="FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
                           has_pixels="PixelData" in ds)

    def part10(self) -> bytes:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, self.dataset, enforce_file_format=True)
        return buffer.getvalue()


def skip_reason(ds: Dataset, is_map: bool, has_pixels: bool) -> str | None:
    """Why an instance is not an image to explain, from its data set (retrieved) or from what a
    search said of it (listed). A study explained before holds the service's own results too;
    they are never explained."""
    if str(getattr(ds, "Manufacturer", "")) == "camserve":
        return "a result camserve stored, not an image to explain"
    if is_map:
        return "a parametric map, not an image to explain"
    if not has_pixels:
        return "not an image: it has no pixel data"
    return None


class Pacs:
    def __init__(self, settings: Settings) -> None:
        if not settings.dicomweb_url:
            raise RuntimeError("no PACS configured")
        self.url = settings.dicomweb_url
        session = _TimedSession(settings.dicomweb_timeout_s, settings.max_upload_bytes)
        self.max_mb = settings.max_upload_mb
        if settings.dicomweb_token:
            session.headers["Authorization"] = f"Bearer {settings.dicomweb_token}"
        elif settings.dicomweb_user:
            session.auth = (settings.dicomweb_user, settings.dicomweb_password or "")
        self.session = session
        self.client = DICOMwebClient(url=self.url, session=session)
        # dicomweb-client retries every failed call five times with exponential back-off (an
        # unreachable PACS held each request about 30 s), past CAMSERVE_DICOMWEB_TIMEOUT_S: one
        # try, and the 502 says to retry later.
        self.client.set_http_retry_params(retry=False)
        self._seen: tuple[float, str] | None = None  # (when, what ping found)

    # calls (blocking: the routes run them on a thread) -------------------------------------

    def ping(self) -> str:
        """``reachable``, or why not (for ``/readyz``, which does not fail on it); asked at most
        every few seconds, with a short time limit, so probes never wait on the PACS."""
        now = time.monotonic()
        if self._seen is not None and now - self._seen[0] < PING_EVERY_S:
            return self._seen[1]
        try:
            answer = self.session.request("GET", f"{self.url}/studies", params={"limit": 1},
                                          limit_s=PING_TIMEOUT_S)
            found = "reachable" if answer.status_code < 500 else f"unreachable: HTTP {answer.status_code}"
        except Exception as exc:
            found = f"unreachable: {type(exc).__name__}"
        self._seen = (now, found)
        return found

    def find(self, study: str, series: str | None, instances: Sequence[str]) -> list[tuple[str, str]]:
        """(series UID, SOP instance UID) of every instance asked for, in the PACS's order."""
        found = self._call("search for instances", lambda: self.client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series,
            fields=["0020000E", "00080018"],
        ))
        listed = [(_value(d, "0020000E"), _value(d, "00080018")) for d in found]
        pairs = [(se, sop) for se, sop in listed if se and sop]
        if not pairs:
            where = f"series {series} of study {study}" if series else f"study {study}"
            raise NotFound(f"the PACS has no {where}, or no instances in it")
        if instances:
            known = {sop for _, sop in pairs}
            missing = [uid for uid in instances if uid not in known]
            if missing:
                scope = "series" if series else "study"
                raise NotFound(f"the PACS has no instance {missing[0]} in the {scope}")
            wanted = set(instances)
            pairs = [(se, sop) for se, sop in pairs if sop in wanted]
        return pairs

    def search_studies(self, filters: dict[str, str], limit: int, offset: int) -> list[Dataset]:
        """QIDO-RS: studies matching ``filters`` (keyword -> DICOM match value)."""
        found = self._call("search for studies", lambda: self.client.search_for_studies(
            search_filters=filters, fields=list(STUDY_FIELDS), limit=limit, offset=offset,
        ))
        return [_dataset(d) for d in found]

    def search_series(self, study: str, limit: int) -> list[Dataset]:
        found = self._call("search for series", lambda: self.client.search_for_series(
            study_instance_uid=study, fields=list(SERIES_FIELDS), limit=limit,
        ))
        if not found:
            raise NotFound(f"the PACS has no study {study}, or no series in it")
        return [_dataset(d) for d in found]

    def search_instances(
        self, study: str, series: str, limit: int, sop: str | None = None
    ) -> list[Instance]:
        """The instances of a series as a search describes them (geometry, size, frames: no
        pixels), as :class:`Instance` so that :func:`slice_order` orders them."""
        filters = {"SOPInstanceUID": sop} if sop else None
        found = self._call("search for instances", lambda: self.client.search_for_instances(
            study_instance_uid=study, series_instance_uid=series, fields=list(INSTANCE_FIELDS),
            search_filters=filters, limit=limit,
        ))
        listed = [Instance(study, series, str(ds.get("SOPInstanceUID", "")), ds)
                  for ds in map(_dataset, found)]
        listed = [i for i in listed if i.sop_uid and (sop is None or i.sop_uid == sop)]
        if not listed:
            what = f"instance {sop} in series {series}" if sop else f"series {series}"
            raise NotFound(f"the PACS has no {what} of study {study}")
        return listed

    def retrieve(self, study: str, series: str, sop: str) -> Instance:
        dataset = self._call("retrieve an instance", lambda: self.client.retrieve_instance(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
        ))
        return Instance(study, series, sop, dataset)

    def store(self, study: str, datasets: Sequence[Dataset]) -> list[dict[str, str]]:
        """STOW-RS into ``study``; what the PACS says it stored."""
        try:
            answer = self.client.store_instances(datasets=list(datasets), study_instance_uid=study)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "no status"
            log.warning("the PACS refused a store", extra={"pacs": self.url, "status": status})
            raise PacsRefused(f"the PACS refused to store the results (HTTP {status})") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self._unavailable("store the results", exc) from None
        except AnswerTooLarge as exc:  # an answer to a store is a few lines of DICOM JSON
            raise self._unreadable("store the results", exc) from None
        except _UNREADABLE as exc:
            raise self._unreadable("store the results", exc) from None
        failed = getattr(answer, "FailedSOPSequence", None)
        if failed:
            reason = getattr(failed[0], "FailureReason", "unknown")
            raise PacsRefused(f"the PACS refused {len(failed)} of the results (failure reason {reason})")
        return [
            {"sop_class_uid": str(item.ReferencedSOPClassUID),
             "sop_instance_uid": str(item.ReferencedSOPInstanceUID)}
            for item in getattr(answer, "ReferencedSOPSequence", [])
        ]

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except AnswerTooLarge:
            raise PayloadTooLarge(
                f"the PACS's answer when asked to {what} is larger than the {self.max_mb:g} MB "
                "an upload may be (CAMSERVE_MAX_UPLOAD_MB)") from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 404:
                raise NotFound(f"the PACS answered 404 when asked to {what}: no such study, series "
                               "or instance") from None
            log.warning("the PACS failed", extra={"pacs": self.url, "status": status, "call": what})
            raise PacsUnavailable(f"the PACS answered HTTP {status} when asked to {what}") from None
        except (requests.ConnectionError, requests.Timeout, OSError) as exc:
            raise self._unavailable(what, exc) from None
        except _UNREADABLE as exc:
            # An answer dicomweb-client or pydicom cannot read (not JSON, not multipart, not
            # DICOM, no Content-Type): the PACS is at fault, not the request, and never a 500.
            raise self._unreadable(what, exc) from None

    def _unreadable(self, what: str, exc: Exception) -> PacsUnavailable:
        log.warning("the PACS answered something unreadable", extra={
            "pacs": self.url, "call": what, "reason": f"{type(exc).__name__}: {exc}"})
        return PacsUnavailable(f"the PACS's answer could not be read when asked to {what}")

    def _unavailable(self, what: str, exc: Exception) -> PacsUnavailable:
        log.warning("the PACS could not be reached", extra={
            "pacs": self.url, "call": what, "reason": f"{type(exc).__name__}: {exc}"})
        return PacsUnavailable(f"the PACS could not be reached in time to {what}; retry later")


# What the searches ask for beyond the PACS's defaults. Studies: date, time, accession,
# modalities, description, patient's name and id, numbers of series and instances.
STUDY_FIELDS = ("00080020", "00080030", "00080050", "00080061", "00081030", "00100010", "00100020",
                "00201206", "00201208")
# Series: modality, description, number, number of instances.
SERIES_FIELDS = ("00080060", "0008103E", "00200011", "00201209")
# Instances: SOP class, manufacturer, instance number, position and orientation (the viewing
# order), frames, rows, columns, bits allocated, samples per pixel.
INSTANCE_FIELDS = ("00080016", "00080070", "00200013", "00200032", "00200037", "00280008",
                   "00280010", "00280011", "00280100", "00280002")


def _dataset(found: dict[str, Any]) -> Dataset:
    """A search's DICOM JSON as a data set; an attribute pydicom cannot read is left out
    (a PACS's answer is not ours to validate, and one bad value must not hide a study)."""
    ds = Dataset()
    if not isinstance(found, dict):  # a PACS's list may hold anything: an entry without attributes
        return ds
    for tag, element in found.items():
        try:
            ds.update(Dataset.from_json({tag: element}))
        except Exception:  # any unreadable attribute is only left out
            log.debug("left out an unreadable attribute of a search answer", extra={"tag": tag})
    return ds


def _value(dataset: dict[str, Any], tag: str) -> str | None:
    element = dataset.get(tag) if isinstance(dataset, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]) if isinstance(values, list) and values else None


def slice_order(instances: Sequence[Instance]) -> list[Instance]:
    """A series in viewing order: by position along the slice normal where every instance has
    a position and orientation, else by InstanceNumber, else as the PACS listed them."""
    def position(ds: Dataset) -> float | None:
        try:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            iop = [float(v) for v in ds.ImageOrientationPatient]
        except (AttributeError, TypeError, ValueError):
            return None
        row, col = iop[:3], iop[3:]
        normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
                  row[0] * col[1] - row[1] * col[0])
        return sum(p * n for p, n in zip(ipp, normal, strict=True))

    positions = [position(i.dataset) for i in instances]
    if all(p is not None for p in positions):
        order = sorted(range(len(instances)), key=lambda k: positions[k] or 0.0)
        return [instances[k] for k in order]
    numbers = [getattr(i.dataset, "InstanceNumber", None) for i in instances]
    if all(n is not None for n in numbers):
        order = sorted(range(len(instances)), key=lambda k: int(numbers[k] or 0))
        return [instances[k] for k in order]
    return list(instances)
