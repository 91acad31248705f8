"""Differential tests: maps against TorchCAM 0.5 and pytorch-grad-cam 1.5.7 on the real mobilenet_v2.

Maps are compared at the layer's own grid (pytorch-grad-cam is told the target size is that grid,
so its resize is the identity). The libraries run on a copy of the model whose parameters require
grad, as they need; ours stays frozen. Thresholds follow the project's formula sheet of CAM
methods (CAM_METHODS.md, kept beside the repository, not in it): identical maps where both
libraries agree; where they differ from the paper, the paper is followed and the agreement
measured on these photos is the bound.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import pytorch_grad_cam as pgc
import torch
import torchcam.methods as tcm
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_kernel
from torch import Tensor, nn

from service.cams import get_method
from service.cams.extractor import explain_batch
from service.cams.linalg import first_component, kernel_first_component
from service.models.loader import LoadedModel
from tests.cams.conftest import pearson

LAYER = "features.18"
# A layer after a ReLU6 with 32 channels: exact Score-CAM and Ablation-CAM stay cheap there, and
# pytorch-grad-cam ablates it by zeroing (it zeroes only where the layer's minimum is 0).
NARROW = "features.1.conv.0"


@pytest.fixture(scope="module")
def reference(mobilenet: LoadedModel) -> nn.Module:
    logging.getLogger("torchcam").setLevel(logging.ERROR)
    return copy.deepcopy(mobilenet.module).requires_grad_(True)


@pytest.fixture(scope="module")
def classes(mobilenet: LoadedModel, photos: Tensor) -> list[int]:
    with torch.inference_mode():
        return mobilenet.module(photos).argmax(dim=1).tolist()


def ours(loaded: LoadedModel, photos: Tensor, name: str, classes: list[int], layer: str = LAYER,
         **options: object) -> Tensor:
    out = explain_batch(loaded.runner(), photos, (layer,), [get_method(name, options)],
                        [[c] for c in classes])
    return torch.stack([maps[0].grid for maps in out.maps])


def torchcam(model: nn.Module, extractor: type, photos: Tensor, classes: list[int], layer: str = LAYER,
             **options: object) -> Tensor:
    with extractor(model, layer, **options) as cam:
        scores = model(photos.clone())
        return cam(classes, scores)[0].detach()


def grad_cam(model: nn.Module, method: Callable[..., object], photos: Tensor, classes: list[int],
             layer: str = LAYER) -> Tensor:
    cam = method(model=model, target_layers=[model.get_submodule(layer)])
    grid = model.get_submodule(layer)
    size = _grid_of(model, grid, photos)
    cam.get_target_width_height = lambda _inputs: size  # type: ignore[attr-defined]
    try:
        maps = cam(photos.clone(), [ClassifierOutputTarget(c) for c in classes])  # type: ignore[operator]
    finally:
        cam.activations_and_grads.release()  # type: ignore[attr-defined]
    return torch.as_tensor(maps)


def _grid_of(model: nn.Module, layer: nn.Module, photos: Tensor) -> tuple[int, int]:
    found: list[tuple[int, int]] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: found.append((out.shape[-1], out.shape[-2])))
    try:
        with torch.no_grad():
            model(photos[:1])
    finally:
        handle.remove()
    return found[0]


def assert_r(mine: Tensor, theirs: Tensor, minimum: float) -> None:
    for a, b in zip(mine, theirs, strict=True):
        assert pearson(a, b) > minimum, [round(pearson(x, y), 4) for x, y in zip(mine, theirs, strict=True)]


@pytest.mark.parametrize(
    ("name", "tc_cls", "pg_cls"),
    [
        ("gradcam", tcm.GradCAM, pgc.GradCAM),
        ("xgradcam", tcm.XGradCAM, pgc.XGradCAM),
        ("layercam", tcm.LayerCAM, pgc.LayerCAM),
    ],
)
def test_identical_to_both_libraries(mobilenet, reference, photos, classes, name, tc_cls, pg_cls):
    mine = ours(mobilenet, photos, name, classes)
    assert_r(mine, torchcam(reference, tc_cls, photos, classes), 0.999)
    assert_r(mine, grad_cam(reference, pg_cls, photos, classes), 0.999)


@pytest.mark.parametrize(
    ("name", "pg_cls"),
    [
        ("hirescam", pgc.HiResCAM),
        ("gradcam_elementwise", pgc.GradCAMElementWise),
        ("eigencam", pgc.EigenCAM),
        ("eigengradcam", pgc.EigenGradCAM),
        ("kpca_cam", pgc.KPCA_CAM),
        ("fem", pgc.FEM),
        ("shapleycam", pgc.ShapleyCAM),
    ],
)
def test_identical_to_pytorch_grad_cam(mobilenet, reference, photos, classes, name, pg_cls):
    assert_r(ours(mobilenet, photos, name, classes), grad_cam(reference, pg_cls, photos, classes), 0.999)


def test_gradcampp_follows_the_paper(mobilenet, reference, photos, classes):
    mine = ours(mobilenet, photos, "gradcampp", classes)
    # pytorch-grad-cam adds 1e-6 to alpha's denominator, where g^2 is about 1e-6 here: r 0.9989 / 0.9998.
    assert_r(mine, grad_cam(reference, pgc.GradCAMPlusPlus, photos, classes), 0.998)
    # TorchCAM divides a boolean-indexed copy in place, so its alpha is g^2: r 0.97 / 0.999 here.
    assert_r(mine, torchcam(reference, tcm.GradCAMpp, photos, classes), 0.95)


def test_cam_equals_torchcam_and_gradcam_and_hirescam(mobilenet, reference, photos, classes):
    cam = ours(mobilenet, photos, "cam", classes)
    assert_r(cam, torchcam(reference, tcm.CAM, photos, classes, fc_layer="classifier.1"), 0.999)
    torch.testing.assert_close(cam, ours(mobilenet, photos, "gradcam", classes), atol=1e-5, rtol=0)
    torch.testing.assert_close(cam, ours(mobilenet, photos, "hirescam", classes), atol=1e-5, rtol=0)


def test_finercam_matches_pytorch_grad_cam(mobilenet, reference, photos, classes):
    cam = pgc.FinerCAM(reference, [reference.get_submodule(LAYER)])
    cam.base_cam.get_target_width_height = lambda _inputs: (7, 7)
    try:
        theirs = torch.as_tensor(cam(photos.clone()))  # compares the top-1 class with 3 neighbours
    finally:
        cam.base_cam.activations_and_grads.release()
    assert_r(ours(mobilenet, photos, "finercam", classes), theirs, 0.999)


def test_fullgrad_matches_pytorch_grad_cam_on_the_input_grid(mobilenet, reference, photos, classes):
    cam = pgc.FullGrad(reference, [])
    try:
        theirs = torch.as_tensor(cam(photos.clone(), [ClassifierOutputTarget(c) for c in classes]))
    finally:
        cam.activations_and_grads.release()
    mine = ours(mobilenet, photos, "fullgrad", classes)
    assert mine.shape == theirs.shape == (2, 224, 224)
    assert_r(mine, theirs, 0.995)


def test_smooth_gradcampp_equals_gradcampp_where_gradients_are_constant(mobilenet, reference, photos,
                                                                          classes):
    # After features.18 come global pooling and one linear layer: g = W[c] / 49 for every input,
    # so averaging over noisy copies changes nothing. TorchCAM instead combines its weights with
    # the last noisy copy's activations (r 0.79 / 0.99 here).
    smooth = ours(mobilenet, photos, "smoothgradcampp", classes)
    torch.testing.assert_close(smooth, ours(mobilenet, photos, "gradcampp", classes), atol=1e-5, rtol=0)
    assert_r(smooth, torchcam(reference, tcm.SmoothGradCAMpp, photos, classes), 0.75)


def test_scorecam_and_ablationcam_match_both_libraries_on_a_narrow_layer(mobilenet, reference, photos,
                                                                          classes):
    score = ours(mobilenet, photos, "scorecam", classes, layer=NARROW)
    assert_r(score, torchcam(reference, tcm.ScoreCAM, photos, classes, layer=NARROW), 0.999)
    # pytorch-grad-cam upsamples (align_corners=True) before normalising: r 0.956 / 0.980 here.
    assert_r(score, grad_cam(reference, pgc.ScoreCAM, photos, classes, layer=NARROW), 0.95)
    ablation = ours(mobilenet, photos, "ablationcam", classes, layer=NARROW)
    assert_r(ablation, grad_cam(reference, pgc.AblationCAM, photos, classes, layer=NARROW), 0.999)


def test_iscam_and_sscam_against_torchcam_on_a_narrow_layer(mobilenet, reference, photos, classes):
    # IS-CAM: TorchCAM scales the i-th step by the cumulative sum of j/N, the paper by i/N:
    # r 0.945 / 0.943 here.
    iscam = ours(mobilenet, photos, "iscam", classes, layer=NARROW, num_samples=2)
    assert_r(iscam, torchcam(reference, tcm.ISCAM, photos, classes, layer=NARROW, num_samples=2), 0.92)
    # SS-CAM: both draw their own noise (std 2 on a [0, 1] mask), so with two draws each only the
    # broad shape can agree: r 0.99 / 0.90 here. TorchCAM draws from the global generator: seed it.
    torch.manual_seed(0)
    sscam = ours(mobilenet, photos, "sscam", classes, layer=NARROW, num_samples=2)
    assert_r(sscam, torchcam(reference, tcm.SSCAM, photos, classes, layer=NARROW, num_samples=2), 0.8)


def test_principal_components_match_pytorch_grad_cam(mobilenet, photos):
    with torch.inference_mode():
        acts = mobilenet.modules[LAYER](mobilenet.module.features[:18](photos))
    for mine, theirs in (
        (first_component(acts), get_2d_projection(acts.numpy())),
        (kernel_first_component(acts), get_2d_projection_kernel(acts.numpy())),
    ):
        for a, b in zip(mine, torch.as_tensor(theirs), strict=True):
            assert abs(pearson(a, b)) > 0.9999
