"""The model manifest: one typed, versioned record of what a saved detector is.

``manifest.json`` beside the weights is a model's whole description. The
scoring driver reads the input size from it before any weights are fetched,
the loader rebuilds the detector from it, evaluation reads the fair threshold
and ``calibrate`` the training split. One frozen dataclass holds it, so those
readers use attributes instead of key paths, and one parser validates it, so a
damaged or foreign file fails when it is read, with the file and the field
named, instead of as a ``KeyError`` deep inside scoring.

The JSON layout is the one every release has written (format 1); only
``fair_threshold`` is no longer repeated inside ``training``, and files that
still carry both copies read the same. Unknown keys are ignored rather than
refused: a field that a later release adds to format 1 must not make its
models unusable for an older scorer. A change that old readers would misread
raises ``MANIFEST_FORMAT`` instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import DetectorConfig, TrainConfig, from_dict, is_int
from .model.calibration import Calibration

MANIFEST_FORMAT = 1

Shape = tuple[int, ...]


class ModelFormatError(RuntimeError):
    """A model directory is incomplete, of another format, or does not fit its backbone."""


@dataclass(frozen=True)
class Normalization:
    """How pixels become backbone inputs, recorded for readers outside this package."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input: str = "RGB uint8 / 255"


@dataclass
class TrainingReport:
    """What fitting one category measured; filled in while training runs, hence not frozen."""

    category: str
    n_train: int
    n_val: int
    skipped_images: list[str] = field(default_factory=list)
    epochs: int = 0
    initial_val_loss: float = math.inf
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_val_nll_per_dim: float = math.inf
    final_train_loss: float = math.inf
    fair_threshold: float = math.nan
    val_image_scores: list[float] = field(default_factory=list)
    feature_seconds: float = 0.0
    fit_seconds: float = 0.0
    device: str = "cpu"
    data_fingerprint: str = ""


@dataclass(frozen=True)
class ModelManifest:
    """A saved detector's configuration, checksums, shapes, calibration and training record.

    The first fields describe the model itself and come from the detector
    when it is saved; ``category``, ``train_config`` and ``training`` are the
    training's record, absent from a model saved outside training.
    """

    package_version: str
    config: DetectorConfig
    backbone_sha256: str
    feature_shapes: tuple[Shape, ...]
    latent_shapes: tuple[Shape, ...]
    normalization: Normalization | None = None  # absent from the earliest manifests
    calibration: Calibration | None = None  # None: the verdict's theoretical background
    category: str | None = None
    train_config: TrainConfig | None = None
    training: TrainingReport | None = None
    format: int = MANIFEST_FORMAT

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.backbone.input_size

    @property
    def training_seconds(self) -> float:
        """Feature extraction plus flow fitting; NaN for a model saved outside training."""
        return math.nan if self.training is None else self.training.feature_seconds + self.training.fit_seconds

    @property
    def fair_threshold(self) -> float:
        """The anomaly-map level that raised no alarm on held-out normal images; NaN when unknown."""
        return math.nan if self.training is None else self.training.fair_threshold

    def to_json(self) -> str:
        """Strict JSON (non-finite numbers become null), keys sorted, absent record fields left out."""
        data = {key: value for key, value in asdict(self).items() if value is not None}
        if "training" in data:
            data["fair_threshold"] = data["training"].pop("fair_threshold")
        return json.dumps(_strict_json(data), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> ModelManifest:
        """Parse and validate a manifest; ``source`` (its file or URL) names it in every error."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ModelFormatError(f"{source} is not a JSON manifest: {exc}") from exc
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found != MANIFEST_FORMAT:
            raise ModelFormatError(f"{source}: manifest format {found!r}, this version reads {MANIFEST_FORMAT}")
        return _read_dataclass(cls, _in_current_layout(data), "", source)


def _in_current_layout(data: dict[str, Any]) -> dict[str, Any]:
    """Earlier writers' layout in today's terms: the same JSON means the same model.

    Manifests written before ``nfa.test`` existed were scored with the
    paper's block test; training wrote ``fair_threshold`` both at the top
    level and inside ``training`` (the top-level copy is the one readers used).
    """
    config = data.get("config")
    nfa = config.get("nfa", {}) if isinstance(config, dict) else None
    if isinstance(nfa, dict) and "test" not in nfa:
        data = {**data, "config": {**config, "nfa": {**nfa, "test": "block"}}}
    training = data.get("training")
    if isinstance(training, dict) and "fair_threshold" in data:
        data = {**data, "training": {**training, "fair_threshold": data["fair_threshold"]}}
    return data


# Objects that parse themselves: the configuration dataclasses check their own values.
_PARSERS: dict[type, Callable[[dict[str, Any]], Any]] = {
    DetectorConfig: lambda value: from_dict(DetectorConfig, value),
    TrainConfig: lambda value: from_dict(TrainConfig, value),
    Calibration: Calibration.from_dict,
}


def _read_dataclass(cls: type, data: Any, where: str, source: str) -> Any:
    """``cls`` from a JSON object, each field checked against its type hint."""
    if not isinstance(data, dict):
        raise _mistyped(source, where, "an object", data)
    hints = typing.get_type_hints(cls)
    values = {}
    for spec in dataclasses.fields(cls):
        name = f"{where}.{spec.name}" if where else spec.name
        if spec.name in data:
            values[spec.name] = _read_value(data[spec.name], hints[spec.name], name, source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ModelFormatError(f"{source}: manifest field {name!r} is missing")
    return cls(**values)


def _read_value(value: Any, hint: Any, where: str, source: str) -> Any:
    """One JSON value as ``hint`` (a dataclass, ``X | None``, list, tuple or scalar) says it must be."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint in _PARSERS:
        if not isinstance(value, dict):
            raise _mistyped(source, where, "an object", value)
        try:
            return _PARSERS[hint](value)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ModelFormatError(f"{source}: manifest field {where!r} is invalid: {detail}") from exc
    if dataclasses.is_dataclass(hint):
        return _read_dataclass(hint, value, where, source)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _mistyped(source, where, "a list", value)
        item = typing.get_args(hint)[0]
        return origin(_read_value(v, item, f"{where}[{i}]", source) for i, v in enumerate(value))
    if hint is float:
        if value is None:  # strict JSON wrote a non-finite statistic as null
            return math.nan
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _mistyped(source, where, "a number", value)
        return float(value)
    valid = is_int(value) if hint is int else isinstance(value, hint)
    if not valid:
        raise _mistyped(source, where, f"of type {hint.__name__}", value)
    return value


def _mistyped(source: str, where: str, expected: str, value: Any) -> ModelFormatError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return ModelFormatError(f"{source}: manifest field {where!r} must be {expected}, got {type(value).__name__} {shown}")


def _strict_json(value: Any) -> Any:
    """Manifest values as strict JSON: NaN/inf become null, tuples lists.

    Python would write ``NaN``, which most other JSON readers reject.
    """
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
