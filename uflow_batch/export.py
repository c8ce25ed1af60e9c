"""A detector's tensor part as one graph for other runtimes: ONNX (ONNX Runtime, TensorRT, ...) or TorchScript.

What is exported is everything from the *normalized* input tensor to the
anomaly map at the model's input size and the flow's latents: the frozen
backbone, the flow (any kind of :data:`uflow_batch.config.MODEL_KINDS`) and
the anomaly map. That is the pure tensor math, where the time goes. The
verdict (the NFA, exact float64 tails with data-dependent cuts), masks and
regions at each image's original size stay in torch and numpy after it: they
read the latents the graph returns, so a deployment keeps the calibrated
verdict without re-implementing it.

Graph signature (batch dimension dynamic, everything float32)::

    normalized (B, 3, H, W)   (images / 255 - mean) / std, with the manifest's mean and std
    -> anomaly (B, H, W)       in [0, 1], as ``UFlowDetector.score_maps`` gives it
       latent_0 ... latent_L   (B, C_l, H_l, W_l), finest first, as ``UFlowDetector.latents``

A kind with test-time views (DifferNet, :mod:`uflow_batch.model.views`)
has them inside the graph: the flips, the backbone and flow on every view
and the combination into one latent per image, so the latents are those of
``UFlowDetector.latents`` (channels times the views) and the verdict needs
nothing more.

Normalization stays outside the graph so that a caller that already holds
normalized tensors (or decodes on a GPU) does not pay it twice; the mean,
std, input size and latent shapes are written into the ONNX file's metadata.

The ONNX file is written by the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``): it traces the FrEIA graphs as
they run, Python-side bookkeeping included, which the dynamo exporter does
not always accept. The flow's log-determinant is not an output, so its
computation is pruned from the graph.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .model import UFlowDetector
from .model.anomaly import anomaly_map
from .model.views import view_features, view_latents

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17  # LayerNormalization is an ONNX op from 17 on; ONNX Runtime >= 1.14 runs it
CHECK_TOLERANCE = 1e-3  # export_detector refuses a graph further than this from torch (tests hold 1e-4 on real images)
INPUT_NAME = "normalized"
ANOMALY_NAME = "anomaly"
EXAMPLE_BATCH = 2  # traced at 2 so that no size-1 broadcast can be baked in for the batch

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exporter could not turn the detector into a graph, or the graph does not give torch's numbers."""


def latent_names(count: int) -> list[str]:
    return [f"latent_{index}" for index in range(count)]


def default_output(model_dir: str | Path, fmt: str) -> Path:
    """Where ``uflow-batch export`` writes when no ``--output`` is given: beside the weights."""
    return Path(model_dir) / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")


class ScoringGraph(nn.Module):
    """The exported part of a detector: normalized images -> (anomaly map, latent_0, ..., latent_L).

    The same modules and the same functions as :meth:`UFlowDetector.score_maps`
    (``extractor``, ``flow``, the views of :mod:`~uflow_batch.model.views`,
    :func:`~uflow_batch.model.anomaly.anomaly_map`), not a re-implementation,
    so the torch side of a parity check is the production code itself.
    """

    def __init__(self, detector: UFlowDetector) -> None:
        super().__init__()
        self.extractor = detector.extractor
        self.flow = detector.flow
        self.views = detector.views
        self.input_size = tuple(detector.input_size)

    def forward(self, normalized: torch.Tensor) -> tuple[torch.Tensor, ...]:
        latents, _ = view_latents(self.flow, view_features(self.extractor, normalized, self.views), self.views)
        return (anomaly_map(latents, self.input_size), *latents)


@dataclass(frozen=True)
class ExportReport:
    """What was written, and how far the written graph is from torch on a check batch (None: not checked)."""

    path: Path
    format: str
    max_abs_error_anomaly: float | None  # max |graph - torch| of the anomaly map (values in [0, 1])
    max_scaled_error_latents: float | None  # max |graph - torch| / (1 + |torch|) over every latent
    seconds: float  # writing the file, without the check


def example_input(detector: UFlowDetector, batch: int = EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    """A normalized batch to trace with: standard normal values, as normalized images roughly are.

    Tracing does not depend on the values (no branch of the flow or the
    backbone reads them), only on the shapes.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *detector.input_size), generator=generator)


def export_detector(detector: UFlowDetector, path: str | Path, fmt: str = "onnx", opset: int = DEFAULT_OPSET,
                    check: bool = True) -> ExportReport:
    """Write the detector's scoring graph to ``path`` as ONNX or TorchScript, batch dimension dynamic.

    The detector must be on the CPU (where the exporters trace), in eval
    mode. ``check`` runs the written file on a batch of another size than
    the traced one (ONNX Runtime for ONNX, torch.jit for TorchScript) and
    records how far it is from torch; a graph that baked the batch size in,
    or is further than :data:`CHECK_TOLERANCE` from torch, is removed and
    fails here (:class:`ExportError`) rather than in a job.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if detector.device.type != "cpu":
        raise ValueError(f"export traces on the CPU; the detector is on {detector.device} (load it with device='cpu')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    graph = ScoringGraph(detector.eval()).eval()
    example = example_input(detector)
    n_latents = len(detector.latent_shapes)
    with torch.inference_mode(False), torch.no_grad(), _quiet_tracer():
        if fmt == "onnx":
            _export_onnx(graph, example, path, n_latents, opset)
            _finish_onnx(path, detector)
        else:
            traced = torch.jit.trace(graph, (example,), check_trace=False, strict=False)
            traced.save(str(path))
    seconds = time.perf_counter() - start
    errors: tuple[float | None, float | None] = (None, None)
    if check:
        try:
            errors = check_export(detector, path, fmt)
            if any(error is not None and not error <= CHECK_TOLERANCE for error in errors):
                raise ExportError(f"the exported graph is too far from torch (anomaly map {errors[0]:.2e} absolute, "
                                  f"latents {errors[1]:.2e} scaled, limit {CHECK_TOLERANCE:g}); nothing was written")
        except ExportError:
            path.unlink(missing_ok=True)  # no file a job could pick up
            raise
    log.info("exported %s (%s) to %s in %.1f s; difference to torch: anomaly %s, latents %s (scaled)",
             detector.config.kind, fmt, path, seconds, *errors)
    return ExportReport(path, fmt, errors[0], errors[1], seconds)


@contextmanager
def _quiet_tracer() -> Iterator[None]:
    """Silence what tracing a FrEIA flow always says.

    The tracer warns about every Python int it records (the sizes the flows
    read from their inputs: per-image sizes fixed by the input size, never
    the batch, which :func:`check_export` proves on another batch size), and
    torch 2.9+ calls ``torch.jit`` deprecated at every trace, save and load.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*|torch\.onnx.*")
        yield


def _export_onnx(graph: ScoringGraph, example: torch.Tensor, path: Path, n_latents: int, opset: int) -> None:
    outputs = [ANOMALY_NAME, *latent_names(n_latents)]
    dynamic = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    with _traced_shape_layer_norm(opset):
        try:
            torch.onnx.export(graph, (example,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True)
        except Exception as exc:  # the exporter raises many types; the caller needs one, with the cause
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc


@contextmanager
def _traced_shape_layer_norm(opset: int) -> Iterator[None]:
    """Let the exporter take ``F.layer_norm(x, x.shape[1:])``, for the duration of one export.

    Every flow standardizes its features with a LayerNorm over a shape read
    from the tensor (``standardize``). Traced, that shape is a list of
    ``aten::size`` values, and torch's own symbolic wants a constant list,
    so the export fails. ONNX's LayerNormalization needs only how many
    trailing axes are normalized (the list's length) and a scale of their
    sizes, which this symbolic takes from the input itself; the torch model
    is left as it is, and the op computes what torch's does.
    """
    if opset < 17:
        raise ExportError(f"the scoring graph needs ONNX opset >= 17 (LayerNormalization), got {opset}")
    torch.onnx.register_custom_op_symbolic("aten::layer_norm", _layer_norm_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::layer_norm", opset)


def _layer_norm_symbolic(g, input, normalized_shape, weight, bias, eps, cudnn_enable):  # noqa: A002 - torch's names
    """``aten::layer_norm`` as ONNX LayerNormalization over the last ``len(normalized_shape)`` axes.

    A missing weight becomes ones of the normalized axes' sizes: constants
    where the exporter knows those sizes, else expanded from the input's
    runtime shape (sizes after a backbone's dynamic "same" padding are not
    known statically). A missing bias is left out (an optional input of the
    op), which computes the same numbers as adding zeros.
    """
    from torch.onnx import symbolic_helper as helper

    if helper._is_packed_list(normalized_shape):
        axes = len(helper._unpack_list(normalized_shape))
    else:
        axes = len(helper._get_const(normalized_shape, "is", "normalized_shape"))
    sizes = helper._get_tensor_sizes(input)
    static = None if sizes is None else sizes[len(sizes) - axes:]
    dtype = torch.float32
    if helper._is_none(weight):
        if static is not None and all(isinstance(size, int) for size in static):
            weight = g.op("Constant", value_t=torch.ones(static, dtype=dtype))
        else:
            shape = g.op("Shape", input, start_i=-axes)
            weight = g.op("Expand", g.op("Constant", value_t=torch.ones(1, dtype=dtype)), shape)
    epsilon = helper._get_const(eps, "f", "eps")
    if helper._is_none(bias):
        return g.op("LayerNormalization", input, weight, epsilon_f=epsilon, axis_i=-axes)
    return g.op("LayerNormalization", input, weight, bias, epsilon_f=epsilon, axis_i=-axes)


def _finish_onnx(path: Path, detector: UFlowDetector) -> None:
    """Declare the outputs' true shapes and write what a consumer needs into the file's metadata_props.

    The exporter's symbolic shape inference loses the spatial sizes after a
    backbone's dynamic "same" padding and then gives unrelated axes one name
    (it declared CFlow's latent heights as ``batch``, and every latent's width
    as one symbol); ONNX Runtime trusts declared shapes when it plans buffers
    and fails at run time. The detector knows every output's shape but the
    batch, so those are declared instead, and the exporter's guesses about
    intermediate values are dropped for the runtime to infer itself.
    """
    import onnx

    model = onnx.load(str(path))
    shapes = [tuple(detector.input_size), *[tuple(s) for s in detector.latent_shapes]]
    for output, shape in zip(model.graph.output, shapes):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "batch"
        for size in shape:
            dims.add().dim_value = int(size)
    del model.graph.value_info[:]
    metadata = {
        "uflow_batch_version": __version__,
        "kind": detector.config.kind,
        "backbone": detector.config.backbone.name,
        "backbone_sha256": detector.backbone_checksum(),
        "input_size": json.dumps(list(detector.input_size)),
        "mean": json.dumps(detector.mean.flatten().tolist()),
        "std": json.dumps(detector.std.flatten().tolist()),
        "latent_shapes": json.dumps([list(s) for s in detector.latent_shapes]),
        "test_views": str(detector.views),
        "input": f"{INPUT_NAME}: float32 (B, 3, H, W) = (uint8 images / 255 - mean) / std",
        "outputs": f"{ANOMALY_NAME}: (B, H, W) in [0, 1]; latent_l: (B, C_l, H_l, W_l), finest first",
    }
    onnx.helper.set_model_props(model, metadata)
    model.doc_string = f"uflow-batch {detector.config.kind} scoring graph (backbone + flow + anomaly map)"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on the file, with ``threads`` intra-op threads (default: torch's count).

    One inter-op thread: the graph is a chain, and the scoring actors already
    run one per reserved CPU group.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_exported(session, normalized: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(anomaly map, latents) from an ONNX Runtime session, as torch tensors on the CPU."""
    outputs = session.run(None, {INPUT_NAME: normalized.detach().cpu().numpy()})
    tensors = [torch.from_numpy(o) for o in outputs]
    return tensors[0], tensors[1:]


def check_export(detector: UFlowDetector, path: str | Path, fmt: str, batch: int = EXAMPLE_BATCH + 1,
                 seed: int = 1) -> tuple[float | None, float | None]:
    """How far the written graph is from torch: (max absolute error of the anomaly map, max scaled error of the latents).

    On random normalized input of another batch size than the traced one,
    so a baked-in batch size fails (:class:`ExportError`). Latents are
    compared as ``|graph - torch| / (1 + |torch|)``: absolute near zero,
    relative where an untypical image sends them far out. ``(None, None)``
    when ONNX Runtime is not installed.
    """
    normalized = example_input(detector, batch, seed)
    with torch.inference_mode():
        expected = ScoringGraph(detector)(normalized)
    if fmt == "onnx":
        try:
            session = onnx_session(path)
        except ImportError:
            log.warning("onnxruntime is not installed: %s was not checked against torch", path)
            return None, None
        anomaly, latents = run_exported(session, normalized)
        got = (anomaly, *latents)
    else:
        with torch.inference_mode(), _quiet_tracer():
            got = torch.jit.load(str(path))(normalized)
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        raise ExportError(f"{path}: the graph gives shapes {[tuple(g.shape) for g in got]} for a batch of {batch}, "
                          f"torch {[tuple(e.shape) for e in expected]}")
    return max_abs_difference(got[:1], expected[:1]), max_scaled_difference(got[1:], expected[1:])


def max_abs_difference(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    return max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected))


def max_scaled_difference(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """max |got - expected| / (1 + |expected|): the float32 round-off scale of values of any magnitude."""
    return max(float(((g.float() - e.float()).abs() / (1 + e.float().abs())).max()) for g, e in zip(got, expected))
