"""What a CUDA worker renders before anything leaves the device: overlays blended there, and
every host-bound array of a batch copied back in one pinned transfer.

The blend is the one of :mod:`service.imaging.colormaps` (its :func:`blend_table`, the same
uint8 table :func:`service.imaging.encode.overlay` gathers from on the CPU), so an overlay
drawn here and one drawn by the API differ only where the maps themselves differ. The CPU
worker uses none of this: its maps go to the API, which draws as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from service.imaging.colormaps import blend_table


@lru_cache(maxsize=32)
def _table(device: torch.device, colormap: str, alpha: float, fade: bool) -> Tensor:
    """The blend table (3 * 256 * 256 uint8) on ``device``, copied there once per colour map."""
    return torch.from_numpy(blend_table(colormap, alpha, fade).copy()).to(device)


def overlay(display: Tensor, base: Tensor, colormap: str, alpha: float, fade: bool) -> Tensor:
    """(h, w, 3) uint8: ``display`` (h, w, float in [0, 1]) coloured and blended over ``base``
    ((h, w, 3) uint8, on the same device), entry (channel, map index, value) of the table."""
    table = _table(display.device, colormap, float(alpha), fade)
    # to_indices' arithmetic: round(255 m) (half to even, as numpy's rint), clipped.
    index = torch.clamp(torch.round(display.float() * 255.0), 0, 255).to(torch.int64)
    channels = torch.arange(3, device=display.device, dtype=torch.int64) << 16
    flat = (index[:, :, None] << 8) + base.to(torch.int64) + channels
    return table[flat]


def image_to_device(image: object, device: torch.device) -> Tensor | None:
    """An RGB image (PIL or array) as an (h, w, 3) uint8 tensor on ``device``; None if it is
    not one."""
    convert = getattr(image, "convert", None)
    if callable(convert) and getattr(image, "mode", "RGB") != "RGB":
        image = convert("RGB")
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return None
    # A PIL image's array is read-only; it is only read here, on its way to the device. (A
    # filter, not catch_warnings: this runs on worker threads while the API's threads decode,
    # and catch_warnings swaps the process's filter list, which is not thread-safe.)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                            category=UserWarning)
    host = torch.from_numpy(np.ascontiguousarray(pixels))
    return host.to(device, non_blocking=True)


def to_host(tensors: Sequence[Tensor | None], pack: bool | None = None) -> list[np.ndarray | None]:
    """Every tensor as a numpy array. From CUDA (or with ``pack``): one pinned device-to-host
    copy of all of them (each one's bytes, back to back), then views of that buffer, so a
    batch costs one transfer and one wait instead of one per map. On the CPU the tensors'
    own memory is viewed."""
    present = [t for t in tensors if t is not None]
    cuda = bool(present) and present[0].device.type == "cuda"
    if not present or not (cuda if pack is None else pack):
        return [None if t is None else t.detach().contiguous().numpy() for t in tensors]
    packed = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in present])
    host = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=cuda)
    host.copy_(packed, non_blocking=cuda)
    if cuda:
        torch.cuda.current_stream(packed.device).synchronize()
    buffer = host.numpy()
    out: list[np.ndarray | None] = []
    at = 0
    for tensor in tensors:
        if tensor is None:
            out.append(None)
            continue
        size = tensor.numel() * tensor.element_size()
        dtype = torch.empty((), dtype=tensor.dtype).numpy().dtype
        out.append(buffer[at:at + size].view(dtype).reshape(tuple(tensor.shape)))
        at += size
    return out
