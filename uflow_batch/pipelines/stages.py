"""The per-batch work of the scoring pipeline, as plain callables.

Ray Data runs these inside its tasks and actors, but nothing here imports
Ray: each stage takes and returns an Arrow table, so it can be tested (and
benchmarked) on its own. The model math stays in :mod:`uflow_batch.model`;
a stage only moves images in and rows out.

Every input row leaves as exactly one output row. Problems with one image
become that image's error row; only storage failures that a retry may fix
are raised, so that Ray retries the task instead of committing an error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .. import data, storage
from ..checkpoint import load_detector
from ..config import ConfigError
from ..manifest import ModelFormatError
from ..model import UFlowDetector, resolve_device
from ..model.backbones import BackboneWeightsError
from . import rows
from .blocks import DECODED_SCHEMA, ROUTED_SCHEMA

log = logging.getLogger(__name__)


def results_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=ROUTED_SCHEMA)


def _with_routing(row: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    return {**row, "run_date": item["run_date"], "pkey": item["pkey"]}


def _error_row(item: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    """The output row of an image that could not be scored, routed like its input."""
    return _with_routing(rows.error_row(item, code, message, item["width"], item["height"]), item)


def fetch_and_decode(batch: pa.Table, input_sizes: dict[str, tuple[int, int]], unusable: dict[str, str] | None = None) -> pa.Table:
    """Read each object and resize it to its category's model input (uint8, CHW bytes).

    Objects of a category without a usable model are not even read. An object
    that is gone becomes a ``read_error`` row; one that cannot be read for any
    other reason (a storage glitch, a denied permission, an expired token)
    fails the task, so that a retry or a corrected re-run scores it instead of
    committing an error for good.
    """
    out = [_fetch_one(item, input_sizes, unusable or {}) for item in batch.to_pylist()]
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


_NO_IMAGE = (FileNotFoundError, IsADirectoryError)  # the image's own row says so; any other failure is retried


def _fetch_one(item: dict[str, Any], input_sizes: dict[str, tuple[int, int]], unusable: dict[str, str]) -> dict[str, Any]:
    decoded = {**item, "width": None, "height": None, "pixels": None, "error": None, "error_message": None}
    category = item["category"]
    if category in unusable:
        return {**decoded, "error": "inference_error", "error_message": unusable[category]}
    if item["model_version"] is None or category not in input_sizes:
        return {**decoded, "error": "no_model", "error_message": f"no trained model for category {category!r}"}
    try:
        with storage.transient(f"read {item['image_uri']}", answers=_NO_IMAGE):  # else fail the task: Ray retries it
            raw = storage.read_bytes(item["image_uri"])
    except _NO_IMAGE as exc:
        return {**decoded, "error": "read_error", "error_message": f"{type(exc).__name__}: {exc}"}
    if decoded["object_size"] is None:
        decoded["object_size"] = len(raw)
    try:
        resized, (height, width) = data.decode_for_model(raw, input_sizes[category])
        pixels = resized.numpy().tobytes()
    except Exception as exc:  # noqa: BLE001 - whatever these bytes do to a decoder, it is this image's row
        message = str(exc) if isinstance(exc, data.ImageDecodeError) else f"{type(exc).__name__}: {exc}"
        return {**decoded, "error": "decode_error", "error_message": message}
    return {**decoded, "height": height, "width": width, "pixels": pixels}


_UNUSABLE_MODEL = (ModelFormatError, ConfigError, BackboneWeightsError, storage.ModelIntegrityError)


class CategoryScorer:
    """Batch inference with one model per category, loaded once per actor.

    Batches arrive mostly single-category (the listing is grouped by
    category), so a small LRU of loaded models keeps every model loaded once
    per actor rather than once per batch.
    """

    def __init__(self, models_url: str, device: str = "auto", epsilon: float | None = None,
                 false_alarm_rate: float | None = None, cache_size: int = 4, num_threads: int | None = None,
                 runtime: str = "torch") -> None:
        self.store = storage.ModelStore(models_url)
        self.device = resolve_device(device)
        # ONNX Runtime is the CPU path (measured 1.7x torch's full scoring on one thread); a GPU actor stays on torch.
        self.runtime = runtime if self.device.type == "cpu" else "torch"
        self.num_threads = num_threads
        self.epsilon = epsilon
        self.false_alarm_rate = false_alarm_rate
        self.cache_size = cache_size
        self.models: OrderedDict[tuple[str, str], UFlowDetector] = OrderedDict()
        if num_threads and self.device.type == "cpu":
            torch.set_num_threads(num_threads)

    def detector(self, category: str, version: str) -> UFlowDetector:
        key = (category, version)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        directory, _ = self.store.fetch(category, version)
        if self.runtime == "onnx":
            from ..onnx_scoring import load_onnx_detector  # the export extra: imported only when asked for

            detector = load_onnx_detector(directory, threads=self.num_threads)
        else:
            detector = load_detector(directory, device=self.device)
        self.models[key] = detector
        if len(self.models) > self.cache_size:
            self.models.popitem(last=False)
        log.info("loaded model %s/%s on %s", category, version, self.device)
        return detector

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[tuple[str, str], list[int]] = {}
        for index, item in enumerate(items):
            if item["error"]:
                out[index] = _error_row(item, item["error"], item["error_message"])
            else:
                groups.setdefault((item["category"], item["model_version"]), []).append(index)
        for (category, version), indices in groups.items():
            for index, row in zip(indices, self._score_group(category, version, [items[i] for i in indices])):
                out[index] = row
        return results_table(out)

    def _score_group(self, category: str, version: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:  # a model that fails to arrive is retried with the task rather than committed as errors
            with storage.transient(f"load model {category}/{version}", answers=_UNUSABLE_MODEL):
                detector = self.detector(category, version)
        except _UNUSABLE_MODEL as exc:  # unusable: every image says so
            message = f"model {category}/{version} cannot be used: {type(exc).__name__}: {exc}"
            return [_error_row(i, "inference_error", message) for i in items]
        try:
            return self._infer(detector, items)
        except Exception:  # noqa: BLE001 - find the image that breaks the batch
            log.warning("batch of %d %s images failed; scoring one by one", len(items), category, exc_info=True)
        scored = []
        for item in items:
            try:
                scored += self._infer(detector, [item])
            except Exception as exc:  # noqa: BLE001
                scored.append(_error_row(item, "inference_error", f"{type(exc).__name__}: {exc}"))
        return scored

    def _infer(self, detector: UFlowDetector, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        height, width = detector.input_size
        pixels = np.stack([np.frombuffer(i["pixels"], dtype=np.uint8).reshape(3, height, width) for i in items])
        images = torch.from_numpy(pixels)
        if self.device.type == "cuda":  # page-locked, so the copy to the GPU runs asynchronously
            images = images.pin_memory()
        results = detector.score(images, [(i["height"], i["width"]) for i in items],
                                  epsilon=self.epsilon, false_alarm_rate=self.false_alarm_rate)
        return [_with_routing(rows.result_row(i, r), i) for i, r in zip(items, results)]
