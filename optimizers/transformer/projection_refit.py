"""Output-projection refit: the retraining-free step after Kwon et al.'s mask tuning.

Mask tuning rescales each kept head / neuron by one scalar. After pruning, the attention
output projection ``o`` and the FFN output projection ``fo`` are linear maps of what the kept
units produce, so the whole matrix (and bias) can be refitted in closed form instead: per
sublayer, weighted least squares from the pruned model's own activations (kept heads'
context, kept neurons' activations) to the unpruned layer's pre-LayerNorm output minus the
pruned model's residual input. Rows are weighted by ``1 / var`` of the teacher's pre-LN
vector, so every token counts in LayerNorm's output scale; each output column is its own
least-squares problem, so MiniLM's outlier dimensions cannot drown the others (what made a
shared-scale pre-LN fit fail, see ``structured_prune``). This is a layer-wise reconstruction
in the spirit of bias/weight compensation after structured pruning (e.g. FLAP, ZipLM); no
gradient step is taken.

Every fifth tuning batch is held out: a sublayer's refit is kept only if it lowers that
sublayer's post-LayerNorm error on the held-out tokens, and the refitted model only if its
pooled embeddings on them are closer to the unpruned model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from optimizers.transformer.encoder import SlimEncoder, mean_pool
from optimizers.transformer.structured_prune import (
    Batch,
    _context,
    _rel_err,
    _unflatten,
    layer_targets,
    real_token_batches,
)

MIN_TOKENS_PER_PARAMETER = 4
"""A sublayer is refitted only with at least this many fitting tokens per weight column row
(``kept units + 1``); below that the least-squares fit would memorise the calibration text."""


def with_ridge(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``gram`` (bias row/column last) plus a ridge of ``damp`` times its mean diagonal on
    every row but the bias, which is not shrunk."""
    k = gram.shape[0] - 1
    ridge = damp * float(gram.diagonal()[:-1].mean()) + 1e-12 if k else 0.0
    return gram + torch.diag(torch.cat([gram.new_full((k,), ridge), gram.new_zeros(1)]))


def _weighted_lstsq(
    a: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [k, d]``, ``b [d]`` minimising ``sum_n weight_n |a_n W + b - r_n|^2`` plus
    ``damp * mean(diag(a^T a))`` times ``|W|^2`` (FP64 normal equations)."""
    a1 = torch.cat([a, a.new_ones(a.shape[0], 1)], 1).double()
    aw = a1 * weight[:, None].double()
    gram = a1.T @ aw
    solution = torch.linalg.solve(with_ridge(gram, damp), aw.T @ r.double())
    return solution[:-1].float(), solution[-1].float()


def _refit_linear(
    linear: torch.nn.Linear,
    ln: torch.nn.LayerNorm,
    act: torch.Tensor,
    residual: torch.Tensor,
    teacher_pre_ln: torch.Tensor,
    fit: torch.Tensor,
    damp: float,
) -> dict[str, Any]:
    """Refit ``linear`` (in place) so ``LN(linear(act) + residual)`` follows the teacher;
    ``fit`` marks the fitting rows, the rest validate. Returns the sublayer's errors."""
    val = ~fit
    target = ln(teacher_pre_ln)
    before = _rel_err(ln(linear(act[val]) + residual[val]), target[val])
    row = {"error_before": before, "error_after": before, "refit": False}
    k = act.shape[1]
    if k == 0 or int(fit.sum()) < MIN_TOKENS_PER_PARAMETER * (k + 1):
        row["skipped"] = "no kept units" if k == 0 else "too few calibration tokens"
        return row
    weight = 1.0 / teacher_pre_ln[fit].var(-1).clamp(min=1e-6)
    w, b = _weighted_lstsq(act[fit], teacher_pre_ln[fit] - residual[fit], weight, damp)
    after = _rel_err(ln(act[val] @ w + b + residual[val]), target[val])
    if after < before and bool(torch.isfinite(w).all()):
        linear.weight.copy_(w.T)
        linear.bias.copy_(b)
        row.update(error_after=after, refit=True)
    return row


def pooled(hidden: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised rows of every batch in ``hidden``, concatenated."""
    return torch.cat(
        [F.normalize(mean_pool(h, m), dim=-1) for h, m in zip(hidden, masks, strict=True)]
    )


def held_out_split(real: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Every fifth tuning batch is held out: (``fit`` flag per real token, held-out batch
    indices)."""
    held_out = [i % 5 == 4 for i in range(len(real))]
    fit = torch.cat(
        [
            torch.full((int(r.sum()),), not h, dtype=torch.bool)
            for r, h in zip(real, held_out, strict=True)
        ]
    )
    return fit, [i for i, h in enumerate(held_out) if h]


@torch.no_grad()
def refit_projections(
    teacher: SlimEncoder,
    pruned: SlimEncoder,
    calibration: Sequence[Batch],
    damp: float = 1e-3,
    max_tokens: int = 32768,
    check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Refit ``pruned``'s attention and FFN output projections in place (layer by layer, on
    its own inputs, against ``teacher``'s outputs); returns the per-sublayer held-out errors
    and the held-out pooled cosine before and after. ``pruned`` is left as it was when the
    refit does not bring its held-out embeddings closer to the teacher's."""
    batches, tensors, real, biases = real_token_batches(teacher, calibration, max_tokens)
    if len(batches) < 5:
        return {"skipped": f"{len(batches)} calibration batches; refit needs at least 5"}
    masks = [mask for _, mask in tensors]
    fit, val_ids = held_out_split(real)
    val_masks = [masks[i] for i in val_ids]
    want = pooled([teacher(*tensors[i]) for i in val_ids], val_masks)

    def pooled_cosine(model: SlimEncoder) -> float:
        got = pooled([model(*tensors[i]) for i in val_ids], val_masks)
        return float((want * got).sum(-1).mean())

    before = pooled_cosine(pruned)
    saved = {k: v.clone() for k, v in pruned.state_dict().items()}
    t_hidden = [teacher.embed(ids, mask) for ids, mask in tensors]
    s_hidden = [pruned.embed(ids, mask) for ids, mask in tensors]
    layers: list[dict[str, Any]] = []
    for index, (t_layer, s_layer) in enumerate(zip(teacher.layers, pruned.layers, strict=True)):
        if check is not None:
            check()
        t_pre1, _, t_pre2, t_out = layer_targets(t_layer, t_hidden, biases, real)
        xs = torch.cat([h[r] for h, r in zip(s_hidden, real, strict=True)])
        if s_layer.heads:
            ctx = _context(s_layer, s_hidden, biases, real)
        else:
            ctx = xs.new_zeros(xs.shape[0], 0)
        attention = _refit_linear(s_layer.o, s_layer.ln1, ctx, xs, t_pre1, fit, damp)
        h1 = s_layer.ln1(s_layer.o(ctx) + xs)
        act = s_layer.act(s_layer.fi(h1))
        ffn = _refit_linear(s_layer.fo, s_layer.ln2, act, h1, t_pre2, fit, damp)
        layers.append({"layer": index, "attention": attention, "ffn": ffn})
        t_hidden = _unflatten(t_out, real)
        s_hidden = _unflatten(s_layer.ln2(s_layer.fo(act) + h1), real)
    after = pooled_cosine(pruned)
    kept = after >= before
    if not kept:
        pruned.load_state_dict(saved)
    return {
        "fit_tokens": int(fit.sum()),
        "held_out_tokens": int((~fit).sum()),
        "held_out_cosine_before": before,
        "held_out_cosine_after": after,
        "kept": kept,
        "layers": layers,
    }
