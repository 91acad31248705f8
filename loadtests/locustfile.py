"""Locust scenarios for ``POST /explain``: one user class per CAM method.

The runner (``python -m loadtests``) builds these classes for the methods it is asked to test and
drives them itself, but the file also works with the ``locust`` command::

    CAMSERVE_LOADTEST_METHODS=gradcam,layercam locust -f loadtests/locustfile.py \\
        --host http://127.0.0.1:8000 --headless -u 4 -t 30s

Settings read from the environment by that command line (the runner passes them as arguments):

- ``CAMSERVE_LOADTEST_METHODS``: comma-separated methods, one user class each (default ``gradcam``)
- ``CAMSERVE_LOADTEST_IMAGES``: folder of images sent round-robin (default ``tests/data``)
- ``CAMSERVE_API_KEY``: sent as ``Authorization: Bearer <key>`` when set
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any, ClassVar

import orjson
from locust import constant, task
from locust.contrib.fasthttp import FastHttpUser
from locust.exception import StopUser

DEFAULT_IMAGES = Path(__file__).resolve().parent.parent / "tests" / "data"
IMAGE_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
    ".gif": "image/gif", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff",
}


@dataclass(frozen=True)
class Image:
    name: str
    data: bytes
    content_type: str


def load_images(folder: Path) -> list[Image]:
    """Every image file directly in ``folder`` (by extension), sorted by name."""
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    images = [
        Image(path.name, path.read_bytes(), IMAGE_TYPES[path.suffix.lower()])
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_TYPES
    ]
    if not images:
        raise ValueError(
            f"no images in {folder} (looked for {', '.join(sorted(IMAGE_TYPES))})"
        )
    return images


def multipart_body(image: Image, fields: Mapping[str, str]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with the image as ``file`` and the form fields; its content type."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"\r\n'
        f"Content-Type: {image.content_type}\r\n\r\n".encode()
        + image.data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class Sample:
    """One request as the runner saw it. ``latency_ms`` runs from the intended send time."""

    method: str
    intended: float
    sent: float
    latency_ms: float
    ok: bool
    status: int
    error: str = ""
    timing: dict[str, float] | None = None


@dataclass
class Recorder:
    """Where users put their samples; bounded so a runaway cell cannot grow without end."""

    limit: int = 200_000
    samples: list[Sample] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.samples) >= self.limit

    def add(self, sample: Sample) -> None:
        if not self.full:
            self.samples.append(sample)


def _timing_of(content: bytes | None) -> dict[str, float] | None:
    try:
        timing = orjson.loads(content or b"null")["timing_ms"]
        return {key: float(timing[key]) for key in ("queue", "compute", "encode", "total")}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _error_of(status: int, content: bytes | None, exception: Any) -> str:
    if exception is not None and not status:
        return f"{type(exception).__name__}: {exception}"[:200]
    try:
        error = orjson.loads(content or b"null")["error"]
        return f"{status} {error['code']}: {error['message']}"[:200]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{status} {(content or b'')[:120].decode(errors='replace')}"


class ExplainUser(FastHttpUser):
    """Sends ``POST /explain`` for one method back to back (closed loop: no think time)."""

    abstract = True
    wait_time = constant(0)
    concurrency = 1  # connections per user: a closed-loop user has one request in flight
    network_timeout = 120.0
    connection_timeout = 30.0

    method: ClassVar[str] = "gradcam"
    images: ClassVar[list[Image]] = []
    form: ClassVar[dict[str, str]] = {}
    api_key: ClassVar[str | None] = None
    extra_headers: ClassVar[dict[str, str]] = {}
    recorder: ClassVar[Recorder | None] = None

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        fields = {"methods": self.method, **self.form}
        self._bodies = cycle([multipart_body(image, fields) for image in self.images])
        self._headers = {**self.extra_headers, "Accept": "application/json"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"

    def send(self, intended: float | None = None) -> Sample:
        """One request; latency counts from ``intended`` (open loop) or from now (closed loop)."""
        body, content_type = next(self._bodies)
        sent = time.perf_counter()
        intended = sent if intended is None else intended
        headers = {"Content-Type": content_type, **self._headers}
        with self.client.post(
            "/explain", data=body, headers=headers, name=f"/explain [{self.method}]", catch_response=True
        ) as response:
            done = time.perf_counter()
            status = response.status_code or 0
            try:
                content = response.content
            except Exception as exc:  # a body that failed to arrive (timeout, reset)
                content, status = None, 0
                response.error = exc
            ok = status == 200
            timing = _timing_of(content) if ok else None
            if ok and timing is None:
                ok = False
                error = "200 without timing_ms in the body"
            else:
                error = "" if ok else _error_of(status, content, getattr(response, "error", None))
            if ok:
                response.success()
            else:
                response.failure(error)
        sample = Sample(self.method, intended, sent, (done - intended) * 1000, ok, status, error, timing)
        if self.recorder is not None:
            self.recorder.add(sample)
        return sample

    @task
    def explain(self) -> None:
        if self.recorder is not None and self.recorder.full:
            raise StopUser()
        self.send()


def user_class_for(
    method: str,
    images: Iterable[Image],
    form: Mapping[str, str] | None = None,
    api_key: str | None = None,
    recorder: Recorder | None = None,
    timeout: float = 120.0,
    connections: int = 1,
    host: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> type[ExplainUser]:
    """A concrete user class for ``method``, e.g. ``GradcamUser``."""
    name = "".join(part.capitalize() for part in method.replace("-", "_").split("_")) + "User"
    attrs: dict[str, Any] = {
        "abstract": False,
        "method": method,
        "images": list(images),
        "form": dict(form or {}),
        "api_key": api_key,
        "recorder": recorder,
        "network_timeout": timeout,
        "concurrency": connections,
        "host": host,
        "extra_headers": dict(headers or {}),
        "__module__": __name__,
    }
    return type(name, (ExplainUser,), attrs)


def _classes_from_environment() -> dict[str, type[ExplainUser]]:
    methods = [m.strip() for m in os.environ.get("CAMSERVE_LOADTEST_METHODS", "gradcam").split(",")]
    folder = Path(os.environ.get("CAMSERVE_LOADTEST_IMAGES", DEFAULT_IMAGES))
    images = load_images(folder)
    api_key = os.environ.get("CAMSERVE_API_KEY") or None
    classes = [user_class_for(m, images, api_key=api_key) for m in methods if m]
    return {cls.__name__: cls for cls in classes}


# The `locust` command line discovers user classes among this module's globals.
if __name__ != "loadtests.locustfile":
    globals().update(_classes_from_environment())
