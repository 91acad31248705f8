"""``python -m tests.fatal_server --port N``: the real ``python -m service`` whose workers are
fakes (tests.engine.fakes) that fail with a sticky CUDA error on an image whose pixels are 66,
for the test of the exit status after a fatal device error (tests/test_fatal_exit.py)."""

from __future__ import annotations

import sys

import torch

from service.__main__ import main
from tests.engine.fakes import FakeWorker, Script

SCRIPT = Script(fatal={66})


def factory(device: torch.device) -> FakeWorker:
    return SCRIPT.factory(device)


if __name__ == "__main__":
    main(sys.argv[1:], worker_factory=factory)
