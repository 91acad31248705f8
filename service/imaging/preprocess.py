"""Model input preparation that never crops.

The whole frame is resized to the model's input size (aspect ratio not kept), so the model's
feature grid covers the entire image and a map brought back to the original size with one
resize lines up with it pixel for pixel. Normalisation happens on the worker's device.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_for_model(image: Image.Image, input_size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 array of the whole image at ``input_size`` = (height, width)."""
    height, width = input_size
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)
