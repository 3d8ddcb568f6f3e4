"""Small real inputs for the transformer technique tests."""

from __future__ import annotations

import numpy as np
import torch

from optimizers.transformer.encoder import SlimEncoder, mean_pool, random_encoder


def tiny_encoder(seed: int = 0, layers: int = 2) -> SlimEncoder:
    """A random-init 2-layer BERT-style encoder (hidden 64, 4 heads, FFN 128)."""
    return random_encoder(layers=layers, seed=seed)


def random_batches(
    n: int, batch: int, max_len: int, seed: int = 0, vocab: int = 200, min_len: int = 4
) -> list[dict[str, np.ndarray]]:
    """``n`` batches of random token ids with random lengths (padded with 0, mask 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(min_len, max_len + 1, size=batch)
        width = int(lengths.max())
        ids = rng.integers(1, vocab, size=(batch, width)).astype(np.int64)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@torch.no_grad()
def pooled_relative_error(
    teacher: SlimEncoder, model: SlimEncoder, batches: list[dict[str, np.ndarray]]
) -> float:
    """Mean over examples of |pooled(model) - pooled(teacher)| / |pooled(teacher)|."""
    errors = []
    for batch in batches:
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch["attention_mask"])
        want = mean_pool(teacher(ids, mask), mask)
        got = mean_pool(model(ids, mask), mask)
        errors.append(((got - want).norm(dim=1) / want.norm(dim=1)).numpy())
    return float(np.concatenate(errors).mean())
