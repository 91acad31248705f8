"""The worker: owns the models of one device and computes batches of work items.

Everything here runs on the worker's own thread; no torch object leaves it. Results are
numpy arrays and Python numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from service.cams import get_method
from service.cams.extractor import SampleMap, explain_batch, resize_map
from service.engine.jobs import ItemResult, MapResult, WorkItem
from service.models.catalog import ModelInfo
from service.models.loader import LoadedModel, load_model
from service.models.spec import ModelSpec
from service.quality.serving import add_faithfulness

log = logging.getLogger(__name__)


def resolve_devices(setting: str) -> list[torch.device]:
    """One device per worker. ``auto`` takes every visible CUDA device, else the CPU."""
    devices: list[torch.device] = []
    for name in setting.split(","):
        if name == "auto":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            found = [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
        else:
            device = torch.device(name)
            if device.type == "cuda":
                if not torch.cuda.is_available():
                    raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available")
                device = torch.device("cuda", device.index or 0)
                if device.index is not None and device.index >= torch.cuda.device_count():
                    raise RuntimeError(
                        f"device {name!r} was asked for, but only {torch.cuda.device_count()} "
                        "CUDA devices are visible"
                    )
            found = [device]
        devices.extend(d for d in found if d not in devices)
    return devices


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def warm_batch_sizes(max_batch_size: int, device: torch.device | None = None) -> list[int]:
    """The batch sizes a worker will see, each of which may pick its own kernels (cuDNN and
    oneDNN choose and cache per shape): every size up to 16, then powers of two and the maximum.
    The same on every ``device``; the argument is accepted for callers that pass it."""
    sizes = set(range(1, min(max_batch_size, 16) + 1)) | {max_batch_size}
    size = 32
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class Worker:
    """Owns the models of one device. ``threads`` sets torch's intra-op threads (0: the cores);
    ``channels_last`` stores conv weights and inputs NHWC, which is faster for conv nets."""

    def __init__(self, device: torch.device, threads: int = 0, channels_last: bool = True) -> None:
        self.device = device
        self.threads = threads
        self.channels_last = channels_last
        self.models: dict[str, LoadedModel] = {}

    def load(self, specs: Sequence[ModelSpec]) -> dict[str, ModelInfo]:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads or available_cores())
        for spec in specs:
            started = time.perf_counter()
            loaded = load_model(spec, self.device)
            if self.channels_last:
                loaded.module.to(memory_format=torch.channels_last)
            self.models[spec.name] = loaded
            log.info(
                "model loaded",
                extra={"model": spec.name, "device": str(self.device),
                       "ms": round((time.perf_counter() - started) * 1000, 1)},
            )
        return {name: loaded.info() for name, loaded in self.models.items()}

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """A forward and a Grad-CAM pass per model and batch size, so no request pays set-up."""
        for loaded in self.models.values():
            height, width = loaded.spec.input_size
            for size in batch_sizes:
                inputs = self._to_tensor(loaded, [np.zeros((height, width, 3), np.uint8)] * size)
                with torch.inference_mode():
                    loaded.module(inputs)
                explain_batch(
                    loaded.module, loaded.modules, inputs, [loaded.default_layer],
                    [get_method("gradcam")], [None] * size,
                )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        """One batch of compatible items (same model, methods and layers)."""
        started = time.perf_counter()
        loaded = self.models[items[0].model]
        inputs = self._to_tensor(loaded, [item.pixels for item in items])
        spec = items[0].explain
        if spec is None:
            with torch.inference_mode():
                logits = loaded.module(inputs)
            per_sample_maps: list[list[SampleMap]] = [[] for _ in items]
        else:
            params = dict(spec.method_params)
            output = explain_batch(
                loaded.module, loaded.modules, inputs, spec.layers,
                [get_method(name, dict(params.get(name, ()))) for name in spec.methods],
                [item.explain.classes if item.explain else None for item in items],
                eigen_smooth=spec.eigen_smooth,
                aug_smooth=spec.aug_smooth,
            )
            logits, per_sample_maps = output.logits, output.maps
        probabilities = logits.float().softmax(dim=1)
        results = []
        for row, item in enumerate(items):
            probs = probabilities[row]
            top = torch.topk(probs, k=min(item.topk, probs.numel()))
            predictions = list(zip(top.indices.tolist(), top.values.tolist(), strict=False))
            explanations = [
                self._finish_map(item, sample.method, sample.class_idx,
                                 float(probs[sample.class_idx]), sample.grid)
                for sample in per_sample_maps[row]
            ]
            results.append(ItemResult(predictions, explanations, 0.0, 0.0))
        if any(item.explain is not None and item.explain.evaluate_steps for item in items):
            add_faithfulness(loaded.module, inputs, items, per_sample_maps, results)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_ms = (time.perf_counter() - started) * 1000
        for result in results:
            result.compute_ms = compute_ms
        return results

    def _finish_map(
        self, item: WorkItem, method: str, class_idx: int, score: float, grid: torch.Tensor
    ) -> MapResult:
        spec = item.explain
        assert spec is not None
        mask = grid if spec.mask_size is None else resize_map(grid, spec.mask_size)
        display = None if spec.display_size is None else resize_map(grid, spec.display_size)
        return MapResult(
            method=method,
            layers=spec.layers,
            class_idx=class_idx,
            score=score,
            mask=mask.float().cpu().numpy(),
            display=None if display is None else display.float().cpu().numpy(),
        )

    def _to_tensor(self, loaded: LoadedModel, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(pixels)).to(self.device, non_blocking=True)
        images = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(loaded.spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.spec.std, device=self.device).view(1, 3, 1, 1)
        normalised = (images - mean) / std
        if self.channels_last:
            return normalised.contiguous(memory_format=torch.channels_last)
        return normalised
