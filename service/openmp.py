"""OpenMP settings that must be in place before torch loads; ``python -m service`` imports
this module before anything that imports torch.

``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP threads sleep as soon as a parallel region ends
instead of spinning for the next one. A serving process shares its cores with decoding,
PNG encoding and the event loop; spinning threads take those cores away and slow both.
On a 2-core machine under load this served 7-16% more Grad-CAM requests; a lone request
computes about 10% slower, since the threads must be woken for every operator (README,
"Settings"). A value already in the environment is kept.
"""

from __future__ import annotations

import os

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

for _name, _value in DEFAULTS.items():
    os.environ.setdefault(_name, _value)
