"""``python -m service`` sets OpenMP's waiting before torch loads, and keeps the user's values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Records the environment at the moment torch is first imported, then imports the entry point
# and the app it runs.
PROBE = """
import os, sys
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
            seen["env"] = ",".join(os.environ.get(k, "<unset>") for k in names)

sys.meta_path.insert(0, Watch())
import service.__main__
import service.main  # what python -m service imports next, where it serves (not in a supervisor)
print(seen.get("env", "<torch never imported>"))
"""


@pytest.mark.parametrize(("given", "expected"), [
    ({}, "PASSIVE,10000"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE,<unset>"),
    ({"GOMP_SPINCOUNT": "300000"}, "PASSIVE,300000"),
])
def test_openmp_waiting_is_set_before_torch_loads(given: dict[str, str], expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == expected
