"""The unit of work the engine queues: one image with what to compute for it.

Plain data only (numpy arrays and tuples): the HTTP layer builds these without torch, and
the worker answers with :class:`ItemResult`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.imaging.encoded import EncodedImage


@dataclass(frozen=True)
class ExplainSpec:
    methods: tuple[str, ...]
    layers: tuple[str, ...]
    classes: tuple[int, ...] | None  # None: the top-1 class
    mask_size: tuple[int, int] | None  # None: the layer's own grid
    display_size: tuple[int, int] | None  # overlay/heatmap size; None: none requested
    eigen_smooth: bool = False  # first principal component of each method's channel terms
    aug_smooth: bool = False  # maps averaged over flips and rescalings of the input
    # Per method, its non-default parameters as sorted (name, value) pairs (hashable).
    method_params: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    # Faithfulness scores with this many deletion/insertion steps (service.quality); None: none.
    evaluate_steps: int | None = None
    # False when the response carries no mask (outputs without "mask"): the worker then leaves
    # each map at its own grid instead of resizing it to mask_size and copying that to the host.
    mask_wanted: bool = True
    # (colour map, alpha, fade) when the response carries an overlay: a CUDA worker then draws
    # it on the device (the same blend table as service.imaging.encode.overlay) and returns
    # uint8 pixels. Not part of the batch key: the CPU ignores it and the API draws.
    overlay: tuple[str, float, bool] | None = None
    # False when nothing but an overlay needs the display map on the host (no heatmap, no
    # DICOM object): a worker that drew the overlay then copies no float map back.
    display_wanted: bool = True

    def options_key(self) -> tuple[object, ...]:
        """What besides methods and layers decides whether two items can share a pass."""
        return (self.eigen_smooth, self.aug_smooth, self.method_params)


@dataclass(eq=False)  # an item is itself: compared and removed by identity, never by its pixels
class WorkItem:
    model: str
    pixels: np.ndarray | None  # (H, W, 3) uint8 at the model's input size; None: ``encoded``
    topk: int
    explain: ExplainSpec | None
    deadline: float  # time.monotonic() after which the item is not computed
    future: asyncio.Future[ItemResult]
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    request_id: str = ""  # for logs only
    # Set by the engine on submission: forward-pass equivalents (service.engine.cost), whether
    # it runs in the heavy lane, and, once it runs there, its service.cams.passes.PassRun.
    passes: int = 1
    heavy: bool = False
    background: bool = False  # a job's: gives way to the heavy work of synchronous requests
    run: object | None = None
    # Called on the event loop with (passes done, passes expected) as a heavy item advances.
    on_progress: Callable[[int, int], None] | None = None
    # The RGB image an overlay is drawn on (a PIL image, or anything np.asarray reads as
    # (h, w, 3) uint8) when the request asks for an overlay. Only a worker that draws
    # overlays (CUDA) reads its pixels, so the CPU path costs nothing for it.
    overlay_base: object | None = None
    # A JPEG the worker decodes on its device instead of ``pixels`` (CUDA workers, see
    # service.imaging.encoded); it sends back the image at ``base_size`` as ItemResult.image.
    encoded: EncodedImage | None = None

    def input_shape(self) -> tuple[int, ...]:
        """The input's shape as it arrives (decoded pixels, or the JPEG's declared size)."""
        if self.pixels is not None:
            return tuple(self.pixels.shape)
        assert self.encoded is not None
        return (self.encoded.height, self.encoded.width, 3)

    def batch_key(self) -> tuple[object, ...]:
        """Items with equal keys share a forward (and backward) pass."""
        if self.explain is None:
            return (self.model, None)
        return (self.model, self.explain.methods, self.explain.layers, self.explain.options_key())


@dataclass
class MapResult:
    method: str
    layers: tuple[str, ...]
    class_idx: int
    score: float
    mask: np.ndarray  # float32 in [0, 1] at the requested mask size
    display: np.ndarray | None  # float32 in [0, 1] at the display size
    faithfulness: dict[str, float | bool | int] | None = None  # when the item asked for them
    overlay: np.ndarray | None = None  # (h, w, 3) uint8, when the worker drew it (CUDA)


@dataclass
class ItemResult:
    predictions: list[tuple[int, float]]
    explanations: list[MapResult]
    queue_ms: float
    compute_ms: float
    batch_size: int = 1  # images in the batch this one was computed in
    # The shown image (h, w, 3) uint8 at EncodedImage.base_size, for an encoded input.
    image: np.ndarray | None = None
    # The item's own failure (an encoded input neither the device nor the host could decode:
    # the same 4xx the API's decode raises); the engine answers the item with it.
    error: Exception | None = None
