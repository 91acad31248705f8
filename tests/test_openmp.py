"""``python -m service`` sets OpenMP's wait policy before torch loads, and keeps the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Records the environment at the moment torch is first imported, then imports the entry point.
PROBE = """
import os, sys
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY", "<unset>")

sys.meta_path.insert(0, Watch())
import service.__main__
print(seen.get("policy", "<torch never imported>"))
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_wait_policy_is_set_before_torch_loads(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == expected
