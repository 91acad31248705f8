"""``python -m tests.fatal_server --port N``: the real ``python -m service`` whose workers are
fakes (tests.engine.fakes) that fail with a sticky CUDA error on an image whose pixels are 66,
for the test of the exit status after a fatal device error (tests/test_fatal_exit.py).

With ``CAMSERVE_TEST_REAL_CUDA_FAULT=1`` the error is a real one: an out-of-bounds index on
the GPU, which triggers a device-side assert (the ``cuda`` test of the same file). With
``CAMSERVE_TEST_LOAD_FAILS=1`` building a worker fails, so the models never load."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

from service.__main__ import main
from service.engine.jobs import ItemResult, WorkItem
from tests.engine.fakes import FakeWorker, Script, tag_of

REAL_FAULT = os.environ.get("CAMSERVE_TEST_REAL_CUDA_FAULT") == "1"
SCRIPT = Script(fatal=set() if REAL_FAULT else {66},
                builds_allowed=0 if os.environ.get("CAMSERVE_TEST_LOAD_FAILS") == "1" else None)


class RealFault(FakeWorker):
    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        if 66 in {tag_of(item) for item in items}:
            values = torch.zeros(4, device="cuda")
            values[torch.tensor([1 << 20], device="cuda")].sum().item()  # device-side assert
        return super().compute(items)


def factory(device: torch.device) -> FakeWorker:
    if REAL_FAULT:
        return RealFault(device, SCRIPT)
    return SCRIPT.factory(device)


if __name__ == "__main__":
    main(sys.argv[1:], worker_factory=factory)
