"""Padding removal (ByteDance effective_transformer style) that runs on ONNX Runtime's CPU provider.

``PackedEncoder`` gathers the real tokens of a padded batch into one ``[T, hidden]`` tensor
(``T`` = number of real tokens, data-dependent in the exported graph) once, at the embedding,
and keeps that layout through every layer: the fused Q/K/V projection, the output projection,
the FFN and the LayerNorms all run on the ``T`` packed rows. Attention runs per sequence over
its own rows only (``varlen_attention``: an ONNX ``Loop`` of ORT's fused CPU
``MultiHeadAttention`` without any mask, so no padding at all and ``sum(len_i^2)`` work); one
Gather brings each layer's context back into packed order. The last hidden state is scattered
back to ``[B, S, hidden]`` (padding rows are zero) and mean-pooled. ORT's own packing mode
(RemovePadding / PackedAttention) has no CPU kernel.

``bucket_by_length`` is the server-side half: group requests of similar length so each
batch pads little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from optimizers.transformer.encoder import SlimEncoder, SlimLayer, mean_pool
from optimizers.transformer.varlen_attention import (
    SequencePlan,
    sequence_plan,
    varlen_attention,
)


def packed_attention(layer: SlimLayer, h: torch.Tensor, plan: SequencePlan) -> torch.Tensor:
    """Self-attention context ``[T, heads*dh]`` of packed tokens ``h [T, hidden]``."""
    weight = torch.cat([layer.q.weight, layer.k.weight, layer.v.weight]).t()  # one MatMul
    bias = torch.cat([layer.q.bias, layer.k.bias, layer.v.bias])  # added inside the attention
    return varlen_attention(h @ weight, bias, plan, layer.heads)


class PackedEncoder(nn.Module):
    """``(input_ids, attention_mask) -> (last_hidden_state, embedding)`` without padding compute.

    Every row of ``attention_mask`` needs at least one real token (a row without any is
    accepted, its outputs are zero, but a batch without any real token is not).
    """

    def __init__(self, encoder: SlimEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ):
        enc = self.encoder
        b, s = input_ids.shape[0], input_ids.shape[1]
        mask = attention_mask.to(torch.long)
        flat = mask.reshape(-1)
        idx = torch.nonzero(flat).squeeze(1)  # [T] padded positions of the real tokens
        # padded position -> packed row, or the extra all-zero row T for padding (a Gather,
        # which ORT runs in parallel, instead of a ScatterND into a zero tensor)
        total = idx.shape[0]
        unpack = torch.where(flat > 0, torch.cumsum(flat, 0) - 1, torch.full_like(flat, total))
        ids = input_ids.reshape(-1)[idx]
        pos = enc.embeddings.position_ids(mask).reshape(-1)[idx]
        types = token_type_ids.reshape(-1)[idx] if token_type_ids is not None else None
        h = enc.embeddings(ids, pos, types)  # [T, hidden]
        plan = sequence_plan(mask, idx)
        for layer in enc.layers:
            ctx = packed_attention(layer, h, plan) if layer.heads > 0 else None
            h = layer.feed_forward(layer.attention_out(ctx, h))
        hidden = h.shape[1]
        rows = torch.cat([h, torch.zeros(1, hidden, dtype=h.dtype)], dim=0)
        out = rows[unpack].reshape(b, s, hidden)
        return out, mean_pool(out, mask)


def bucket_by_length(lengths: Sequence[int], max_batch: int) -> list[list[int]]:
    """Group request indices into as few batches of at most ``max_batch`` as possible, similar
    lengths together, so the padded tokens (``size * longest`` summed over batches) are minimal.

    Sorts by length and splits the sorted order optimally (dynamic programming over split
    points with the batch count fixed at ``ceil(n / max_batch)``). Each batch lists indices
    into ``lengths``, shortest first.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    srt = [lengths[i] for i in order]
    groups = -(-n // max_batch)
    inf = float("inf")
    # cost[g][i]: min padded tokens covering the first i sorted items with g batches
    cost = [[inf] * (n + 1) for _ in range(groups + 1)]
    back = [[0] * (n + 1) for _ in range(groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, groups + 1):
        for i in range(1, n + 1):
            for j in range(max(0, i - max_batch), i):
                if cost[g - 1][j] == inf:
                    continue
                c = cost[g - 1][j] + (i - j) * srt[i - 1]
                if c < cost[g][i]:
                    cost[g][i], back[g][i] = c, j
    bounds, i = [], n
    for g in range(groups, 0, -1):
        j = back[g][i]
        bounds.append((j, i))
        i = j
    return [[order[k] for k in range(j, i)] for j, i in reversed(bounds) if i > j]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens computed when each batch is padded to its longest member."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
