"""Score CAM methods on a labelled folder: ``python -m service.evaluate DIR``.

``DIR`` holds images and ``labels.jsonl``, one JSON object a line::

    {"file": "cat_grey.png", "class_idx": 285, "box": [20, 30, 170, 130]}

``box`` is ``[x0, y0, x1, y1]`` in pixels of the image (``x1``, ``y1`` exclusive). For every
method (all registered ones, or ``--methods``) each image's map for its labelled class is
scored by:

- pointing game: share of images whose map peaks inside the box, 15 pixels of tolerance at the
  image's own size (Zhang et al. 2016);
- energy: mean share of the map's mass inside the box (Score-CAM's energy-based pointing game);
- deletion and insertion AUC (RISE, Petsiuk et al. 2018) at the model's input size, ``--steps``
  steps: lower deletion and higher insertion are better; ``ins-del`` sums both up.

``--params`` sets methods' parameters as ``/explain``'s ``method_params`` does, e.g.
``'{"scorecam": {"top_k_channels": 128}}'``; such a row is labelled with them.
The table goes to stdout; ``--json PATH`` also writes the rows. A method that cannot run on the
model (CAM without a linear head, a transformer-only method) gets a row saying why.
``tests/data/eval`` is a small generated set to run it on (see its ``generate.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.cams import get_method, method_names
from service.cams.extractor import explain_batch, resize_map
from service.imaging.preprocess import resize_for_model
from service.models.loader import LoadedModel, load_model
from service.models.spec import registered_specs
from service.progress import tracked
from service.quality.faithfulness import faithfulness
from service.quality.introspection import model_input
from service.quality.localization import Box, energy_in_box, pointing_game

POINTING_TOLERANCE = 15  # pixels at the image's own size, as in the pointing game's paper


@dataclass(frozen=True)
class Sample:
    file: str
    class_idx: int
    box: Box
    image: Image.Image


@dataclass
class Row:
    method: str
    images: int
    pointing_game: float | None = None
    energy: float | None = None
    deletion_auc: float | None = None
    insertion_auc: float | None = None
    seconds_per_image: float | None = None
    error: str | None = None


def read_folder(folder: Path, num_classes: int) -> list[Sample]:
    labels = folder / "labels.jsonl"
    if not labels.is_file():
        raise SystemExit(f"{labels} not found: the folder needs a labels.jsonl (see --help)")
    samples = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        x0, y0, x1, y1 = (int(v) for v in entry["box"])
        class_idx = int(entry["class_idx"])
        if not 0 <= class_idx < num_classes or not (x0 < x1 and y0 < y1):
            raise SystemExit(f"{labels}:{number}: class out of range or empty box: {line}")
        image = Image.open(folder / entry["file"]).convert("RGB")
        samples.append(Sample(entry["file"], class_idx, (x0, y0, x1, y1), image))
    if not samples:
        raise SystemExit(f"{labels} lists no images")
    return samples


def evaluate(
    loaded: LoadedModel, samples: Sequence[Sample], methods: Sequence[str], layers: Sequence[str],
    steps: int, batch_size: int = 8, params: Mapping[str, Mapping[str, object]] | None = None,
) -> list[Row]:
    """One row per method, averaged over ``samples``; ``params``: options per method name."""
    size = loaded.spec.input_size
    inputs = torch.cat([model_input(loaded, resize_for_model(s.image, size)) for s in samples])
    classes = torch.tensor([s.class_idx for s in samples], device=inputs.device)
    rows = []
    for name in tracked(methods, len(methods), "evaluating"):
        options = dict((params or {}).get(name, {}))
        label = " ".join([name, *(f"{k}={v}" for k, v in options.items())])
        try:
            rows.append(_score(loaded, samples, inputs, classes, name, options, label, layers,
                               steps, batch_size))
        except Exception as exc:  # a method that does not fit this model gets a row saying so
            rows.append(Row(label, len(samples), error=f"{type(exc).__name__}: {exc}"))
    return rows


def _score(
    loaded: LoadedModel, samples: Sequence[Sample], inputs: torch.Tensor, classes: torch.Tensor,
    name: str, options: Mapping[str, object], label: str, layers: Sequence[str], steps: int,
    batch_size: int,
) -> Row:
    method = get_method(name, options)
    runner = loaded.runner(layers, exact=type(method).describe().exact_network)
    started = time.perf_counter()
    grids = []
    for start in range(0, len(samples), batch_size):
        chunk = slice(start, start + batch_size)
        targets = [[int(c)] for c in classes[chunk]]
        output = explain_batch(runner, inputs[chunk], layers, [method], targets)
        grids += [sample_maps[0].grid for sample_maps in output.maps]
    elapsed = time.perf_counter() - started
    hits, energies = [], []
    for sample, grid in zip(samples, grids, strict=True):
        at_image = resize_map(grid.float(), (sample.image.height, sample.image.width))
        hits.append(pointing_game(at_image, sample.box, POINTING_TOLERANCE))
        energies.append(energy_in_box(at_image, sample.box))
    maps = torch.stack([resize_map(g.float(), loaded.spec.input_size) for g in grids])
    scores = faithfulness(runner.forward, inputs, maps, classes, steps=steps)
    return Row(
        method=label,
        images=len(samples),
        pointing_game=float(np.mean(hits)),
        energy=float(np.mean(energies)),
        deletion_auc=float(scores.deletion_auc.mean()),
        insertion_auc=float(scores.insertion_auc.mean()),
        seconds_per_image=elapsed / len(samples),
    )


def top1_correct(loaded: LoadedModel, samples: Sequence[Sample]) -> int:
    size = loaded.spec.input_size
    inputs = torch.cat([model_input(loaded, resize_for_model(s.image, size)) for s in samples])
    with torch.inference_mode():
        predicted = loaded.runner().forward(inputs).argmax(dim=1).tolist()
    return sum(p == s.class_idx for p, s in zip(predicted, samples, strict=True))


COLUMNS = ("method", "pointing", "energy", "deletion", "insertion", "ins-del", "s/image")


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table; pointing, energy, insertion and ins-del: higher is better;
    deletion: lower is better."""
    width = max(len(COLUMNS[0]), *(len(r.method) for r in rows))
    lines = [f"{COLUMNS[0]:<{width}}" + "".join(f"{c:>11}" for c in COLUMNS[1:])]
    for row in rows:
        if row.error is not None:
            lines.append(f"{row.method:<{width}}  n/a: {row.error}")
            continue
        assert row.insertion_auc is not None and row.deletion_auc is not None
        values = (row.pointing_game, row.energy, row.deletion_auc, row.insertion_auc,
                  row.insertion_auc - row.deletion_auc, row.seconds_per_image)
        lines.append(f"{row.method:<{width}}" + "".join(f"{v:>11.3f}" for v in values))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.evaluate",
        description="Score CAM methods on a folder of images with labels.jsonl "
        '({"file", "class_idx", "box": [x0, y0, x1, y1]} per line): pointing game, energy '
        "inside the box, deletion and insertion AUC.",
    )
    parser.add_argument("folder", type=Path, help="folder with the images and labels.jsonl")
    parser.add_argument("--methods", help="comma-separated methods (default: every registered one)")
    parser.add_argument("--params", help='methods\' parameters as JSON, e.g. '
                        '\'{"scorecam": {"top_k_channels": 128}}\'')
    parser.add_argument("--model", default="mobilenet_v2", help="registered model name")
    parser.add_argument("--models-file", type=Path, help="a models file, as CAMSERVE_MODELS_FILE")
    parser.add_argument("--layer", help="target layer(s), comma-separated (default: the model's)")
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


def parse_params(text: str | None, methods: Sequence[str]) -> dict[str, dict[str, object]]:
    """``--params``: a JSON object keyed by method name, each value the method's options."""
    if not text:
        return {}
    try:
        document = json.loads(text)
    except ValueError:
        raise SystemExit(f"--params must be a JSON object, got {text!r}") from None
    if not isinstance(document, dict) or not all(isinstance(v, dict) for v in document.values()):
        raise SystemExit('--params must map method names to objects, e.g. '
                         '{"scorecam": {"top_k_channels": 128}}')
    for name, options in document.items():
        if name not in methods:
            raise SystemExit(f"--params names {name!r}, which is not among the methods evaluated")
        try:
            get_method(name, options)
        except ValueError as exc:
            raise SystemExit(f"--params for {name}: {exc}") from None
    return document


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    specs = registered_specs(args.models_file)
    if args.model not in specs:
        raise SystemExit(f"unknown model {args.model!r}; registered: {', '.join(specs)}")
    known = method_names()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; valid methods: {', '.join(known)}")
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    params = parse_params(args.params, methods)
    samples = read_folder(args.folder, specs[args.model].num_classes)
    loaded = load_model(specs[args.model], torch.device(args.device))
    layers = [part.strip() for part in args.layer.split(",")] if args.layer else [loaded.default_layer]
    valid = [layer.name for layer in loaded.layers]
    if any(layer not in valid for layer in layers):
        raise SystemExit(f"unknown layer in {args.layer!r}; valid layers: {', '.join(valid)}")
    correct = top1_correct(loaded, samples)
    rows = evaluate(loaded, samples, methods, layers, args.steps, params=params)
    print(f"{len(samples)} images in {args.folder}; model {args.model}, layer {','.join(layers)}, "
          f"{args.steps} steps; top-1 correct {correct}/{len(samples)}")
    print("higher is better: pointing, energy, insertion, ins-del; lower is better: deletion")
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0 if all(r.error is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
