"""Retraining-free structured pruning (Kwon et al., NeurIPS 2022), on CPU and without labels.

1. **Fisher mask search**: masks on every head ``[L, H]`` and FFN neuron ``[L, F]``; the
   diagonal Fisher of the masks is estimated from gradients on calibration data. Without
   labels the model's output is treated as a Gaussian observation of its L2-normalised
   mean-pooled embedding: sampling the "label" from that model makes the log-likelihood
   gradient ``r . d(emb)/d(mask)`` with ``r ~ N(0, I)``, whose square is an unbiased estimate
   of the Fisher diagonal (the distillation loss at the unpruned model would have a zero
   gradient). Heads and neurons are then chosen to keep the most Fisher importance under
   the FLOPs budget (Kwon's search: for each number of heads, fill the rest with neurons).
2. **Mask rearrangement**: per layer, keeping the searched counts, the pruned set is
   re-chosen greedily against the layer's full (block-diagonal) empirical Fisher
   ``sum_b g_b g_b^T``, which accounts for interactions inside the layer.
3. **Mask tuning**: layer by layer, the kept heads' and neurons' scales are solved by
   ridge-regularised least squares (normal equations) so the pruned layer's pre-LayerNorm
   output, computed on the pruned model's own inputs, matches the unpruned layer's.
4. The pruned heads/neurons are **physically removed** and the scales folded into the
   output projections, so the exported graph has smaller matrices and no masks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch.nn import functional as F

from optimizers.transformer.encoder import (
    SlimEncoder,
    SlimLayer,
    count_parameters,
    key_bias,
    mean_pool,
)
from optimizers.transformer.flops import encoder_flops, head_flops, neuron_flops

Batch = dict[str, np.ndarray]
Progress = Callable[[str, float | None], None]


@dataclass
class Masks:
    """Kept heads/neurons per layer and the tuned scale of each kept unit."""

    heads: list[list[int]]
    neurons: list[list[int]]
    head_scales: list[np.ndarray] = field(default_factory=list)
    neuron_scales: list[np.ndarray] = field(default_factory=list)


@dataclass
class FisherStats:
    """Per-batch mask gradients: heads ``[N, L, H]`` and neurons ``[N, L, F]``."""

    head_grads: np.ndarray
    neuron_grads: np.ndarray

    @property
    def head_importance(self) -> np.ndarray:
        return (self.head_grads.astype(np.float64) ** 2).sum(0)

    @property
    def neuron_importance(self) -> np.ndarray:
        return (self.neuron_grads.astype(np.float64) ** 2).sum(0)


def _torch_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])


def fisher_gradients(
    encoder: SlimEncoder, calibration: Sequence[Batch], seed: int = 0,
    check: Callable[[], None] | None = None,
) -> FisherStats:
    """Gradients of ``r . normalize(pooled embedding)`` w.r.t. head and neuron masks, per batch."""
    spec = encoder.spec
    n_layers = len(encoder.layers)
    widths = {layer.heads for layer in encoder.layers} | {layer.ffn for layer in encoder.layers}
    if len(widths) > 2:
        raise ValueError("fisher_gradients needs an unpruned encoder (equal layer widths)")
    gen = torch.Generator().manual_seed(seed)
    head_mask = torch.ones(n_layers, spec.heads, requires_grad=True)
    neuron_mask = torch.ones(n_layers, spec.ffn, requires_grad=True)
    flags = [p.requires_grad for p in encoder.parameters()]
    for p in encoder.parameters():
        p.requires_grad_(False)
    hg, ng = [], []
    try:
        for batch in calibration:
            if check is not None:
                check()
            ids, mask = _torch_batch(batch)
            h = encoder(ids, mask, head_masks=head_mask, neuron_masks=list(neuron_mask))
            emb = F.normalize(mean_pool(h, mask), dim=-1)
            r = torch.randn(emb.shape, generator=gen)
            g_h, g_n = torch.autograd.grad((emb * r).sum(), [head_mask, neuron_mask])
            hg.append(g_h.numpy().copy())
            ng.append(g_n.numpy().copy())
    finally:
        for p, flag in zip(encoder.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return FisherStats(np.stack(hg), np.stack(ng))


def search_masks(
    head_importance: np.ndarray, neuron_importance: np.ndarray, budget: float,
    per_head: float, per_neuron: float,
) -> Masks:
    """Kwon's search: most kept importance with ``heads*ph + neurons*pn <= budget``."""
    n_layers, n_heads = head_importance.shape
    h_order = np.argsort(-head_importance, axis=None)
    n_order = np.argsort(-neuron_importance, axis=None)
    h_cum = np.concatenate([[0.0], np.cumsum(head_importance.ravel()[h_order])])
    n_cum = np.concatenate([[0.0], np.cumsum(neuron_importance.ravel()[n_order])])
    best, best_pair = -1.0, (0, 0)
    for kh in range(h_order.size + 1):
        left = budget - kh * per_head
        if left < 0:
            break
        kn = min(int(left // per_neuron), n_order.size)
        score = h_cum[kh] + n_cum[kn]
        if score > best:
            best, best_pair = score, (kh, kn)
    kh, kn = best_pair
    n_ffn = neuron_importance.shape[1]
    kept_h = np.zeros(n_layers * n_heads, bool)
    kept_h[h_order[:kh]] = True
    kept_n = np.zeros(n_layers * n_ffn, bool)
    kept_n[n_order[:kn]] = True
    kept_h = kept_h.reshape(n_layers, n_heads)
    kept_n = kept_n.reshape(n_layers, n_ffn)
    return Masks(
        heads=[list(np.flatnonzero(row)) for row in kept_h],
        neurons=[list(np.flatnonzero(row)) for row in kept_n],
    )


def _quadratic_loss(grads: np.ndarray, pruned: np.ndarray) -> float:
    """``(1-m)^T (sum_b g_b g_b^T) (1-m)``: Fisher estimate of the loss of pruning ``pruned``."""
    if pruned.size == 0:
        return 0.0
    return float((grads[:, pruned].sum(1) ** 2).sum())


def _greedy_pruned_set(grads: np.ndarray, n_prune: int) -> np.ndarray:
    """Greedily grow a pruned set minimising ``||sum_{i in P} g_i||^2`` over the batch grads."""
    n_units = grads.shape[1]
    total = np.zeros(grads.shape[0])
    chosen = np.zeros(n_units, bool)
    picks = []
    for _ in range(n_prune):
        cost = ((total[:, None] + grads) ** 2).sum(0)
        cost[chosen] = np.inf
        i = int(np.argmin(cost))
        chosen[i] = True
        picks.append(i)
        total += grads[:, i]
    return np.array(picks, dtype=int)


def rearrange_masks(masks: Masks, stats: FisherStats) -> tuple[Masks, dict[str, float]]:
    """Per layer, re-choose which units to prune (same counts) using the layer's full Fisher."""
    out = Masks(heads=[], neurons=[])
    before = after = 0.0
    for kind, grads_all, kept_lists, dst in (
        ("heads", stats.head_grads, masks.heads, out.heads),
        ("neurons", stats.neuron_grads, masks.neurons, out.neurons),
    ):
        del kind
        for layer, kept in enumerate(kept_lists):
            grads = grads_all[:, layer, :].astype(np.float64)
            n_units = grads.shape[1]
            diag_pruned = np.setdiff1d(np.arange(n_units), kept)
            loss_diag = _quadratic_loss(grads, diag_pruned)
            greedy = _greedy_pruned_set(grads, diag_pruned.size)
            loss_greedy = _quadratic_loss(grads, greedy)
            pruned = greedy if loss_greedy < loss_diag else diag_pruned
            before += loss_diag
            after += min(loss_greedy, loss_diag)
            dst.append(sorted(set(range(n_units)) - set(pruned.tolist())))
    return out, {"fisher_loss_search": before, "fisher_loss_rearranged": after}


def _ridge_scales(gram: np.ndarray, rhs: np.ndarray, damp: float) -> np.ndarray:
    """Scales ``s`` minimising ``||A s - t||^2 + lam ||s - 1||^2`` given ``A^T A`` and ``A^T t``."""
    k = gram.shape[0]
    if k == 0:
        return np.zeros(0)
    lam = damp * float(np.trace(gram)) / k + 1e-12
    ones = np.ones(k)
    delta = scipy.linalg.solve(gram + lam * np.eye(k), rhs - gram @ ones, assume_a="pos")
    return np.clip(ones + delta, -10.0, 10.0)


def _rel_err(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).norm() / target.norm().clamp(min=1e-12))


def _gather_tokens(encoder: SlimEncoder, calibration: Sequence[Batch], max_tokens: int):
    """Embedding outputs of the real tokens, grouped per batch (with bias for attention)."""
    items = []
    total = 0
    for batch in calibration:
        ids, mask = _torch_batch(batch)
        items.append((encoder.embed(ids, mask), key_bias(mask), mask.bool()))
        total += int(mask.sum())
        if total >= max_tokens:
            break
    return items


@torch.no_grad()
def tune_masks(
    encoder: SlimEncoder, masks: Masks, calibration: Sequence[Batch], damp: float = 1e-3,
    max_tokens: int = 4096, check: Callable[[], None] | None = None,
) -> tuple[Masks, list[dict[str, float]]]:
    """Layer-wise least-squares scales for the kept heads and neurons (see module docstring)."""
    items = _gather_tokens(encoder, calibration, max_tokens)
    teacher = [h for h, _, _ in items]
    student = [h.clone() for h, _, _ in items]
    tuned = Masks(heads=masks.heads, neurons=masks.neurons)
    errors: list[dict[str, float]] = []
    for li, layer in enumerate(encoder.layers):
        if check is not None:
            check()
        dh = layer.head_dim
        kept_h, kept_n = masks.heads[li], masks.neurons[li]
        # --- attention: per-head contributions on the student's input, target from the teacher
        contribs, targets, next_teacher, res, mlist = [], [], [], [], []
        for (_, bias, real), xt, xs in zip(items, teacher, student, strict=True):
            q, k, v = layer.project_qkv(xt)
            ctx_t, _ = layer.attend(q, k, v, bias)
            sum_t = layer.o(ctx_t) + xt
            next_teacher.append(sum_t)
            q, k, v = layer.project_qkv(xs)
            ctx_s, _ = layer.attend(q, k, v, bias)
            per_head = torch.stack([
                ctx_s[..., h * dh:(h + 1) * dh] @ layer.o.weight[:, h * dh:(h + 1) * dh].T
                for h in kept_h
            ]) if kept_h else torch.zeros(0, *xs.shape)
            contribs.append(per_head[:, real])
            targets.append((sum_t - xs - layer.o.bias)[real])
            res.append(xs)
            mlist.append(real)
        a = torch.cat(contribs, 1)  # [k, N, hidden]
        t = torch.cat(targets, 0)  # [N, hidden]
        gram = torch.einsum("inh,jnh->ij", a, a).double().numpy()
        rhs = torch.einsum("inh,nh->i", a, t).double().numpy()
        scales_h = _ridge_scales(gram, rhs, damp)
        s_t = torch.as_tensor(scales_h)
        err_before = _rel_err(a.sum(0), t) if kept_h else _rel_err(torch.zeros_like(t), t)
        err_after = (
            _rel_err(torch.einsum("i,inh->nh", s_t.float(), a), t) if kept_h else err_before
        )
        del a, contribs
        # student after the tuned attention
        h1_s, h1_t = [], []
        for (_, bias, _real), xs, sum_t in zip(items, res, next_teacher, strict=True):
            q, k, v = layer.project_qkv(xs)
            ctx_s, _ = layer.attend(q, k, v, bias)
            scale_vec = torch.zeros(layer.heads)
            scale_vec[kept_h] = s_t.float()
            ctx_s = ctx_s * scale_vec.repeat_interleave(dh)
            h1_s.append(layer.ln1(layer.o(ctx_s) + xs))
            h1_t.append(layer.ln1(sum_t))
        # --- FFN: a_nj * W[:, j] per kept neuron, target from the teacher's pre-LN2 sum
        acts, targets, new_teacher = [], [], []
        w = layer.fo.weight[:, kept_n]  # [hidden, k]
        for real, hs, ht in zip(mlist, h1_s, h1_t, strict=True):
            sum_t = layer.fo(layer.act(layer.fi(ht))) + ht
            new_teacher.append(layer.ln2(sum_t))
            acts.append(layer.act(layer.fi(hs))[..., kept_n][real])
            targets.append((sum_t - hs - layer.fo.bias)[real])
        act = torch.cat(acts, 0)
        t = torch.cat(targets, 0)
        gram = ((act.T @ act).double() * (w.T @ w).double()).numpy()
        rhs = (act * (t @ w)).sum(0).double().numpy()
        scales_n = _ridge_scales(gram, rhs, damp)
        n_t = torch.as_tensor(scales_n).float()
        ffn_before = _rel_err(act @ w.T, t)
        ffn_after = _rel_err((act * n_t) @ w.T, t)
        errors.append({
            "layer": li, "attention_error_before": err_before, "attention_error_after": err_after,
            "ffn_error_before": ffn_before, "ffn_error_after": ffn_after,
        })
        tuned.head_scales.append(scales_h)
        tuned.neuron_scales.append(scales_n)
        # advance the student through the tuned FFN
        full = torch.zeros(layer.ffn)
        full[kept_n] = n_t.float()
        student = [layer.ln2(layer.fo(layer.act(layer.fi(hs)) * full) + hs) for hs in h1_s]
        teacher = new_teacher
    return tuned, errors


def _slice_layer(layer: SlimLayer, heads: list[int], neurons: list[int],
                 head_scales: np.ndarray | None, neuron_scales: np.ndarray | None) -> SlimLayer:
    """A new layer holding only ``heads`` and ``neurons``, scales folded into O and FFN-out."""
    dh = layer.head_dim
    eps = layer.ln1.eps
    new = SlimLayer(layer.hidden, len(heads), dh, len(neurons), eps, layer.act_name)
    cols = torch.tensor([h * dh + j for h in heads for j in range(dh)], dtype=torch.long)
    nidx = torch.tensor(neurons, dtype=torch.long)
    with torch.no_grad():
        for dst, src in ((new.q, layer.q), (new.k, layer.k), (new.v, layer.v)):
            dst.weight.copy_(src.weight[cols])
            dst.bias.copy_(src.bias[cols])
        hs = torch.ones(len(heads)) if head_scales is None else torch.as_tensor(head_scales)
        new.o.weight.copy_(layer.o.weight[:, cols] * hs.float().repeat_interleave(dh))
        new.o.bias.copy_(layer.o.bias)
        new.fi.weight.copy_(layer.fi.weight[nidx])
        new.fi.bias.copy_(layer.fi.bias[nidx])
        ns = torch.ones(len(neurons)) if neuron_scales is None else torch.as_tensor(neuron_scales)
        new.fo.weight.copy_(layer.fo.weight[:, nidx] * ns.float())
        new.fo.bias.copy_(layer.fo.bias)
        new.ln1.load_state_dict(layer.ln1.state_dict())
        new.ln2.load_state_dict(layer.ln2.state_dict())
    return new


def apply_masks(encoder: SlimEncoder, masks: Masks) -> SlimEncoder:
    """A physically smaller copy of ``encoder`` with only the kept heads and neurons."""
    layers = []
    for i, layer in enumerate(encoder.layers):
        hs = masks.head_scales[i] if masks.head_scales else None
        ns = masks.neuron_scales[i] if masks.neuron_scales else None
        layers.append(_slice_layer(layer, masks.heads[i], masks.neurons[i], hs, ns))
    return SlimEncoder(encoder.spec, copy.deepcopy(encoder.embeddings), layers).eval()


@torch.no_grad()
def calibration_cosine(reference: SlimEncoder, model: SlimEncoder,
                       calibration: Sequence[Batch], max_batches: int = 16) -> float:
    """Mean cosine of mean-pooled embeddings of ``model`` vs ``reference``."""
    cos = []
    for batch in list(calibration)[:max_batches]:
        ids, mask = _torch_batch(batch)
        a = mean_pool(reference(ids, mask), mask)
        b = mean_pool(model(ids, mask), mask)
        cos.append(F.cosine_similarity(a, b))
    return float(torch.cat(cos).mean())


@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning settings."""

    flops_keep: float = 0.6
    seq_len: int = 128
    rearrange: bool = True
    tune: bool = True
    damp: float = 1e-3
    seed: int = 0
    max_batches: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.flops_keep <= 1.0:
            raise ValueError(f"flops_keep must be in (0, 1], got {self.flops_keep}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")


def structured_prune(
    encoder: SlimEncoder, calibration: Sequence[Batch], config: PruneConfig = PruneConfig(),
    progress: Progress | None = None, check: Callable[[], None] | None = None,
    stats: FisherStats | None = None,
) -> tuple[SlimEncoder, dict[str, Any]]:
    """Prune ``encoder`` to ``config.flops_keep`` of its FLOPs; returns (pruned copy, report).

    ``stats`` reuses mask gradients from ``fisher_gradients`` (e.g. for several budgets).
    """
    if not calibration:
        raise ValueError("structured pruning needs calibration batches")
    calibration = list(calibration)[: config.max_batches]
    spec = encoder.spec
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cpu_start = time.process_time()

    def say(msg: str, frac: float) -> None:
        if progress is not None:
            progress(msg, frac)

    say("fisher information of head/neuron masks", 0.0)
    if stats is None:
        stats = fisher_gradients(encoder, calibration, config.seed, check)
        timings["fisher_s"] = time.perf_counter() - start
    per_head = head_flops(spec.hidden, spec.head_dim, config.seq_len)
    per_neuron = neuron_flops(spec.hidden, config.seq_len)
    flops_before = encoder_flops(encoder, config.seq_len)
    t0 = time.perf_counter()
    masks = search_masks(stats.head_importance, stats.neuron_importance,
                         config.flops_keep * flops_before, per_head, per_neuron)
    timings["search_s"] = time.perf_counter() - t0
    rearr: dict[str, float] = {}
    if config.rearrange:
        say("mask rearrangement", 0.5)
        t0 = time.perf_counter()
        masks, rearr = rearrange_masks(masks, stats)
        timings["rearrange_s"] = time.perf_counter() - t0
    errors: list[dict[str, float]] = []
    pruned = apply_masks(encoder, masks)
    fidelity = {"calibration_cosine_untuned": calibration_cosine(encoder, pruned, calibration)}
    if config.tune:
        say("mask tuning (least squares per layer)", 0.6)
        t0 = time.perf_counter()
        tuned, errors = tune_masks(encoder, masks, calibration, config.damp, check=check)
        candidate = apply_masks(encoder, tuned)
        fidelity["calibration_cosine_tuned"] = calibration_cosine(encoder, candidate, calibration)
        fidelity["tuning_kept"] = (
            fidelity["calibration_cosine_tuned"] >= fidelity["calibration_cosine_untuned"]
        )
        if fidelity["tuning_kept"]:
            pruned = candidate
        timings["tune_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    timings["cpu_s"] = time.process_time() - cpu_start
    say("pruned", 1.0)
    report = {
        "technique": "structured pruning (Kwon et al. 2022), Fisher search + rearrangement "
                     "+ least-squares mask tuning, heads/neurons physically removed",
        "flops_keep_target": config.flops_keep,
        "seq_len": config.seq_len,
        "flops_before": flops_before,
        "flops_after": encoder_flops(pruned, config.seq_len),
        "params_before": count_parameters(encoder),
        "params_after": count_parameters(pruned),
        "heads_per_layer": pruned.heads_per_layer,
        "ffn_per_layer": pruned.ffn_per_layer,
        "calibration_batches": len(calibration),
        **rearr,
        **fidelity,
        "tuning_errors": errors,
        **timings,
    }
    report["flops_ratio"] = report["flops_after"] / report["flops_before"]
    return pruned, report
