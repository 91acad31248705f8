"""OpenMP settings that must be in place before torch loads; ``python -m service`` imports
this module before anything that imports torch. Where ``OMP_WAIT_POLICY`` is already set,
nothing is changed; otherwise both of these are set (a ``GOMP_SPINCOUNT`` given is kept).
``uvicorn service.main:app`` and the Ray Serve deployments do not import it.

- ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP threads sleep when they run out of work
  instead of spinning. A serving process shares its cores with decoding, PNG encoding and
  the event loop; threads that spin (by default for about 3 ms after every operator) take
  those cores away and slow both. On 2 cores under load this served 7-16% more Grad-CAM
  requests.
- ``GOMP_SPINCOUNT=10000`` (GNU OpenMP, which torch's Linux wheels use): spin for about
  0.1 ms before sleeping. Operators of one forward pass follow each other within that, so
  their threads need no waking: a lone request keeps its latency (Grad-CAM, batch of 1:
  about 28 ms; 32 ms with no spinning at all), while idle threads still let go of the cores
  at once. Measured throughput under load was the same as with no spinning.

README, "Settings", has the numbers.
"""

from __future__ import annotations

import os

if "OMP_WAIT_POLICY" not in os.environ:
    # A policy the user chose is theirs whole: GOMP_SPINCOUNT would override its spinning.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
