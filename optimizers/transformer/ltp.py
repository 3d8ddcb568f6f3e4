"""Learned token-pruning thresholds (Kim et al., "Learned Token Pruning", KDD 2022).

A soft version of ``TokenPrunedEncoder``: after layer ``i`` each token keeps a presence
``p *= sigmoid((log(importance) - log(threshold_i)) / T)`` instead of a hard keep/drop. The
presence scales the token as a key in later layers (additive ``log p`` in the attention bias,
so a present token is attended normally and an absent one not at all), weights it as a query
in later importances, and hands its pooling weight to the kept tokens (evenly: the
``survivors`` pool of ``TokenPrunedEncoder``; or by attention: ``carry``). At presences 0/1
this is exactly the hard model.

Only the thresholds train (one per layer but the last, in log-importance units), for a few
hundred steps on unlabeled text: loss = (1 - cosine to the unpruned model's mean-pooled
embedding) + ``keep_weight`` x (mean fraction of real tokens entering layers 2..L). The
encoder's weights stay frozen. At inference the thresholds are applied hard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from optimizers.transformer.encoder import SlimEncoder, key_bias, mean_pool

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class LTPConfig:
    """Training settings for the thresholds."""

    steps: int = 120
    lr: float = 0.1
    temperature: float = 0.25
    keep_weight: float = 0.02
    max_seconds: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.keep_weight < 0:
            raise ValueError(f"keep_weight must be >= 0, got {self.keep_weight}")


class SoftTokenPruner(nn.Module):
    """The encoder (frozen) with trainable log-thresholds and soft token presence."""

    def __init__(
        self,
        encoder: SlimEncoder,
        init_thresholds: Sequence[float | None],
        temperature: float,
        pool: str = "survivors",
    ) -> None:
        super().__init__()
        if pool not in ("carry", "survivors"):
            raise ValueError(f"soft pruning pools by 'carry' or 'survivors', not {pool!r}")
        self.pool = pool
        self.encoder = encoder
        n = len(encoder.layers)
        if len(init_thresholds) != n:
            raise ValueError(f"need one threshold per layer ({n}), got {len(init_thresholds)}")
        # the last layer never prunes (nothing after it to save)
        init = [
            math.log(max(t, 1e-3)) if t is not None else math.log(1e-3)
            for t in init_thresholds[: n - 1]
        ]
        self.log_thresholds = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        self.temperature = temperature

    def thresholds(self) -> list[float | None]:
        """Hard thresholds for ``TokenPrunedEncoder`` (None for the last layer)."""
        return [float(t) for t in self.log_thresholds.detach().exp()] + [None]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(mean-pooled embedding ``[B, H]``, presence ``[B, S]`` entering each layer)."""
        enc = self.encoder
        mask = attention_mask.to(torch.float32)
        h = enc.embed(input_ids, attention_mask)
        s = h.shape[1]
        eye = torch.eye(s).unsqueeze(0)
        share = eye * mask.unsqueeze(-1)
        presence = mask
        first = torch.zeros_like(mask)
        first[:, 0] = 1.0
        entering = []
        for i, layer in enumerate(enc.layers):
            entering.append(presence)
            bias = (
                key_bias(mask)
                + torch.log(presence.clamp(min=1e-30))[:, None, None, :] * mask[:, None, None, :]
            )
            h, probs = layer(h, bias)
            if i == len(enc.layers) - 1 or probs is None:
                continue
            attn = probs.mean(1)  # [B, query, key]
            imp = (attn * presence.unsqueeze(-1)).sum(1)
            logit = (torch.log(imp.clamp(min=1e-6)) - self.log_thresholds[i]) / self.temperature
            stay = torch.maximum(torch.sigmoid(logit), first) * mask
            new_presence = presence * stay
            carry = new_presence.unsqueeze(1).expand(-1, s, -1)
            if self.pool == "carry":
                carry = attn * carry
            carry = carry / carry.sum(-1, keepdim=True).clamp(min=1e-12)
            step = stay.unsqueeze(-1) * eye + (1.0 - stay).unsqueeze(-1) * carry
            share = torch.matmul(share, step)
            presence = new_presence
        out = torch.matmul(share, h * mask.unsqueeze(-1))
        return mean_pool(out, attention_mask), entering


def learn_thresholds(
    encoder: SlimEncoder,
    calibration: Sequence[Batch],
    init_thresholds: Sequence[float | None],
    config: LTPConfig = LTPConfig(),
    reference: nn.Module | None = None,
    check: Callable[[], None] | None = None,
    pool: str = "survivors",
) -> tuple[list[float | None], dict[str, Any]]:
    """Train the thresholds against ``reference``'s (default ``encoder``'s) pooled embeddings.

    Returns the hard thresholds and a report (loss/keep history, seconds, steps run).
    """
    reference = encoder if reference is None else reference
    if not calibration:
        raise ValueError("learning thresholds needs calibration batches")
    tensors = [
        (torch.as_tensor(b["input_ids"]), torch.as_tensor(b["attention_mask"])) for b in calibration
    ]
    with torch.no_grad():
        targets = [mean_pool(reference(ids, mask), mask) for ids, mask in tensors]
    model = SoftTokenPruner(encoder, init_thresholds, config.temperature, pool)
    flags = [p.requires_grad for p in encoder.parameters()]
    for p in encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([model.log_thresholds], lr=config.lr)
    gen = np.random.default_rng(config.seed)
    history = []
    start, cpu0 = time.perf_counter(), time.process_time()
    steps = 0
    try:
        with torch.enable_grad():
            for step in range(config.steps):
                if check is not None:
                    check()
                if time.perf_counter() - start > config.max_seconds:
                    break
                j = int(gen.integers(len(tensors)))
                ids, mask = tensors[j]
                pooled, entering = model(ids, mask)
                cos = F.cosine_similarity(pooled, targets[j]).mean()
                real = mask.float().sum()
                kept = torch.stack([p.sum() / real for p in entering[1:]]).mean()
                loss = (1.0 - cos) + config.keep_weight * kept
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps = step + 1
                if step % 10 == 0 or step == config.steps - 1:
                    history.append(
                        {
                            "step": step,
                            "cosine": float(cos.detach()),
                            "keep_fraction": float(kept.detach()),
                            "loss": float(loss.detach()),
                        }
                    )
    finally:
        for p, flag in zip(encoder.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    report = {
        "steps": steps,
        "seconds_wall": time.perf_counter() - start,
        "seconds_cpu": time.process_time() - cpu0,
        "temperature": config.temperature,
        "keep_weight": config.keep_weight,
        "history": history,
        "initial_thresholds": [t if t is None else float(t) for t in init_thresholds],
    }
    return model.thresholds(), report
