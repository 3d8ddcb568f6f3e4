"""Fidelity of a candidate to the original: cosine, max abs error, top-1, task accuracy.

Transformer encoders are compared on sentence embeddings (mean of ``last_hidden_state`` over
the attention mask, sentence-transformers style); other models on their flattened outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def run_batches(session: Any, batches: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs of ``session`` for each batch (inputs the graph does not take are dropped)."""
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in b.items() if k in names}) for b in batches]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over the sequence axis: ``[B, S, H]`` x ``[B, S]`` -> ``[B, H]``."""
    weights = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(1), 1e-9)


def _rows(output: np.ndarray, batch: dict[str, np.ndarray], family: str) -> np.ndarray:
    output = np.asarray(output)
    mask = batch.get("attention_mask")
    if (
        family == "transformer"
        and output.ndim == 3
        and mask is not None
        and mask.shape == output.shape[:2]
    ):
        return mean_pool(output, mask)
    if output.ndim == 0:
        return output.reshape(1, 1).astype(np.float64)
    return output.reshape(output.shape[0], -1).astype(np.float64)


def _real_tokens(diff: np.ndarray, batch: dict[str, np.ndarray], family: str) -> np.ndarray:
    """``diff`` at real tokens only for a transformer's per-token output: what a model computes
    at padding positions is not an output (a packed graph writes zeros there)."""
    mask = batch.get("attention_mask")
    if family == "transformer" and mask is not None and mask.shape == diff.shape[:2]:
        return diff[mask.astype(bool)]
    return diff


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (two zero rows count as identical)."""
    dot = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = norms == 0
    return np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))


def compare(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    batches: Sequence[dict[str, np.ndarray]],
    *,
    family: str,
    labels: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Fidelity metrics of ``candidate`` outputs against ``reference`` outputs.

    ``cosine`` (mean over examples, minimum over float outputs), ``cosine_min`` (worst
    example), ``max_abs_error`` (at real tokens for transformers); for ``[B, C]`` outputs
    ``top1_agreement``; with labels ``accuracy``, ``reference_accuracy`` and ``accuracy_drop``.
    """
    cosines: dict[int, list[np.ndarray]] = {}
    max_abs = 0.0
    agree = total = correct = ref_correct = 0
    for index, (ref_outs, cand_outs, batch) in enumerate(
        zip(reference, candidate, batches, strict=True)
    ):
        for position, (ref, cand) in enumerate(zip(ref_outs, cand_outs, strict=True)):
            ref, cand = np.asarray(ref), np.asarray(cand)
            if ref.dtype.kind not in "fc":
                same = np.array_equal(ref, cand)
                cosines.setdefault(position, []).append(np.array([1.0 if same else 0.0]))
                continue
            if ref.shape != cand.shape:
                raise ValueError(f"output {position}: shape {cand.shape} != original {ref.shape}")
            diff = _real_tokens(
                np.abs(ref.astype(np.float64) - cand.astype(np.float64)), batch, family
            )
            max_abs = max(max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
            cosines.setdefault(position, []).append(
                cosine_rows(_rows(ref, batch, family), _rows(cand, batch, family))
            )
        first_ref, first_cand = np.asarray(ref_outs[0]), np.asarray(cand_outs[0])
        if first_ref.ndim == 2 and first_ref.shape[1] > 1 and first_ref.dtype.kind == "f":
            ref_top, cand_top = first_ref.argmax(axis=1), first_cand.argmax(axis=1)
            agree += int((ref_top == cand_top).sum())
            total += len(ref_top)
            if labels is not None:
                truth = np.asarray(labels[index]).reshape(-1)
                correct += int((cand_top == truth).sum())
                ref_correct += int((ref_top == truth).sum())
    per_output = [np.concatenate(values) for values in cosines.values()]
    metrics: dict[str, float] = {
        "cosine": float(min(np.nanmean(v) for v in per_output)) if per_output else 1.0,
        "cosine_min": float(min(np.nanmin(v) for v in per_output)) if per_output else 1.0,
        "max_abs_error": max_abs,
    }
    if total:
        metrics["top1_agreement"] = agree / total
        if labels is not None:
            metrics["accuracy"] = correct / total
            metrics["reference_accuracy"] = ref_correct / total
            metrics["accuracy_drop"] = (ref_correct - correct) / total
        else:
            metrics["accuracy_drop"] = 1.0 - agree / total
    return metrics


def within_bound(metrics: dict[str, float], bound: dict[str, float]) -> tuple[bool, str]:
    """Whether ``metrics`` satisfy ``bound``; the reason names the violated limit."""
    if "min_cosine" in bound:
        cosine = metrics.get("cosine", float("nan"))
        if not cosine >= bound["min_cosine"]:
            return False, f"cosine {cosine:.4f} < min_cosine {bound['min_cosine']}"
    if "max_accuracy_drop" in bound:
        drop = metrics.get("accuracy_drop")
        if drop is None:
            return False, "accuracy drop unmeasurable: the model has no [batch, classes] output"
        limit = bound["max_accuracy_drop"]
        if drop > limit:
            return False, f"accuracy drop {drop:.4f} > max_accuracy_drop {limit}"
    return True, "within bound"
