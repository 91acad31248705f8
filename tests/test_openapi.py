"""The committed openapi.json is exactly what the app generates, and documents everything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.openapi import document

ROOT = Path(__file__).resolve().parent.parent


def test_committed_openapi_matches_the_app() -> None:
    committed = json.loads((ROOT / "openapi.json").read_text())
    assert committed == document(), "openapi.json is stale: run `make openapi` and commit it"


def _properties(schema: dict[str, Any]) -> dict[str, Any]:
    return schema.get("properties", {})  # type: ignore[no-any-return]


def test_every_field_has_a_description_and_an_example() -> None:
    spec = document()
    missing = []
    for name, schema in spec["components"]["schemas"].items():
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        for field, prop in _properties(schema).items():
            if "description" not in prop:
                missing.append(f"{name}.{field}: description")
            if "examples" not in prop and "example" not in prop and "$ref" not in prop \
                    and "items" not in prop:
                missing.append(f"{name}.{field}: example")
    assert not missing, missing


def test_every_operation_documents_its_errors() -> None:
    spec = document()
    for path, operations in spec["paths"].items():
        for verb, operation in operations.items():
            if path.startswith("/explain") or path.startswith("/predict"):
                for status in ("400", "404", "413", "415", "422", "503", "504", "500"):
                    assert status in operation["responses"], (path, verb, status)
            assert operation.get("summary"), (path, verb)
