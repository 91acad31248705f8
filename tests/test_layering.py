"""The package's layering: no torch under the HTTP layer, no import cycles between modules.

The HTTP layer (``service.api``) validates requests against plain catalogues of models and
methods (:mod:`service.models.catalog`, :mod:`service.methods`) and hands work to the engine; it
must never pull in torch, directly or through the method registry, so it stays cheap to import
and cannot touch a model by accident.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def api_modules() -> list[str]:
    return sorted(module_name(path) for path in (SERVICE / "api").rglob("*.py"))


_BLOCK_TORCH = """
import importlib, importlib.abc, sys, traceback

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported")
        return None

sys.meta_path.insert(0, NoTorch())
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if str(exc) != "torch imported":
            raise
        chain = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
        path = [f.split("/service/", 1)[1] for f in chain if "/service/" in f]
        print(name, "<-", " <- ".join(reversed(path)))
"""


def torch_importers(modules: list[str]) -> list[str]:
    """The modules among ``modules`` whose import, in a fresh interpreter where importing torch
    fails, reaches torch; each with the files that led there, the one importing torch first."""
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, *modules],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return done.stdout.splitlines()


def test_every_module_of_the_http_layer_imports_without_torch() -> None:
    modules = api_modules()
    assert "service.api.routes.inference" in modules and "service.api.options" in modules
    assert torch_importers(modules) == []


def test_the_check_sees_torch_when_a_module_imports_it() -> None:
    # The check itself: a module that imports torch is reported.
    assert torch_importers(["service.config", "service.cams"]) == [
        "service.cams <- cams/gradient.py <- cams/__init__.py"
    ]
