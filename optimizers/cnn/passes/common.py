"""Helpers the CNN passes share: refusing quantized inputs, reading the calibration data."""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizers.passes.base import Artifact, PassContext, PassNotApplicable


def require_float(artifact: Artifact, name: str) -> None:
    if artifact.meta.get("quantized"):
        raise PassNotApplicable(
            f"{name} runs on float models; this one is already quantized "
            f"({artifact.meta['quantized']}): put {name} before quantization"
        )


def calibration_batches(ctx: PassContext, name: str) -> list[dict[str, np.ndarray]]:
    batches = list(ctx.calibration.get("inputs") or [])
    if not batches:
        raise PassNotApplicable(f"{name} needs calibration images")
    return batches


def evaluation(ctx: PassContext) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Held-out batches and their labels (concatenated), falling back to calibration data."""
    held = list(ctx.calibration.get("eval") or [])
    labels: Any = ctx.calibration.get("labels")
    if not held:
        return list(ctx.calibration.get("inputs") or []), None
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != sum(len(next(iter(b.values()))) for b in held):
            labels = None
    return held, labels
