"""The U-shaped normalizing flow (U-Flow, section 3.2), built as one FrEIA graph.

Scales are processed coarsest first. Each stage is a few Glow-style steps
(affine coupling with a conv-ReLU-conv subnet, a fixed 1x1 channel
permutation, ActNorm; FrEIA's ``AllInOneBlock``). After a stage, about half of
the channels leave as that scale's latent; the rest are upsampled with the
invertible iRevNet pixel shuffle (4x fewer channels, 2x the side) and
concatenated with the next finer scale's features. The whole map is invertible,
so the latents of all scales are jointly N(0, I) under the training
distribution, which is what makes them independent for the NFA.

Before the graph, each scale is standardized over (C, H, W) (a LayerNorm
without parameters). The learnable part of U-Flow's LayerNorm, a per-position
scale and shift, is an elementwise invertible layer *inside* the graph, so its
log-determinant enters the likelihood. Left outside, as a plain LayerNorm
affine, it could shrink the features towards a point and drive the negative
log-likelihood down without bound while learning nothing about normality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import FrEIA.framework as ff
import FrEIA.modules as fm
import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError, FlowConfig

Shape = tuple[int, int, int]


class PositionAffine(fm.InvertibleModule):
    """y = x * exp(s) + b with one (s, b) per channel and position."""

    def __init__(self, dims_in: Sequence[Sequence[int]], dims_c=None) -> None:
        super().__init__(dims_in, dims_c)
        shape = tuple(dims_in[0])
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.shift = nn.Parameter(torch.zeros(shape))

    def forward(self, x, c=None, rev=False, jac=True):
        (x,) = x
        log_det = self.log_scale.sum().expand(x.shape[0])
        if rev:
            return ((x - self.shift) * torch.exp(-self.log_scale),), -log_det
        return (x * torch.exp(self.log_scale) + self.shift,), log_det

    def output_dims(self, input_dims):
        return input_dims


class CouplingStep(fm.AllInOneBlock):
    """FrEIA's Glow-style step (``AllInOneBlock``) with hard permutations applied as a channel gather.

    FrEIA applies even a hard permutation as a dense 1x1 convolution with a
    0/1 matrix, a C x C matrix product per position (about a tenth of the
    flow's time at 320 channels). Gathering the channels gives the same
    values exactly; the weights, and so every saved model, stay as they are.
    """

    def __init__(self, dims_in, dims_c=None, permute_soft: bool = False, **kwargs) -> None:
        super().__init__(dims_in, dims_c if dims_c is not None else [], permute_soft=permute_soft, **kwargs)
        if not permute_soft:
            self.permute_function = _gather_channels


def _gather_channels(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """What ``conv(x, permutation)`` gives for a 0/1 permutation matrix: output channel i is input channel argmax_j w[i, j]."""
    return x[:, permutation.flatten(1).argmax(dim=1)]


def standardize(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each scale standardized over (C, H, W): a LayerNorm without parameters."""
    return [F.layer_norm(f, f.shape[1:]) for f in features]


def coupling_subnet(kernel_size: int) -> callable:
    """conv-ReLU-conv with as many hidden filters as input channels.

    The last convolution starts at zero so every coupling starts as the
    identity (as in Glow), which keeps early training stable.
    """

    def build(channels_in: int, channels_out: int) -> nn.Module:
        padding = kernel_size // 2
        last = nn.Conv2d(channels_in, channels_out, kernel_size, padding=padding)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Conv2d(channels_in, channels_in, kernel_size, padding=padding), nn.ReLU(), last)

    return build


def channels_to_upsample(channels: int) -> int:
    """Half the channels, rounded down to a multiple of 4 (iRevNet needs 4)."""
    return 4 * ((channels // 2) // 4)


def check_pyramid(feature_shapes: Sequence[Shape]) -> None:
    """The flow merges scales by 2x upsampling: each scale must be half the previous."""
    if not feature_shapes:
        raise ConfigError("the flow needs at least one feature scale")
    for finer, coarser in zip(feature_shapes, feature_shapes[1:]):
        if (finer[1], finer[2]) != (2 * coarser[1], 2 * coarser[2]):
            raise ConfigError(
                f"feature scales must halve from one to the next, got {finer[1:]} then {coarser[1:]}; "
                "use an input size whose sides are multiples of the backbone's largest stride"
            )


def build_uflow_graph(feature_shapes: Sequence[Shape], config: FlowConfig) -> tuple[ff.GraphINN, list[Shape]]:
    """The invertible graph; inputs and outputs are ordered finest scale first."""
    check_pyramid(feature_shapes)
    coarse_first = list(reversed(feature_shapes))
    inputs = [ff.InputNode(*shape, name=f"features_{len(coarse_first) - 1 - i}") for i, shape in enumerate(coarse_first)]
    nodes: list[ff.Node] = list(inputs)
    outputs: list[ff.Node] = []
    latent_shapes: list[Shape] = []
    carried = None  # the upsampled half coming from the coarser stage
    for stage, (input_node, shape) in enumerate(zip(inputs, coarse_first)):
        x = ff.Node(input_node, PositionAffine, {}, name=f"position_affine_{stage}")
        nodes.append(x)
        if carried is not None:
            x = ff.Node([x.out0, carried.out0], fm.Concat, {"dim": 0}, name=f"concat_{stage}")
            nodes.append(x)
        channels = x.output_dims[0][0]
        for step in range(config.steps_per_stage):
            kernel = config.subnet_kernels[step % len(config.subnet_kernels)]
            x = ff.Node(
                x, CouplingStep,
                {"subnet_constructor": coupling_subnet(kernel), "affine_clamping": config.affine_clamp, "permute_soft": False},
                name=f"step_{stage}_{step}",
            )
            nodes.append(x)
        last_stage = stage == len(coarse_first) - 1
        if last_stage:
            outputs.append(ff.OutputNode(x, name=f"latent_{stage}"))
            latent_shapes.append((channels, shape[1], shape[2]))
            continue
        n_up = channels_to_upsample(channels)
        if n_up == 0:
            raise ConfigError(f"scale with {channels} channels is too narrow to pass channels to the finer scale")
        split = ff.Node(x, fm.Split, {"section_sizes": [channels - n_up, n_up], "dim": 0}, name=f"split_{stage}")
        carried = ff.Node(split.out1, fm.IRevNetUpsampling, {}, name=f"upsample_{stage}")
        outputs.append(ff.OutputNode(split.out0, name=f"latent_{stage}"))
        latent_shapes.append((channels - n_up, shape[1], shape[2]))
        nodes.extend([split, carried])
    graph = ff.GraphINN(nodes + outputs[::-1], verbose=False)
    return graph, latent_shapes[::-1]


def named_modules_of(graph: ff.GraphINN) -> nn.ModuleDict:
    """The graph's modules keyed by node name.

    GraphINN lists its modules in a topological order that changes from one
    process to the next, so its own state-dict keys are not stable; node names are.
    """
    modules = {node.name: node.module for node in graph.node_list if node.module is not None}
    return nn.ModuleDict(sorted(modules.items()))


class PerScaleFlows(nn.Module):
    """The base of flows that map each scale on its own (FastFlow, CFlow-AD); latents keep the features' shapes.

    Each scale's latent is N(0, I) on its own, but across scales they are
    transforms of the same image's features: not jointly independent.
    """

    scales_independent = False
    localizes = True
    test_views = 1

    def __init__(self, feature_shapes: Sequence[Shape], config: FlowConfig,
                 build_scale: Callable[[Shape, FlowConfig], nn.Module]) -> None:
        super().__init__()
        self.feature_shapes = [tuple(s) for s in feature_shapes]
        self.latent_shapes = list(self.feature_shapes)
        self.config = config
        self.scales = nn.ModuleList(build_scale(shape, config) for shape in self.feature_shapes)

    standardize = staticmethod(standardize)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.transform(self.standardize(features))


class UFlow(nn.Module):
    """Standardize each scale, then run the invertible U-shaped graph.

    ``forward`` takes backbone features (finest first) and returns the latents
    (finest first) and log|det J| per image.
    """

    scales_independent = True  # one invertible map of all scales: their latents are jointly N(0, I)
    localizes = True  # latents keep positions, so masks can be cut
    test_views = 1  # each image scored as it is

    def __init__(self, feature_shapes: Sequence[Shape], config: FlowConfig) -> None:
        super().__init__()
        self.feature_shapes = [tuple(s) for s in feature_shapes]
        self.config = config
        graph, self.latent_shapes = build_uflow_graph(self.feature_shapes, config)
        # Registered through ``nodes`` only, so parameters have stable names.
        object.__setattr__(self, "graph", graph)
        self.nodes = named_modules_of(graph)

    standardize = staticmethod(standardize)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.transform(self.standardize(features))

    def transform(self, normalized: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The invertible map from standardized features to latents."""
        latents, log_jac_det = self.graph(list(reversed(normalized)), jac=True)
        return list(latents), log_jac_det

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Standardized features from latents (finest first)."""
        features, _ = self.graph(list(latents), rev=True, jac=False)
        return list(reversed(features))
