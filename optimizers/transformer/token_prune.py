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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from optimizers.transformer.encoder import SlimEncoder, key_bias, mean_pool
from optimizers.transformer.ltp import LTPConfig, learn_thresholds

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


POOL_MODES = ("carry", "survivors", "frozen")


def transfer_matrix(probs: torch.Tensor, keep: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, S, S]``: row ``j`` says how token ``j``'s weight is shared among the kept tokens.

    A kept token keeps its own weight; a dropped token hands it to the kept tokens in
    proportion to the attention it paid them in this layer (``carry``) or evenly
    (``survivors``). Rows of real tokens sum to 1, so the total weight is conserved.
    """
    s = keep.shape[1]
    rank = torch.arange(s)
    eye = (rank.unsqueeze(0) == rank.unsqueeze(1)).to(keep.dtype).unsqueeze(0)
    if pool == "carry":
        share = probs.mean(1) * keep.unsqueeze(1)
    else:
        share = keep.unsqueeze(1).expand(-1, s, -1)
    share = share / share.sum(-1, keepdim=True).clamp(min=1e-12)
    k = keep.unsqueeze(-1)
    return k * eye + (1.0 - k) * share


class TokenPrunedEncoder(nn.Module):
    """``(input_ids, attention_mask) -> (last_hidden_state [B, S, H], embedding [B, H],
    seq_lens [L] int64)``.

    ``thresholds[i]`` (None = no pruning) applies after layer ``i``. ``last_hidden_state``
    keeps the original positions and ``embedding`` is its mean over the real tokens. The row
    of a token that left the sequence depends on ``pool``:

    * ``survivors`` (default): the mean of the surviving tokens' final states (so the pooled
      embedding is the mean over the survivors; measured best on MiniLM);
    * ``carry``: the mix of the *final* states of the surviving tokens, weighted by the
      attention the token paid them when it left (chained through later drops; attention
      sinks such as [CLS]/[SEP] get most of it, which made it worse than ``survivors``);
    * ``frozen``: its own hidden state from the layer where it left (drifts: early-layer
      states differ strongly from final ones).

    Rows of surviving tokens are exact final states. ``seq_lens[i]`` is the sequence length
    entering layer ``i`` (for reports and tests).
    """

    def __init__(
        self, encoder: SlimEncoder, thresholds: Sequence[float | None], pool: str = "survivors"
    ) -> None:
        super().__init__()
        if len(thresholds) != len(encoder.layers):
            raise ValueError(
                f"need one threshold per layer ({len(encoder.layers)}), got {len(thresholds)}"
            )
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        self.encoder = encoder
        self.thresholds = [None if t is None else float(t) for t in thresholds]
        self.pool = pool

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ):
        enc = self.encoder
        mask = attention_mask.to(torch.float32)
        h = enc.embed(input_ids, attention_mask, token_type_ids)
        b, s, hidden = h.shape[0], h.shape[1], h.shape[2]
        frozen = torch.zeros_like(h)
        pos = torch.arange(s).unsqueeze(0).expand(b, s)  # original position of each row
        # share[b, original, current]: how each original token's row mixes current tokens
        rank = torch.arange(s)
        share = (rank.unsqueeze(0) == rank.unsqueeze(1)).to(mask.dtype) * mask.unsqueeze(-1)
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
            k_max = keep.sum(1).max()
            k = torch.nonzero(torch.arange(h.shape[1]) < k_max).shape[0]  # dynamic length
            idx = torch.topk(order_score(keep), k, dim=1).indices
            if self.pool == "frozen":
                dropped = h * (mask - keep).unsqueeze(-1)
                frozen = frozen.scatter_add(1, pos.unsqueeze(-1).expand(-1, -1, hidden), dropped)
                pos = torch.gather(pos, 1, idx)
            else:
                step = transfer_matrix(probs, keep, self.pool)
                step = torch.gather(step, 2, idx.unsqueeze(1).expand(-1, step.shape[1], -1))
                share = torch.matmul(share, step)
            h = torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, hidden))
            mask = torch.gather(keep, 1, idx)
        final = h * mask.unsqueeze(-1)
        if self.pool == "frozen":
            out = frozen.scatter_add(1, pos.unsqueeze(-1).expand(-1, -1, hidden), final)
        else:
            out = torch.matmul(share, final)
        return out, mean_pool(out, attention_mask), torch.cat(lens)


class HiddenStateOnly(nn.Module):
    """Export wrapper keeping only the first output (``last_hidden_state``), so the graph's
    inputs and outputs match the original model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ):
        return self.model(input_ids, attention_mask, token_type_ids)[0]


@torch.no_grad()
def _importances_at(
    encoder: SlimEncoder,
    thresholds: list[float | None],
    layer_index: int,
    calibration: Sequence[Batch],
) -> np.ndarray:
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


def calibrate_thresholds(
    encoder: SlimEncoder, calibration: Sequence[Batch], final_keep: float, start_layer: int = 0
) -> list[float | None]:
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
def pooled_cosine(
    reference: nn.Module, pruned: TokenPrunedEncoder, batches: Sequence[Batch]
) -> np.ndarray:
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


METHODS = ("learned", "calibrated")


@dataclass(frozen=True)
class TokenPruneConfig:
    """Token pruning settings.

    ``method="learned"`` (the pipeline pass's default): thresholds trained as in LTP
    (``optimizers.transformer.ltp``) from a calibrated start (``init_keep``), then shifted
    together (one factor, bisected) to the most aggressive setting whose calibration
    cosine is >= ``min_cosine`` (or, with ``final_keep``, the mildest one leaving at most
    that fraction of tokens for the last layer). ``method="calibrated"`` (this function's
    default; no training): per-layer quantile thresholds for a linear keep schedule,
    ``final_keep`` fixed or bisected for ``min_cosine``.
    """

    final_keep: float | None = None
    min_cosine: float = 0.99
    start_layer: int = 0
    steps: int = 5
    method: str = "calibrated"
    pool: str = "survivors"
    init_keep: float = 0.8
    ltp: LTPConfig = field(default_factory=LTPConfig)

    def __post_init__(self) -> None:
        if self.final_keep is not None and not 0.0 < self.final_keep <= 1.0:
            raise ValueError(f"final_keep must be in (0, 1], got {self.final_keep}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {self.pool!r}")
        if not 0.0 < self.init_keep <= 1.0:
            raise ValueError(f"init_keep must be in (0, 1], got {self.init_keep}")


@torch.no_grad()
def _targets(reference: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    out = []
    for batch in batches:
        ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        out.append(mean_pool(reference(ids, mask), mask))
    return out


@torch.no_grad()
def _cosine(
    model: TokenPrunedEncoder, batches: Sequence[Batch], targets: Sequence[torch.Tensor]
) -> float:
    cs = []
    for batch, target in zip(batches, targets, strict=True):
        ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        cs.append(F.cosine_similarity(model(ids, mask)[1], target))
    return float(torch.cat(cs).mean())


def _shifted(
    thresholds: Sequence[float | None], log_shift: float, start_layer: int
) -> list[float | None]:
    return [
        None if t is None or i < start_layer else t * math.exp(log_shift)
        for i, t in enumerate(thresholds)
    ]


def token_prune(
    encoder: SlimEncoder,
    calibration: Sequence[Batch],
    config: TokenPruneConfig = TokenPruneConfig(),
    check: Callable[[], None] | None = None,
    reference: nn.Module | None = None,
) -> tuple[TokenPrunedEncoder, dict[str, Any]]:
    """Learn or calibrate thresholds (see ``TokenPruneConfig``); fidelity is measured against
    ``reference`` (default: ``encoder`` itself, e.g. the unpruned original when ``encoder``
    was structurally pruned)."""
    reference = encoder if reference is None else reference
    if not calibration:
        raise ValueError("token pruning needs calibration batches")
    targets = _targets(reference, calibration)
    pool = config.pool
    n = len(encoder.layers)
    unpruned = TokenPrunedEncoder(encoder, [None] * n, pool)
    tried: list[dict[str, float]] = []
    extra: dict[str, Any] = {}

    def evaluate(thresholds: list[float | None], **key: float) -> tuple[TokenPrunedEncoder, float]:
        if check is not None:
            check()
        model = TokenPrunedEncoder(encoder, thresholds, pool)
        cos = _cosine(model, calibration, targets)
        tried.append({**key, "calibration_cosine": cos})
        return model, cos

    def last_fraction(model: TokenPrunedEncoder) -> float:
        kept = kept_tokens(model, calibration)
        return kept[-1] / kept[0] if kept and kept[0] else 1.0

    best, best_cos, best_keep = unpruned, 1.0, 1.0
    if config.method == "learned":
        init = calibrate_thresholds(encoder, calibration, config.init_keep, config.start_layer)
        learned, ltp_report = learn_thresholds(
            encoder,
            calibration,
            init,
            config.ltp,
            reference=reference,
            check=check,
            pool="carry" if pool == "carry" else "survivors",
        )
        learned = _shifted(learned, 0.0, config.start_layer)
        extra = {"ltp": ltp_report, "learned_thresholds": learned}
        lo, hi = -3.0, 1.5  # log-factor on all thresholds: lo prunes little, hi a lot
        best_shift = None
        for _ in range(config.steps):
            mid = (lo + hi) / 2
            model, cos = evaluate(_shifted(learned, mid, config.start_layer), log_shift=mid)
            if config.final_keep is not None:
                ok = last_fraction(model) <= config.final_keep
                if ok:
                    best, best_cos, best_shift, hi = model, cos, mid, mid
                else:
                    lo = mid
            elif cos >= config.min_cosine:
                best, best_cos, best_shift, lo = model, cos, mid, mid
            else:
                hi = mid
        extra["log_shift"] = best_shift
    elif config.final_keep is not None:
        thr = calibrate_thresholds(encoder, calibration, config.final_keep, config.start_layer)
        best, best_cos = evaluate(thr, final_keep=config.final_keep)
        best_keep = config.final_keep
    else:
        lo, hi = 0.1, 1.0  # hi always meets the bound (no pruning)
        for _ in range(config.steps):
            mid = (lo + hi) / 2
            thr = calibrate_thresholds(encoder, calibration, mid, config.start_layer)
            model, cos = evaluate(thr, final_keep=mid)
            if cos >= config.min_cosine:
                best, best_cos, best_keep, hi = model, cos, mid, mid
            else:
                lo = mid
    kept = kept_tokens(best, calibration)
    full = kept[0] if kept else 1.0
    how = (
        "learned as in LTP (soft mask, distillation to the unpruned pooled embedding, "
        "keep-ratio penalty), then shifted to the bound"
        if config.method == "learned"
        else "calibrated per layer (quantiles for a linear keep schedule)"
    )
    report = {
        "technique": f"token pruning (LTP importance = attention received); thresholds {how}; "
        f"pooled output, dropped tokens' rows pooled by {pool!r}",
        "method": config.method,
        "pool": pool,
        "final_keep": best_keep
        if config.method == "calibrated"
        else (kept[-1] / full if full else 1.0),
        "thresholds": best.thresholds,
        "calibration_cosine": best_cos,
        "avg_tokens_per_layer": kept,
        "token_fraction_per_layer": [k / full for k in kept] if full else [],
        "tried": tried,
        **extra,
    }
    return best, report
