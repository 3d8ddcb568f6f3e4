"""Token pruning (after Kim et al., "Learned Token Pruning", KDD 2022), exportable to ONNX.

After each layer, a token's importance is the attention it received in that layer, averaged
over heads and over the real query positions, and normalised by the number of real tokens
(so a uniform attention gives 1 at any sequence length). Tokens whose importance is below the
layer's threshold leave the sequence for the rest of the encoder; the first ([CLS]) token is
always kept. In the exported graph the sequence really shrinks: the kept count is computed
from the data, the kept tokens are gathered with TopK/GatherElements into a shorter tensor
(padded to the batch's largest kept count, the rest masked), so later layers cost less.

Outputs keep the original sequence positions: a pruned token's row of ``last_hidden_state``
holds its hidden state from the layer where it left the sequence (it is not updated by later
layers), and the mean-pooled sentence embedding pools those rows. Use the pooled embedding (or
the [CLS] row); per-token outputs of pruned tokens are approximations by design.

Thresholds here are **calibrated**, not learned: for a keep schedule (the fraction of tokens
still present after each layer, falling linearly to ``final_keep``), each layer's threshold is
the quantile of the importances seen on calibration data that keeps that fraction;
``calibrate_for_fidelity`` bisects ``final_keep`` to the most aggressive schedule whose
calibration cosine stays at or above the bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from optimizers.transformer.encoder import SlimEncoder, key_bias, mean_pool

Batch = dict[str, np.ndarray]


def token_importance(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised importance ``[B, S]``: attention received, mean over heads and real queries,
    times the number of real tokens (uniform attention -> 1)."""
    m = mask.to(probs.dtype)
    received = (probs.mean(1) * m.unsqueeze(-1)).sum(1)  # sum over real queries
    return received / m.sum(1, keepdim=True).clamp(min=1.0) * m.sum(1, keepdim=True)


def order_score(keep: torch.Tensor) -> torch.Tensor:
    """TopK score without ties: kept tokens first, each group in original order (so the
    first token stays at index 0 and torch and ONNX Runtime pick the same tokens)."""
    s = keep.shape[1]
    rank = torch.arange(s, dtype=keep.dtype)
    return keep * s + (s - 1 - rank) / s


class TokenPrunedEncoder(nn.Module):
    """``(input_ids, attention_mask) -> (last_hidden_state [B, S, H], embedding [B, H],
    seq_lens [L] int64)``.

    ``thresholds[i]`` (None = no pruning) applies after layer ``i``. ``last_hidden_state``
    keeps the original positions: a pruned token's row holds its hidden state from the layer
    where it left (so mean pooling it gives ``embedding``). ``seq_lens[i]`` is the sequence
    length entering layer ``i`` (for reports and tests).
    """

    def __init__(self, encoder: SlimEncoder, thresholds: Sequence[float | None]) -> None:
        super().__init__()
        if len(thresholds) != len(encoder.layers):
            raise ValueError(
                f"need one threshold per layer ({len(encoder.layers)}), got {len(thresholds)}"
            )
        self.encoder = encoder
        self.thresholds = [None if t is None else float(t) for t in thresholds]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None):
        enc = self.encoder
        mask = attention_mask.to(torch.float32)
        h = enc.embed(input_ids, attention_mask, token_type_ids)
        b, s, hidden = h.shape[0], h.shape[1], h.shape[2]
        out = torch.zeros_like(h)
        pos = torch.arange(s).unsqueeze(0).expand(b, s)  # original position of each row
        lens = []
        for layer, thr in zip(enc.layers, self.thresholds, strict=True):
            lens.append(torch.tensor(h.shape[1], dtype=torch.long).reshape(1))
            h, probs = layer(h, key_bias(mask))
            if thr is None or probs is None:
                continue
            imp = token_importance(probs, mask)
            first = torch.zeros_like(mask)
            first[:, 0] = 1.0
            keep = torch.maximum((imp >= thr).to(mask.dtype) * mask, first * mask)
            dropped = h * (mask - keep).unsqueeze(-1)
            out = out.scatter_add(1, pos.unsqueeze(-1).expand(-1, -1, hidden), dropped)
            k_max = keep.sum(1).max()
            k = torch.nonzero(torch.arange(h.shape[1]) < k_max).shape[0]  # dynamic length
            idx = torch.topk(order_score(keep), k, dim=1).indices
            h = torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, hidden))
            mask = torch.gather(keep, 1, idx)
            pos = torch.gather(pos, 1, idx)
        final = h * mask.unsqueeze(-1)
        out = out.scatter_add(1, pos.unsqueeze(-1).expand(-1, -1, hidden), final)
        return out, mean_pool(out, attention_mask), torch.cat(lens)


class HiddenStateOnly(nn.Module):
    """Export wrapper keeping only the first output (``last_hidden_state``), so the graph's
    inputs and outputs match the original model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None):
        return self.model(input_ids, attention_mask, token_type_ids)[0]


@torch.no_grad()
def _importances_at(encoder: SlimEncoder, thresholds: list[float | None], layer_index: int,
                    calibration: Sequence[Batch]) -> np.ndarray:
    """Importances (non-first real tokens) at ``layer_index`` with earlier thresholds applied."""
    values = []
    for batch in calibration:
        mask = torch.as_tensor(batch["attention_mask"]).float()
        h = encoder.embed(torch.as_tensor(batch["input_ids"]), mask.long())
        for i, layer in enumerate(encoder.layers[: layer_index + 1]):
            h, probs = layer(h, key_bias(mask))
            if probs is None:
                if i == layer_index:
                    return np.zeros(0)
                continue
            imp = token_importance(probs, mask)
            if i == layer_index:
                sel = mask.bool().clone()
                sel[:, 0] = False
                values.append(imp[sel].numpy())
                break
            thr = thresholds[i]
            if thr is None:
                continue
            first = torch.zeros_like(mask)
            first[:, 0] = 1.0
            keep = torch.maximum((imp >= thr).float() * mask, first * mask)
            k = int(keep.sum(1).max())
            idx = torch.topk(order_score(keep), k, dim=1).indices
            h = torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, h.shape[2]))
            mask = torch.gather(keep, 1, idx)
    return np.concatenate(values) if values else np.zeros(0)


def keep_schedule(n_layers: int, final_keep: float, start_layer: int = 0) -> list[float]:
    """Fraction of tokens present after each layer: 1 until ``start_layer``, then linear to
    ``final_keep`` after the second-to-last layer (pruning after the last layer saves nothing)."""
    sched = []
    span = max(1, n_layers - 1 - start_layer)
    for i in range(n_layers):
        if i < start_layer or i >= n_layers - 1:
            sched.append(sched[-1] if sched else 1.0)
            continue
        sched.append(1.0 - (1.0 - final_keep) * (i - start_layer + 1) / span)
    return sched


def calibrate_thresholds(encoder: SlimEncoder, calibration: Sequence[Batch], final_keep: float,
                         start_layer: int = 0) -> list[float | None]:
    """Per-layer thresholds meeting ``keep_schedule(final_keep)`` on the calibration data."""
    n = len(encoder.layers)
    sched = keep_schedule(n, final_keep, start_layer)
    thresholds: list[float | None] = [None] * n
    prev = 1.0
    for i in range(n - 1):
        if sched[i] >= prev - 1e-9:
            continue
        imps = _importances_at(encoder, thresholds, i, calibration)
        if imps.size == 0:
            continue
        frac_drop = 1.0 - sched[i] / prev
        thresholds[i] = float(np.quantile(imps, frac_drop))
        prev = sched[i]
    return thresholds


@torch.no_grad()
def pooled_cosine(reference: nn.Module, pruned: TokenPrunedEncoder,
                  batches: Sequence[Batch]) -> np.ndarray:
    """Cosine between ``reference``'s mean-pooled embeddings and the token-pruned ones."""
    out = []
    for batch in batches:
        ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        a = mean_pool(reference(ids, mask), mask)
        b = pruned(ids, mask)[1]
        out.append(F.cosine_similarity(a, b).numpy())
    return np.concatenate(out)


@torch.no_grad()
def kept_tokens(pruned: TokenPrunedEncoder, batches: Sequence[Batch]) -> list[float]:
    """Average real tokens entering each layer, per sequence (for reports)."""
    enc = pruned.encoder
    totals = np.zeros(len(enc.layers))
    n = 0
    for batch in batches:
        mask = torch.as_tensor(batch["attention_mask"]).float()
        h = enc.embed(torch.as_tensor(batch["input_ids"]), mask.long())
        for i, (layer, thr) in enumerate(zip(enc.layers, pruned.thresholds, strict=True)):
            totals[i] += float(mask.sum())
            h, probs = layer(h, key_bias(mask))
            if thr is None or probs is None:
                continue
            imp = token_importance(probs, mask)
            first = torch.zeros_like(mask)
            first[:, 0] = 1.0
            keep = torch.maximum((imp >= thr).float() * mask, first * mask)
            idx = torch.topk(order_score(keep), int(keep.sum(1).max()), dim=1).indices
            h = torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, h.shape[2]))
            mask = torch.gather(keep, 1, idx)
        n += mask.shape[0]
    return (totals / max(n, 1)).tolist()


@dataclass(frozen=True)
class TokenPruneConfig:
    """Token pruning settings: a fixed ``final_keep`` or, if None, bisect for ``min_cosine``."""

    final_keep: float | None = None
    min_cosine: float = 0.99
    start_layer: int = 0
    steps: int = 5

    def __post_init__(self) -> None:
        if self.final_keep is not None and not 0.0 < self.final_keep <= 1.0:
            raise ValueError(f"final_keep must be in (0, 1], got {self.final_keep}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")


def token_prune(
    encoder: SlimEncoder, calibration: Sequence[Batch],
    config: TokenPruneConfig = TokenPruneConfig(),
    check: Callable[[], None] | None = None,
    reference: nn.Module | None = None,
) -> tuple[TokenPrunedEncoder, dict[str, Any]]:
    """Calibrate thresholds (bisecting the keep ratio when ``final_keep`` is None); fidelity is
    measured against ``reference`` (default: ``encoder`` itself, e.g. the unpruned original
    when ``encoder`` was structurally pruned)."""
    reference = encoder if reference is None else reference
    if not calibration:
        raise ValueError("token pruning needs calibration batches")

    def build(final_keep: float) -> tuple[TokenPrunedEncoder, float]:
        if check is not None:
            check()
        thr = calibrate_thresholds(encoder, calibration, final_keep, config.start_layer)
        model = TokenPrunedEncoder(encoder, thr)
        return model, float(pooled_cosine(reference, model, calibration).mean())

    tried = []
    if config.final_keep is not None:
        best, cos = build(config.final_keep)
        tried.append((config.final_keep, cos))
        best_keep = config.final_keep
    else:
        lo, hi = 0.1, 1.0  # hi always meets the bound (no pruning)
        best, best_keep = TokenPrunedEncoder(encoder, [None] * len(encoder.layers)), 1.0
        for _ in range(config.steps):
            mid = (lo + hi) / 2
            model, cos = build(mid)
            tried.append((mid, cos))
            if cos >= config.min_cosine:
                best, best_keep, hi = model, mid, mid
            else:
                lo = mid
    kept = kept_tokens(best, calibration)
    full = kept[0] if kept else 1.0
    report = {
        "technique": "token pruning (LTP importance = attention received), thresholds "
                     "calibrated per layer on calibration data (not learned); pooled output only",
        "final_keep": best_keep,
        "thresholds": best.thresholds,
        "avg_tokens_per_layer": kept,
        "token_fraction_per_layer": [k / full for k in kept] if full else [],
        "tried": [{"final_keep": k, "calibration_cosine": c} for k, c in tried],
    }
    return best, report
