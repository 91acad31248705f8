"""One real Orthanc per test module of this folder, on free loopback ports with a temporary
storage folder (tests/dicomweb/orthanc.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dicomweb.orthanc import Orthanc, start_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield pacs
    finally:
        pacs.stop()
