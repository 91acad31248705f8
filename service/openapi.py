"""``python -m service.openapi``: print the app's OpenAPI document (what openapi.json holds)."""

from __future__ import annotations

import json
import sys

from service.config import Settings
from service.main import create_app


def document() -> dict[str, object]:
    # Defaults only: the document must not depend on the environment it is generated in.
    return create_app(Settings()).openapi()


if __name__ == "__main__":
    json.dump(document(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
