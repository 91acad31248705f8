"""``python -m service.bench``: what each CAM method costs, next to TorchCAM and pytorch-grad-cam.

For the default model (mobilenet_v2) on one 224x224 image this prints, per method: the passes it
runs, milliseconds at batch 1, milliseconds per image at batch 8, and both as a ratio to a plain
forward pass of the same batch measured in the same run; then the time TorchCAM 0.5 and
pytorch-grad-cam 1.5.7 (the ``dev`` extras) take for the same method at batch 1, when installed.

Timings are medians of a few runs after a warm-up run. Methods costing one forward pass per
channel (the Score-CAM family, Ablation-CAM) are timed once, at batch 1 only; SS-CAM and IS-CAM
run with ``top_k_channels=32`` (their exact cost is N times Score-CAM's). ``--quick`` also skips
the libraries' exact Score-CAM and Ablation-CAM (about 40 s each on two CPU threads).
Numbers only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.cams import CAMMethod, get_method, method_names
from service.cams.extractor import explain_batch
from service.models.loader import LoadedModel, load_model
from service.models.spec import embedded_default

GROUP = ("gradcam", "gradcampp", "xgradcam", "layercam")
# Methods that cost a pass per channel: timed once, at batch 1, with these options.
EXPENSIVE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("scorecam", {}),
    ("scorecam", {"top_k_channels": 128}),
    ("sscam", {"top_k_channels": 32}),
    ("iscam", {"top_k_channels": 32}),
    ("ablationcam", {}),
)
EXPENSIVE_NAMES = {name for name, _ in EXPENSIVE}
SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "chelsea.png"


@dataclass
class Row:
    label: str
    passes: str
    ms1: float
    ms8: float | None = None
    references: dict[str, float | None] = field(default_factory=dict)


def timed(run: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median milliseconds of ``repeats`` runs."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def sample_input(loaded: LoadedModel, device: torch.device) -> Tensor:
    """The bundled cat photo when present (Score-CAM's cost depends on the image), else noise."""
    height, width = loaded.spec.input_size
    if SAMPLE.is_file():
        from PIL import Image  # only the benchmark decodes a file

        image = Image.open(SAMPLE).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    else:
        pixels = torch.rand((3, height, width), generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(loaded.spec.mean).view(3, 1, 1)
    std = torch.tensor(loaded.spec.std).view(3, 1, 1)
    return ((pixels - mean) / std)[None].to(device)


class Bench:
    """Times this service's methods through the model owner's runner: on the model itself in
    PyTorch's default memory format, as the libraries run it; the Score-CAM family's masked
    passes run through the owner's folded, channels-last copy, as on the worker."""

    def __init__(self, loaded: LoadedModel, image: Tensor, repeats: int, exact: bool = True) -> None:
        """``exact=False``: the network the worker serves through instead (the owner's lean
        copy, where :meth:`LoadedModel.make_lean` built one)."""
        self.loaded = loaded
        self.runner = loaded.runner((loaded.default_layer,), exact=exact)
        self.image = image
        self.repeats = repeats
        device = image.device
        self.sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        )

    def batch(self, size: int) -> Tensor:
        return self.image.expand(size, -1, -1, -1).contiguous(memory_format=self._layout())

    def _layout(self) -> torch.memory_format:
        """The sample's own layout: channels-last when it was given so (the worker's inputs)."""
        image = self.image
        nhwc = image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
        return torch.channels_last if nhwc else torch.contiguous_format

    def forward_ms(self, size: int) -> float:
        inputs = self.batch(size)

        def run() -> None:
            with torch.inference_mode():
                self.runner.forward(inputs)

        run()
        return timed(run, self.repeats * 2, self.sync)

    def ours(self, methods: list[CAMMethod], size: int, repeats: int, warm: bool = True) -> float:
        inputs = self.batch(size)
        layer = self.loaded.default_layer

        def run() -> None:
            explain_batch(self.runner, inputs, [layer], methods, [None] * size)

        if warm:
            run()
        return timed(run, repeats, self.sync)

    def grid(self, method: CAMMethod) -> Tensor:
        out = explain_batch(self.runner, self.image, [self.loaded.default_layer], [method], [None])
        return out.maps[0][0].grid


class References:
    """TorchCAM's and pytorch-grad-cam's extractors for the same methods, when installed."""

    def __init__(self, loaded: LoadedModel, image: Tensor, quick: bool) -> None:
        # The libraries need parameters that require grad: they get their own copy of the model.
        self.model = loaded.trainable_copy()
        self.layer = loaded.default_layer
        self.image = image
        self.quick = quick
        with torch.inference_mode():
            self.target = int(self.model(image).argmax())
        logging.getLogger("torchcam").setLevel(logging.ERROR)

    def torchcam(self, name: str) -> Callable[[], object] | None:
        try:
            import torchcam.methods as tcm  # an optional dev dependency
        except ImportError:
            return None
        classes = {"gradcam": tcm.GradCAM, "gradcampp": tcm.GradCAMpp, "xgradcam": tcm.XGradCAM,
                   "layercam": tcm.LayerCAM, "cam": tcm.CAM, "smoothgradcampp": tcm.SmoothGradCAMpp,
                   "scorecam": tcm.ScoreCAM}
        if name not in classes or (self.quick and name == "scorecam"):
            return None
        extractor = classes[name](self.model, self.layer)

        def run() -> object:
            scores = self.model(self.image)
            return extractor(self.target, scores)

        return run

    def grad_cam(self, name: str) -> Callable[[], object] | None:
        try:
            import pytorch_grad_cam as pgc  # an optional dev dependency
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        except ImportError:
            return None
        classes = {"gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
                   "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM,
                   "gradcam_elementwise": pgc.GradCAMElementWise, "eigencam": pgc.EigenCAM,
                   "eigengradcam": pgc.EigenGradCAM, "kpca_cam": pgc.KPCA_CAM, "fem": pgc.FEM,
                   "random": pgc.RandomCAM, "shapleycam": pgc.ShapleyCAM, "fullgrad": pgc.FullGrad,
                   "scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}
        if name not in classes or (self.quick and name in ("scorecam", "ablationcam")):
            return None
        layers = [] if name == "fullgrad" else [self.model.get_submodule(self.layer)]
        with contextlib.redirect_stdout(io.StringIO()):
            cam = classes[name](model=self.model, target_layers=layers)
        targets = [ClassifierOutputTarget(self.target)]

        def run() -> object:
            # Its progress bars go to stderr; the table should stay readable.
            with contextlib.redirect_stderr(io.StringIO()):
                return cam(input_tensor=self.image, targets=targets)

        return run


def reference_ms(run: Callable[[], object] | None, repeats: int, sync: Callable[[], None]) -> float | None:
    if run is None:
        return None
    if repeats > 1:
        run()
    return timed(run, repeats, sync)


def pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def measure(bench: Bench, refs: References | None, log: Callable[[str], None],
            only: set[str] | None = None) -> tuple[list[Row], str]:
    """Rows of every method (or of ``only``), the shared-pass group and the expensive ones."""
    rows: list[Row] = []
    info = bench.loaded.info()
    for name in method_names():
        if name in EXPENSIVE_NAMES or (only is not None and name not in only):
            continue
        method = get_method(name)
        reason = type(method).describe().unsuitable(info)
        if reason:
            log(f"  {name}: skipped, {reason}")
            continue
        ms1 = bench.ours([method], 1, bench.repeats)
        ms8 = bench.ours([method], 8, max(1, bench.repeats // 2)) / 8
        row = Row(name, type(method).passes, ms1, ms8)
        if refs is not None:
            row.references = {
                "torchcam": reference_ms(refs.torchcam(name), bench.repeats, bench.sync),
                "grad-cam": reference_ms(refs.grad_cam(name), bench.repeats, bench.sync),
            }
        rows.append(row)
        log(f"  {name}: {ms1:.1f} ms")
    if only is None or set(GROUP) <= only:
        group = [get_method(name) for name in GROUP]
        rows.append(Row(" + ".join(GROUP), "1 forward + 1 backward (shared)",
                        bench.ours(group, 1, bench.repeats),
                        bench.ours(group, 8, max(1, bench.repeats // 2)) / 8))
    exact_grid = None
    note = ""
    for name, options in EXPENSIVE:
        if only is not None and name not in only:
            continue
        method = get_method(name, options)
        ms1 = bench.ours([method], 1, 1, warm=False)
        label = " ".join([name, *(f"{k}={v}" for k, v in options.items())])
        row = Row(label, type(method).passes, ms1)
        if refs is not None and not options:
            row.references = {
                "torchcam": reference_ms(refs.torchcam(name), 1, bench.sync),
                "grad-cam": reference_ms(refs.grad_cam(name), 1, bench.sync),
            }
        if name == "scorecam" and not options:
            exact_grid = bench.grid(method)
        elif name == "scorecam" and exact_grid is not None:
            r = pearson(bench.grid(method), exact_grid)
            note = f"Score-CAM top_k_channels=128 against exact Score-CAM on this image: Pearson r {r:.4f}"
        rows.append(row)
        log(f"  {label}: {ms1:.1f} ms")
    return rows, note


def render(rows: list[Row], forward1: float, forward8: float, references: bool) -> str:
    def cell(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = ["method", "passes", "ms b1", "x fwd b1", "ms/img b8", "x fwd b8"]
    if references:
        header += ["TorchCAM ms b1", "grad-cam ms b1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(f"| forward pass | 1 forward | {forward1:.1f} | 1.00 | {forward8 / 8:.1f} | 1.00 |"
                 + (" - | - |" if references else ""))
    for row in rows:
        cells = [row.label, row.passes, cell(row.ms1), cell(row.ms1 / forward1, 2),
                 cell(row.ms8), cell(None if row.ms8 is None else row.ms8 * 8 / forward8, 2)]
        if references:
            cells += [cell(row.references.get("torchcam")), cell(row.references.get("grad-cam"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per median (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="skip the libraries' exact Score-CAM and Ablation-CAM")
    parser.add_argument("--no-references", action="store_true", help="time this service only")
    parser.add_argument("--methods", help="comma-separated methods to time (default: all)")
    args = parser.parse_args(argv)
    only = {m.strip() for m in args.methods.split(",") if m.strip()} if args.methods else None
    unknown = sorted((only or set()) - set(method_names()))
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; known: {', '.join(method_names())}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = load_model(embedded_default(), device)
    image = sample_input(loaded, device)
    bench = Bench(loaded, image, args.repeats)
    refs = None if args.no_references else References(loaded, image, args.quick)
    forward1, forward8 = bench.forward_ms(1), bench.forward_ms(8)

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"camserve CAM benchmark: {loaded.spec.name}, layer {loaded.default_layer}, "
        f"{device}, {args.threads} threads, torch {torch.__version__}")
    log(f"forward pass: {forward1:.1f} ms at batch 1, {forward8 / 8:.1f} ms/image at batch 8")
    rows, note = measure(bench, refs, log, only)
    print()
    print(render(rows, forward1, forward8, refs is not None))
    print()
    if note:
        print(note)
    print("Score-CAM family and Ablation-CAM: timed once at batch 1; SS-CAM and IS-CAM with "
          "top_k_channels=32 and their default num_samples. Medians of "
          f"{args.repeats} runs otherwise. The model is in PyTorch's default (NCHW) memory format for "
          "all three; this service's Score-CAM family runs its masked batches through the model "
          "owner's folded (conv + batch norm), channels-last copy of it.")


if __name__ == "__main__":
    main()

