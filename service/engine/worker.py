"""The worker: owns the models of one device and computes batches of work items.

Everything here runs on the worker's own thread; no torch object leaves it. Results are
numpy arrays and Python numbers. Each model is a :class:`~service.models.loader.LoadedModel`,
its one owner; the worker computes only through the runner it hands out, chosen by what the
batch's methods declare.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from service.cams import CAMMethod, get_method, normalize
from service.cams.extractor import SampleMap, explain_batch
from service.engine import device_render
from service.engine.faithfulness import add_faithfulness
from service.engine.jobs import ItemResult, MapResult, WorkItem
from service.engine.pool import is_fatal_device_error, is_out_of_memory
from service.errors import ServiceError
from service.imaging.encoded import EncodedImage, host_decode
from service.models.catalog import ModelInfo
from service.models.loader import LoadedModel, load_model
from service.models.runner import Runner
from service.models.spec import ModelSpec

log = logging.getLogger(__name__)

# CAMSERVE_PRECISION: the dtype the model's forward runs in under autocast, on CUDA only.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device_type: str, precision: str, methods: Sequence[CAMMethod] = ()) -> torch.dtype | None:
    """The dtype a batch's forward runs in under autocast, or None for none: CUDA only, never
    for fp32, and never for a batch with a method that keeps full precision."""
    if device_type != "cuda" or precision == "fp32" or any(m.full_precision for m in methods):
        return None
    return PRECISIONS[precision]


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
    ``channels_last`` stores conv weights and inputs NHWC, which is faster for conv nets;
    ``fold_batch_norm`` computes through a copy of each model with batch norm folded into the
    convolutions before it (:mod:`service.models.fold`) whenever a request's methods and
    layers see the same values there as in the model itself."""

    def __init__(
        self,
        device: torch.device,
        threads: int = 0,
        channels_last: bool = True,
        fold_batch_norm: bool = True,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = device
        self.precision = precision
        self.threads = threads
        self.channels_last = channels_last
        self.fold_batch_norm = fold_batch_norm
        self.models: dict[str, LoadedModel] = {}
        # One image's forward pass in seconds, measured in warm-up (the slowest model's).
        self.seconds_per_pass: float | None = None
        # False once the device's JPEG decoder failed on a file any decoder reads (warm-up):
        # encoded inputs then take the host path at once instead of failing twice each.
        self.device_jpeg = True

    def load(self, specs: Sequence[ModelSpec]) -> dict[str, ModelInfo]:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads or available_cores())
        if self.device.type == "cuda":
            # Set, not inherited from torch's defaults: fp32 means fp32 (maps agree with the
            # CPU's), in every precision: what autocast leaves in float32, and the batches of the
            # methods that stay in float32 under bf16 and fp16 (full_precision). cuDNN picks
            # its fastest kernels per shape, once each (the warm-up's batch sizes).
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        for spec in specs:
            started = time.perf_counter()
            loaded = load_model(spec, self.device)
            loaded.make_lean(self.fold_batch_norm, self.channels_last)
            self.models[spec.name] = loaded
            log.info(
                "model loaded",
                extra={"model": spec.name, "device": str(self.device),
                       "ms": round((time.perf_counter() - started) * 1000, 1)},
            )
        return {name: loaded.info() for name, loaded in self.models.items()}

    def warm_precisions(self) -> list[bool]:
        """Whether each round of warm-up runs in full precision: the configured precision, and
        under bf16 or fp16 float32 too (the batches of full-precision methods), so neither pays
        cuDNN's choice of kernels on its first request and the pass time the request budget
        uses is the slower one's (those methods are the costly ones)."""
        return [False] if autocast_dtype(self.device.type, self.precision) is None else [False, True]

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """A forward and a Grad-CAM pass per model, batch size and precision it may run in, so
        no request pays set-up."""
        for loaded in self.models.values():
            height, width = loaded.spec.input_size
            gradcam = get_method("gradcam")
            runner = self._runner(loaded, (loaded.default_layer,), [gradcam])
            for size in batch_sizes:
                inputs = self._to_tensor(loaded, [np.zeros((height, width, 3), np.uint8)] * size)
                for full in self.warm_precisions():
                    precision = contextlib.nullcontext() if full else self.autocast()
                    with torch.inference_mode(), precision:
                        runner.forward(inputs)
                        if size == max(batch_sizes):  # warm now: what one image's pass costs here
                            self._synchronize()
                            began = time.perf_counter()
                            runner.forward(inputs)
                            self._synchronize()
                            per_image = (time.perf_counter() - began) / size
                            self.seconds_per_pass = max(self.seconds_per_pass or 0.0, per_image)
                    with contextlib.nullcontext() if full else self.autocast():
                        explain_batch(runner, inputs, [loaded.default_layer], [gradcam], [None] * size)
        if self.device.type == "cuda":
            self._warm_decoder()
        self._synchronize()

    def _warm_decoder(self) -> None:
        """Decode a small JPEG on the device, so the first request does not pay nvjpeg's
        set-up; a decoder that fails here is not used (encoded inputs take the host path)."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 30, 200)).save(buffer, format="JPEG")
        (decoded,) = self._decode([EncodedImage(buffer.getvalue(), 64, 48, None, None)])
        if isinstance(decoded, Exception):
            self.device_jpeg = False
            log.warning("the device cannot decode JPEGs; the host decodes them",
                        extra={"device": str(self.device), "reason": str(decoded)[:200]})

    def autocast(self, methods: Sequence[CAMMethod] = ()) -> AbstractContextManager[object]:
        """The model's forward in ``precision`` on CUDA (CAM maths stays float32: the
        extractor hands methods float32 activations, gradients and logits), unless one of
        ``methods`` keeps full precision; else unchanged."""
        dtype = autocast_dtype(self.device.type, self.precision, methods)
        return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release_memory(self) -> None:
        """After an out-of-memory error: collect what the failed batch left in reference
        cycles, then hand CUDA's cached blocks back so the halves find contiguous memory."""
        gc.collect()
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()

    def compute(self, items: Sequence[WorkItem]) -> list[ItemResult]:
        """One batch of compatible items (same model, methods and layers). An encoded input
        that cannot be decoded anywhere is answered with its own error (ItemResult.error),
        the rest of the batch computed without it."""
        started = time.perf_counter()
        loaded = self.models[items[0].model]
        images, bases, failures = self._inputs(loaded, items)
        kept = [item for index, item in enumerate(items) if index not in failures]
        computed = iter(self._compute(loaded, kept, images, bases, started) if kept else [])
        return [ItemResult([], [], 0.0, 0.0, error=failures[index]) if index in failures
                else next(computed) for index in range(len(items))]

    def _compute(
        self, loaded: LoadedModel, items: Sequence[WorkItem], images: torch.Tensor,
        bases: Sequence[torch.Tensor | None], started: float,
    ) -> list[ItemResult]:
        inputs = self._normalise(loaded, images)
        spec = items[0].explain
        methods: list[CAMMethod] = []
        if spec is None:
            runner = self._runner(loaded, (), [])
            with torch.inference_mode(), self.autocast():
                logits = runner.forward(inputs)
            per_sample_maps: list[list[SampleMap]] = [[] for _ in items]
        else:
            params = dict(spec.method_params)
            methods = [get_method(name, dict(params.get(name, ()))) for name in spec.methods]
            runner = self._runner(loaded, spec.layers, methods)
            with self.autocast(methods):
                output = explain_batch(
                    runner, inputs, spec.layers, methods,
                    [item.explain.classes if item.explain else None for item in items],
                    eigen_smooth=spec.eigen_smooth,
                    aug_smooth=spec.aug_smooth,
                )
            logits, per_sample_maps = output.logits, output.maps
        probabilities = logits.detach().float().softmax(dim=1)
        top = torch.topk(probabilities, k=min(max(item.topk for item in items), probabilities.shape[1]))
        top_indices, top_values = top.indices.tolist(), top.values.tolist()
        scores = probabilities.cpu().numpy()
        maps, shown = self._finish_maps(items, per_sample_maps, bases)
        results = []
        for row, item in enumerate(items):
            predictions = list(zip(top_indices[row][:item.topk], top_values[row][:item.topk], strict=True))
            layers = item.explain.layers if item.explain is not None else ()
            explanations = [
                MapResult(
                    method=sample.method,
                    layers=layers,
                    class_idx=sample.class_idx,
                    score=float(scores[row, sample.class_idx]),
                    mask=mask,
                    display=display,
                    overlay=overlay,
                )
                for sample, (mask, display, overlay) in zip(per_sample_maps[row], maps[row], strict=True)
            ]
            results.append(ItemResult(predictions, explanations, 0.0, 0.0, image=shown[row]))
        if any(item.explain is not None and item.explain.evaluate_steps for item in items):
            with self.autocast(methods):
                add_faithfulness(runner.forward, inputs, items, per_sample_maps, results)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_ms = (time.perf_counter() - started) * 1000
        for result in results:
            result.compute_ms = compute_ms
        return results

    def _runner(
        self, loaded: LoadedModel, layers: Sequence[str], methods: Sequence[CAMMethod]
    ) -> Runner:
        """The runner ``loaded`` computes these methods on these layers through
        (:meth:`LoadedModel.runner`): the model itself when a method declares it needs it
        (:attr:`service.methods.MethodInfo.exact_network`), else the lean copy where it can."""
        exact = any(type(m).describe().exact_network for m in methods)
        return loaded.runner(layers, exact=exact)

    def _finish_maps(
        self, items: Sequence[WorkItem], per_sample_maps: Sequence[Sequence[SampleMap]],
        bases: Sequence[torch.Tensor | None],
    ) -> tuple[list[list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]], list[np.ndarray | None]]:
        """Every sample's map at its mask size and display size, as float32 numpy arrays, and
        its overlay where this worker draws it (CUDA, :meth:`_overlay_base`), as uint8; and
        each item's shown image decoded here (``bases``, encoded inputs) as uint8.

        Maps with the same grid and target size are resized in one call; on CUDA everything
        a batch sends to the host goes in one pinned copy (device_render.to_host).
        """
        wanted: list[tuple[torch.Tensor, tuple[int, int] | None]] = []
        for item, samples in zip(items, per_sample_maps, strict=True):
            spec = item.explain
            for sample in samples:
                assert spec is not None
                size = spec.mask_size if spec.mask_wanted else None  # unsent: not resized
                wanted.append((sample.grid, size or _size(sample.grid)))
                wanted.append((sample.grid, spec.display_size))
        tensors: list[torch.Tensor | None] = list(_resize_all(wanted))
        overlays: list[torch.Tensor | None] = []
        at = 1
        for item, samples, decoded in zip(items, per_sample_maps, bases, strict=True):
            base = self._overlay_base(item, decoded)
            for _ in samples:
                display = tensors[at]
                drawn = None
                if base is not None and display is not None and item.explain is not None:
                    assert item.explain.overlay is not None
                    drawn = device_render.overlay(display, base, *item.explain.overlay)
                    if not item.explain.display_wanted:
                        tensors[at] = None  # only the overlay needed it: not copied back
                overlays.append(drawn)
                at += 2
        arrays = device_render.to_host([*tensors, *overlays, *bases])
        masks_displays = arrays[:len(tensors)]
        drawn_overlays = arrays[len(tensors):len(tensors) + len(overlays)]
        shown = arrays[len(tensors) + len(overlays):]
        out: list[list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]] = []
        at = 0
        for samples in per_sample_maps:
            row: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
            for _ in samples:
                mask, heat = masks_displays[2 * at], masks_displays[2 * at + 1]
                assert mask is not None
                row.append((mask, heat, drawn_overlays[at]))
                at += 1
            out.append(row)
        return out, shown

    def _overlay_base(self, item: WorkItem, decoded: torch.Tensor | None = None) -> torch.Tensor | None:
        """The image this worker blends ``item``'s overlays on, on its device: CUDA workers
        only, when the request asks for an overlay at the display maps' size; else None (the
        API draws, as it always does for the CPU). ``decoded``: the image decoded here."""
        spec = item.explain
        if (self.device.type != "cuda" or spec is None or spec.overlay is None
                or spec.display_size is None):
            return None
        if decoded is not None:
            base: torch.Tensor | None = decoded
        elif item.overlay_base is None:
            return None
        else:
            base = device_render.image_to_device(item.overlay_base, self.device)
        if base is None or tuple(base.shape[:2]) != spec.display_size:
            return None
        return base

    def _to_tensor(self, loaded: LoadedModel, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        return self._normalise(loaded, self._upload(pixels))

    def _upload(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device, in one transfer."""
        return torch.from_numpy(np.stack(pixels)).to(self.device, non_blocking=True)

    def _inputs(
        self, loaded: LoadedModel, items: Sequence[WorkItem]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], dict[int, Exception]]:
        """The model inputs of the items that have one, as (N, H, W, 3) uint8 on the device;
        each one's shown image decoded here ((h, w, 3) uint8 on the device, encoded inputs
        that want it), else None; and the failures, by index in ``items``.

        Encoded inputs are decoded on the device in one call (nvjpeg on CUDA) and resized
        there as the CPU path resizes (antialiased bilinear, like Pillow's, rounded to uint8);
        one the device cannot decode takes the CPU path itself (host_decode), whose 4xx
        error is that item's answer when the host cannot decode it either."""
        arrays = [item.pixels for item in items if item.pixels is not None]
        if len(arrays) == len(items):
            return self._upload(arrays), [None] * len(items), {}
        size = loaded.spec.input_size
        on_host: dict[int, np.ndarray] = {}
        inputs: dict[int, torch.Tensor] = {}
        bases: dict[int, torch.Tensor | None] = {}
        failures: dict[int, Exception] = {}
        encoded = [(index, item.encoded) for index, item in enumerate(items) if item.pixels is None]
        decoded = self._decode([image for _, image in encoded if image is not None])
        for (index, image), pixels in zip(encoded, decoded, strict=True):
            assert image is not None
            if isinstance(pixels, torch.Tensor):
                inputs[index] = _resized(pixels, size)
                bases[index] = _resized(pixels, image.base_size) if image.base_size else None
                continue
            log.info("decoding on the host: the device could not", extra={
                "worker": str(self.device), "reason": str(pixels)[:200],
                "request_ids": [items[index].request_id]})
            try:
                on_host[index], shown = host_decode(image, size)
            except ServiceError as exc:
                failures[index] = exc
                continue
            bases[index] = device_render.image_to_device(shown, self.device) if shown is not None else None
        for index, item in enumerate(items):
            if item.pixels is not None:
                on_host[index] = item.pixels
        if on_host:
            order = sorted(on_host)
            uploaded = self._upload([on_host[index] for index in order])
            inputs.update(zip(order, uploaded, strict=True))
        kept = [index for index in range(len(items)) if index not in failures]
        stacked = torch.stack([inputs[index] for index in kept]) if kept else torch.empty(0)
        return stacked, [bases.get(index) for index in kept], failures

    def _decode(self, images: Sequence[EncodedImage]) -> list[torch.Tensor | Exception]:
        """Each JPEG as a (3, H, W) uint8 tensor on the device, or the error that stopped it.
        One call for all (nvjpeg decodes a list in one go); if that fails, one at a time, so
        only the bad file falls back. A fatal or out-of-memory device error is raised (the
        engine's own handling), never taken for a bad file."""
        if not images:
            return []
        if not self.device_jpeg:
            return [RuntimeError("the device's JPEG decoder is not used")] * len(images)
        # torchvision 0.29 points at TorchCodec on every call; its decoder is still the one
        # with nvjpeg batches. (A filter, not catch_warnings: that is not thread-safe.)
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                category=DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
        data = [torch.frombuffer(bytearray(image.data), dtype=torch.uint8) for image in images]
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except Exception as exc:
            if is_fatal_device_error(exc) or is_out_of_memory(exc):
                raise
        out: list[torch.Tensor | Exception] = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
            except Exception as exc:
                if is_fatal_device_error(exc) or is_out_of_memory(exc):
                    raise
                out.append(exc)
        return out

    def _normalise(self, loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device to the model's normalised float input."""
        images = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(loaded.spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.spec.std, device=self.device).view(1, 3, 1, 1)
        normalised = (images - mean) / std
        if self.channels_last:
            return normalised.contiguous(memory_format=torch.channels_last)
        return normalised


def _resize_all(
    wanted: Sequence[tuple[torch.Tensor, tuple[int, int] | None]],
) -> list[torch.Tensor | None]:
    """Each (h, w) map brought to its size (None: no map, the map's own size: unchanged),
    bilinearly and re-normalised to span [0, 1] exactly, as float32 tensors on the maps'
    device (rows of one tensor per group: device_render.to_host views them on the CPU)."""
    groups: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = {}
    for index, (grid, size) in enumerate(wanted):
        if size is not None:
            groups.setdefault((tuple(grid.shape), size), []).append(index)
    out: list[torch.Tensor | None] = [None] * len(wanted)
    for (shape, size), indices in groups.items():
        stacked = torch.stack([wanted[i][0] for i in indices])
        if shape != size:
            resized = F.interpolate(stacked[:, None], size=size, mode="bilinear", align_corners=False)
            stacked = normalize(resized[:, 0])
        stacked = stacked.detach().float()
        for row, index in enumerate(indices):
            out[index] = stacked[row]
    return out


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A decoded (3, H, W) uint8 image at ``size`` = (height, width), as (h, w, 3) uint8, the
    way Pillow's BILINEAR resize (the CPU path's) computes it: antialiased bilinear, across
    then down, rounded to 8 bits after each pass (which matches it to within one level in
    about 0.2% of pixels, against 17% for one float pass)."""
    height, width = size
    pixels = image[None].float()
    for pass_size in ((pixels.shape[2], width), (height, width)):
        if tuple(pixels.shape[2:]) != pass_size:
            pixels = F.interpolate(pixels, size=pass_size, mode="bilinear", antialias=True,
                                   align_corners=False).round_().clamp_(0, 255)
    return pixels[0].to(torch.uint8).permute(1, 2, 0)


def _size(grid: torch.Tensor) -> tuple[int, int]:
    height, width = grid.shape[-2:]
    return int(height), int(width)
