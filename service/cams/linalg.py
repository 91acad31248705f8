"""Principal components of activation maps, batched and in torch (no numpy round trip).

Each sample's tensor (K, H, W) is read as ``X``, an ``HW x K`` matrix of positions by channels,
centred per channel (the mean over positions removed). Its first principal component's scores
``X v_1`` form an (H, W) map. An eigenvector's sign is arbitrary, so the map is signed to
correlate positively with the channel sum of the same tensor (for raw activations, the mean
activation map): the map then highlights what the layer highlights, never its complement.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Small symmetric float64 eigen-decompositions go to the CPU and back (two small copies): on
# a GPU cuSOLVER's float64 path costs several launches and syncs per call and float64 is slow
# on most GPUs, while a 49x49 or 196x196 matrix takes the CPU well under a millisecond.
# (Read from the code and the issue; to be confirmed by make gpu-check's eigencam timings.)
_HOST_EIGH_MAX = 512


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    if matrix.device.type == "cuda" and matrix.shape[-1] <= _HOST_EIGH_MAX:
        values, vectors = torch.linalg.eigh(matrix.cpu())
        return values.to(matrix.device), vectors.to(matrix.device)
    values, vectors = torch.linalg.eigh(matrix)
    return values, vectors


def _centred(terms: Tensor) -> Tensor:
    """(B, K, H, W) -> (B, HW, K) with each channel's mean over positions removed."""
    matrix = terms.flatten(2).transpose(1, 2).double().nan_to_num(0.0)
    return matrix - matrix.mean(dim=1, keepdim=True)


def _signed(projection: Tensor, terms: Tensor) -> Tensor:
    reference = terms.sum(dim=1).flatten(1).double()
    reference = reference - reference.mean(dim=1, keepdim=True)
    sign = torch.where((projection * reference).sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    return (projection * sign).view(terms.shape[0], *terms.shape[2:]).to(terms.dtype)


def first_component(terms: Tensor) -> Tensor:
    """Scores (B, H, W) of the first principal component of each sample's channel terms.

    Eigen-CAM (Muhammad and Yeasin 2020, arXiv 2008.00299): ``X = U S V^T``, map ``= X v_1``.
    The eigen-decomposition runs on the smaller Gram matrix: ``X X^T`` (HW x HW) gives
    ``X v_1 = s_1 u_1`` directly; ``X^T X`` (K x K) gives ``v_1``.
    """
    matrix = _centred(terms)
    positions, channels = matrix.shape[1:]
    if positions <= channels:
        values, vectors = _eigh(matrix @ matrix.transpose(1, 2))
        projection = vectors[:, :, -1] * values[:, -1:].clamp_min(0.0).sqrt()
    else:
        _, vectors = _eigh(matrix.transpose(1, 2) @ matrix)
        projection = (matrix @ vectors[:, :, -1:])[:, :, 0]
    return _signed(projection, terms)


def kernel_first_component(terms: Tensor, gamma: float | None = None, coef0: float = 1.0) -> Tensor:
    """First kernel principal component (B, H, W) with the sigmoid kernel.

    KPCA-CAM (Karmani et al. 2024): kernel ``k(x, y) = tanh(gamma <x, y> + coef0)`` between
    positions (gamma defaults to 1/K, coef0 to 1, as scikit-learn's KernelPCA), the kernel matrix
    double-centred, ``K_c = a_1 l_1 a_1^T``; scores ``= sqrt(l_1) a_1``.
    """
    matrix = _centred(terms)
    positions, channels = matrix.shape[1:]
    scale = 1.0 / channels if gamma is None else gamma
    kernel = torch.tanh(scale * (matrix @ matrix.transpose(1, 2)) + coef0)
    ones = torch.full((positions, positions), 1.0 / positions, dtype=kernel.dtype, device=kernel.device)
    centred = kernel - ones @ kernel - kernel @ ones + ones @ kernel @ ones
    values, vectors = _eigh(centred)
    projection = vectors[:, :, -1] * values[:, -1:].clamp_min(0.0).sqrt()
    return _signed(projection, terms)
