"""Turning per-image outcomes into rows of the result schema.

Every input object becomes exactly one row: a scored row built from an
:class:`~uflow_batch.model.anomaly.ImageResult`, or an error row whose
``error`` code and ``error_message`` say what went wrong. Messages pass
through :func:`uflow_batch.storage.redact` so no credential reaches Parquet.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image

from ..model.anomaly import ImageResult
from ..scores.schema import ERROR_CODES, SCHEMA_VERSION
from ..storage import redact

MAX_ERROR_MESSAGE = 500


def encode_mask_png(mask: np.ndarray) -> bytes:
    """1-bit PNG: a defect mask of a 600x400 image is typically a few hundred bytes."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def object_fields(item: dict[str, Any]) -> dict[str, Any]:
    """Identity of the input object, carried unchanged from the listing."""
    return {
        "schema_version": SCHEMA_VERSION,
        "image_uri": item["image_uri"],
        "object_etag": item.get("object_etag"),
        "object_size": item.get("object_size"),
        "object_mtime": item.get("object_mtime"),
        "model_version": item.get("model_version"),
        "category": item["category"],
    }


def result_row(item: dict[str, Any], result: ImageResult) -> dict[str, Any]:
    return {
        **object_fields(item),
        "scored_at": now_utc(),
        "width": result.width,
        "height": result.height,
        "image_score": result.image_score,
        "max_neg_log10_nfa": result.max_neg_log10_nfa,
        "false_alarm_rate": result.false_alarm_rate,
        "is_anomalous": result.is_anomalous,
        "defect_area_px": result.defect_area_px,
        "defect_area_fraction": result.defect_area_fraction,
        "n_regions": len(result.regions),
        "regions": [r.as_dict() for r in result.regions],
        "mask_png": encode_mask_png(result.mask),
        "error": None,
        "error_message": None,
    }


def error_row(item: dict[str, Any], code: str, message: str, width: int | None = None, height: int | None = None) -> dict[str, Any]:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return {
        **object_fields(item),
        "scored_at": now_utc(),
        "width": width,
        "height": height,
        "image_score": None,
        "max_neg_log10_nfa": None,
        "false_alarm_rate": None,
        "is_anomalous": None,
        "defect_area_px": None,
        "defect_area_fraction": None,
        "n_regions": None,
        "regions": None,
        "mask_png": None,
        "error": code,
        "error_message": redact(message)[:MAX_ERROR_MESSAGE],
    }

