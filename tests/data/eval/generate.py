"""Writes the small labelled set ``python -m service.evaluate tests/data/eval`` runs on.

The two photos of ``tests/data`` (chelsea.png: class 285 "Egyptian cat"; coffee.png: class 967
"espresso") are shrunk and pasted at known places on plain and noisy 320x240 backgrounds, so
each image's box is exact. Deterministic: running it again rewrites the same files.

    python tests/data/eval/generate.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
SIZE = (320, 240)  # width, height

# (file, photo, class index, background, photo width, top-left corner)
LAYOUT = [
    ("cat_grey.png", "chelsea.png", 285, "grey", 150, (20, 30)),
    ("cat_noise.png", "chelsea.png", 285, "noise", 170, (130, 100)),
    ("cat_blur.png", "chelsea.png", 285, "blurred_noise", 140, (160, 20)),
    ("cat_blue.png", "chelsea.png", 285, "blue", 160, (40, 110)),
    ("coffee_grey.png", "coffee.png", 967, "grey", 150, (150, 20)),
    ("coffee_noise.png", "coffee.png", 967, "noise", 160, (20, 120)),
    ("coffee_blur.png", "coffee.png", 967, "blurred_noise", 140, (90, 90)),
    ("coffee_green.png", "coffee.png", 967, "green", 170, (140, 110)),
]


def background(kind: str, seed: int) -> Image.Image:
    width, height = SIZE
    rng = np.random.default_rng(seed)
    if kind == "noise":  # 4x4-pixel blocks of uniform noise: busy, yet a small file
        blocks = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
        return Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))
    if kind == "blurred_noise":
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        return noise.filter(ImageFilter.GaussianBlur(6))
    colour = {"grey": (128, 128, 128), "blue": (70, 110, 170), "green": (90, 140, 80)}[kind]
    return Image.new("RGB", SIZE, colour)


def main() -> None:
    labels = []
    for seed, (name, photo, class_idx, kind, photo_width, (x, y)) in enumerate(LAYOUT):
        source = Image.open(DATA / photo).convert("RGB")
        photo_height = round(source.height * photo_width / source.width)
        pasted = source.resize((photo_width, photo_height), Image.Resampling.LANCZOS)
        canvas = background(kind, seed)
        canvas.paste(pasted, (x, y))
        canvas.save(HERE / name, optimize=True)
        labels.append({"file": name, "class_idx": class_idx,
                       "box": [x, y, x + photo_width, y + photo_height]})
    (HERE / "labels.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in labels))


if __name__ == "__main__":
    main()
