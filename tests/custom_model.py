"""A small custom model for tests: a 3-class resnet18 with saved weights and a models file."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

LABELS = ["normal", "benign", "malignant"]
INPUT_SIZE = (128, 96)


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


def write_models_file(folder: Path) -> Path:
    """Save the weights, a labels file and a TOML models file declaring them; return the latter."""
    torch.save(build().state_dict(), folder / "tiny.pt")
    digest = hashlib.sha256((folder / "tiny.pt").read_bytes()).hexdigest()
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    path = folder / "models.toml"
    path.write_text(f"""
[[models]]
name = "tiny_resnet"
architecture = "resnet18"
weights = "tiny.pt"
sha256 = "{digest}"
num_classes = 3
labels = "labels.txt"
input_size = [{INPUT_SIZE[0]}, {INPUT_SIZE[1]}]
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
display_name = "Tiny ResNet"
version = "2024-05"
""")
    return path


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
