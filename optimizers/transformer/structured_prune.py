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
    encoder: SlimEncoder,
    calibration: Sequence[Batch],
    seed: int = 0,
    check: Callable[[], None] | None = None,
) -> FisherStats:
    """Per-example gradients of ``r . normalize(pooled embedding)`` w.r.t. the masks.

    Every example gets its own copy of the head/neuron masks (all ones), so one backward
    pass per batch yields one gradient per example; with ``r ~ N(0, I)`` drawn per example,
    ``E[g g^T] = J^T J``, the Gaussian Fisher of the embedding (the labels-free analogue of
    sampling labels from the model). Rows of the result are examples.
    """
    spec = encoder.spec
    n_layers = len(encoder.layers)
    widths = {layer.heads for layer in encoder.layers} | {layer.ffn for layer in encoder.layers}
    if len(widths) > 2:
        raise ValueError("fisher_gradients needs an unpruned encoder (equal layer widths)")
    gen = torch.Generator().manual_seed(seed)
    flags = [p.requires_grad for p in encoder.parameters()]
    for p in encoder.parameters():
        p.requires_grad_(False)
    hg, ng = [], []
    try:
        with torch.enable_grad():
            for batch in calibration:
                if check is not None:
                    check()
                ids, mask = _torch_batch(batch)
                b = ids.shape[0]
                head_mask = torch.ones(b, n_layers, spec.heads, requires_grad=True)
                neuron_mask = torch.ones(b, n_layers, 1, spec.ffn, requires_grad=True)
                h = encoder(
                    ids,
                    mask,
                    head_masks=head_mask.transpose(0, 1),
                    neuron_masks=list(neuron_mask.transpose(0, 1)),
                )
                emb = F.normalize(mean_pool(h, mask), dim=-1)
                r = torch.randn(emb.shape, generator=gen)
                g_h, g_n = torch.autograd.grad((emb * r).sum(), [head_mask, neuron_mask])
                hg.append(g_h.numpy().copy())
                ng.append(g_n[:, :, 0].numpy().copy())
    finally:
        for p, flag in zip(encoder.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return FisherStats(np.concatenate(hg), np.concatenate(ng))


def search_masks(
    head_importance: np.ndarray,
    neuron_importance: np.ndarray,
    budget: float,
    per_head: float,
    per_neuron: float,
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
    """Kwon et al.'s greedy rearrangement of one layer's pruned set (``grads [N, units]``).

    Start from the ``n_prune`` units with the smallest diagonal Fisher; visit the others in
    increasing diagonal order, add each to the pruned set and drop again the member whose
    removal leaves the smallest ``||sum_{i in P} g_i||^2`` (possibly the one just added), so
    the block-diagonal Fisher loss never increases.
    """
    n_units = grads.shape[1]
    if n_prune in (0, n_units):
        return np.arange(n_units)[:n_prune]
    g = grads.T  # [units, N]
    sq = (g**2).sum(1)
    order = np.argsort(sq, kind="stable")
    pruned = list(order[:n_prune])
    total = g[pruned].sum(0)
    for idx in order[n_prune:]:
        pruned.append(int(idx))
        total = total + g[idx]
        cand = g[pruned]
        # ||total - g_j||^2 for every member j
        lengths = (total**2).sum() - 2 * cand @ total + sq[pruned]
        drop = int(np.argmin(lengths))
        total = total - g[pruned[drop]]
        del pruned[drop]
    return np.array(pruned, dtype=int)


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


def _damped_step(gram: np.ndarray, rhs: np.ndarray, damp: float) -> np.ndarray | None:
    """``argmin ||A d - e||^2 + lam ||d||^2`` from ``A^T A``, ``A^T e`` (``None`` if singular)."""
    k = gram.shape[0]
    lam = damp * float(np.trace(gram)) / max(k, 1) + 1e-12
    try:
        delta = scipy.linalg.solve(gram + lam * np.eye(k), rhs, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError):
        return None
    return delta if np.isfinite(delta).all() else None


def _fit_scales(
    n: int,
    pre_ln: Callable[[torch.Tensor], torch.Tensor],
    system: Callable[[torch.Tensor, _LayerNormLinearization], tuple[np.ndarray, np.ndarray]],
    ln: torch.nn.LayerNorm,
    target: torch.Tensor,
    damp: float,
    iters: int,
) -> tuple[np.ndarray, float, float]:
    """Damped Gauss-Newton on ``||LN(pre_ln(s)) - target||^2`` from ``s = 1``.

    Each step linearises the LayerNorm at the current pre-LN sum and solves the damped
    least squares problem for the scale update; a step is taken only if it lowers the
    actual error, and scales outside [-10, 10] are rejected (as in the reference code).
    Returns (scales, error at s = 1, error at the returned scales), relative errors.
    """
    scales = np.ones(n)
    before = best = _rel_err(ln(pre_ln(torch.ones(n))), target)
    for _ in range(iters if n else 0):
        x = pre_ln(torch.as_tensor(scales).float())
        lin = _LayerNormLinearization.at(x, ln)
        delta = _damped_step(*system(target - ln(x), lin), damp)
        if delta is None:
            break
        cand = scales + delta
        if np.abs(cand).max() > 10.0:
            break
        err = _rel_err(ln(pre_ln(torch.as_tensor(cand).float())), target)
        if err >= best:
            break
        scales, best = cand, err
    return scales, before, best


@dataclass
class _LayerNormLinearization:
    """First-order map of a LayerNorm at the teacher's pre-LN input ``x`` (real tokens).

    ``LN(x + r) - LN(x) ~= g * (C r - xhat (xhat . r) / d) / sigma``: centering ``C``,
    removal of the component along the normalised input, per-token ``1/sigma``, LN
    weight ``g``. Least squares in this metric matches what the layer actually outputs,
    rather than the raw pre-LN sum, which a few outlier dimensions (RMS 20-40 against a
    median of 0.6 in MiniLM, some with LN weight 0) dominate.
    """

    xhat: torch.Tensor  # [N, d]
    inv_sigma: torch.Tensor  # [N]
    gain: torch.Tensor  # [d]

    @classmethod
    def at(cls, x: torch.Tensor, ln: torch.nn.LayerNorm) -> _LayerNormLinearization:
        xc = x - x.mean(-1, keepdim=True)
        sigma = (xc.pow(2).mean(-1) + ln.eps).sqrt()
        return cls(xc / sigma[:, None], 1.0 / sigma, ln.weight.detach())

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """Apply the map to ``r [..., N, d]``."""
        rc = r - r.mean(-1, keepdim=True)
        along = (rc * self.xhat).sum(-1, keepdim=True) / r.shape[-1]
        return self.gain * (rc - self.xhat * along) * self.inv_sigma[:, None]


def _head_system(contribs: torch.Tensor, tau: torch.Tensor, lin: _LayerNormLinearization):
    """Normal equations ``(LA)^T LA``, ``(LA)^T tau`` for head scales (``contribs [k, N, d]``,
    ``tau [N, d]`` in the LayerNorm's output space)."""
    a = lin(contribs)
    t = tau
    gram = torch.einsum("inh,jnh->ij", a.double(), a.double()).numpy()
    rhs = torch.einsum("inh,nh->i", a.double(), t.double()).numpy()
    return gram, rhs


def _neuron_system(
    act: torch.Tensor, w: torch.Tensor, tau: torch.Tensor, lin: _LayerNormLinearization
):
    """Normal equations for neuron scales without forming ``A`` (``[N*d, k]``).

    Token ``n``'s design is ``W diag(act_n)``; after the LN map it is
    ``(B diag(act_n) - q_n u_n^T / d) / sigma_n`` with ``B = g * C W``, ``q_n = g * xhat_n``
    and ``u_n = act_n * (W^T xhat_n)``, so the Gram matrix is a Hadamard product plus two
    low-rank corrections.
    """
    d = w.shape[0]
    a = act  # float32 products (FP64 would double the time), FP64 solve
    xhat, inv_s, g = lin.xhat, lin.inv_sigma, lin.gain
    b_mat = g[:, None] * (w - w.mean(0, keepdim=True))  # [d, k]
    q = g * xhat  # [N, d]
    u = a * (xhat @ w)  # [N, k]
    p = a * (q @ b_mat)  # [N, k]
    w2 = inv_s**2
    gram = (b_mat.T @ b_mat).double() * (a.T @ (a * w2[:, None])).double()
    cross = (p.T @ (u * w2[:, None])).double()
    gram = gram - (cross + cross.T) / d
    gram = gram + (u.T @ (u * (w2 * (q**2).sum(1) / d**2)[:, None])).double()
    rhs = (a * (tau @ b_mat)).T @ inv_s - u.T @ (inv_s * (q * tau).sum(1) / d)
    return gram.numpy(), rhs.double().numpy()


def _rel_err(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).norm() / target.norm().clamp(min=1e-12))


def _spread(calibration: Sequence[Batch], n: int) -> list[Batch]:
    """Up to ``n`` batches evenly spread over ``calibration`` (which may be length-sorted)."""
    cal = list(calibration)
    if len(cal) <= n:
        return cal
    return [cal[i] for i in np.linspace(0, len(cal) - 1, n).round().astype(int)]


def _gather_tokens(encoder: SlimEncoder, calibration: Sequence[Batch], max_tokens: int):
    """Embedding outputs of about ``max_tokens`` real tokens from batches spread over
    ``calibration``, grouped per batch (with the key bias and real-token mask)."""
    cal = list(calibration)
    per_batch = max(1.0, float(np.mean([b["attention_mask"].sum() for b in cal])))
    items = []
    total = 0
    for batch in _spread(cal, max(1, int(np.ceil(max_tokens / per_batch)))):
        ids, mask = _torch_batch(batch)
        items.append((encoder.embed(ids, mask), key_bias(mask), mask.bool()))
        total += int(mask.sum())
        if total >= max_tokens:
            break
    return items


def _head_contributions(
    layer: SlimLayer, x: torch.Tensor, bias: torch.Tensor, heads: list[int]
) -> torch.Tensor:
    """Each listed head's output-projected context ``[k, B, S, hidden]`` (no bias)."""
    dh = layer.head_dim
    q, k, v = layer.project_qkv(x)
    ctx, _ = layer.attend(q, k, v, bias)
    if not heads:
        return torch.zeros(0, *x.shape)
    return torch.stack(
        [
            ctx[..., h * dh : (h + 1) * dh] @ layer.o.weight[:, h * dh : (h + 1) * dh].T
            for h in heads
        ]
    )


@torch.no_grad()
def tune_masks(
    encoder: SlimEncoder,
    masks: Masks,
    calibration: Sequence[Batch],
    damp: float = 1e-3,
    max_tokens: int = 4096,
    check: Callable[[], None] | None = None,
    iters: int = 3,
) -> tuple[Masks, list[dict[str, float]]]:
    """Layer-wise least-squares scales for the kept heads and neurons (Kwon et al. step 3).

    Layers are tuned in order. For each sublayer the input is the pruned-and-tuned
    model's own hidden state (student) and the target the unpruned model's output for the
    same tokens (teacher); the scales of the kept heads (then neurons) solve damped least
    squares problems on the residual sum, measured through the LayerNorm that follows it
    (linearised, a few Gauss-Newton steps; ``_fit_scales``). A step is kept only if it
    lowers the actual post-LayerNorm error of that sublayer on the calibration tokens.
    Errors reported are relative post-LayerNorm errors against the teacher.
    """
    items = _gather_tokens(encoder, calibration, max_tokens)
    teacher = [h for h, _, _ in items]
    student = [h.clone() for h, _, _ in items]
    tuned = Masks(heads=masks.heads, neurons=masks.neurons)
    errors: list[dict[str, float]] = []
    for li, layer in enumerate(encoder.layers):
        if check is not None:
            check()
        kept_h, kept_n = masks.heads[li], masks.neurons[li]
        # ---- attention sublayer
        sums_t, contribs, base = [], [], []
        for (_, bias, real), xt, xs in zip(items, teacher, student, strict=True):
            q, k, v = layer.project_qkv(xt)
            ctx_t, _ = layer.attend(q, k, v, bias)
            sums_t.append(layer.o(ctx_t) + xt)
            contribs.append(_head_contributions(layer, xs, bias, kept_h)[:, real])
            base.append(xs[real] + layer.o.bias)
        real_all = [real for _, _, real in items]
        a = torch.cat(contribs, 1)  # [k, N, d]
        sum_t = torch.cat([st[r] for st, r in zip(sums_t, real_all, strict=True)])
        res = torch.cat(base)  # student residual + bias, [N, d]
        out_t = layer.ln1(sum_t)
        scales_h, err_before, err_after = _fit_scales(
            len(kept_h),
            lambda sc, a=a, res=res: torch.einsum("i,inh->nh", sc, a) + res,
            lambda tau, lin, a=a: _head_system(a, tau, lin),
            layer.ln1,
            out_t,
            damp,
            iters,
        )
        del a, contribs
        scale_vec = torch.zeros(layer.heads)
        scale_vec[kept_h] = torch.as_tensor(scales_h).float()
        h1_s, h1_t = [], []
        for (_, bias, _real), xs, st in zip(items, student, sums_t, strict=True):
            q, k, v = layer.project_qkv(xs)
            ctx_s, _ = layer.attend(q, k, v, bias, scale_vec)
            h1_s.append(layer.ln1(layer.o(ctx_s) + xs))
            h1_t.append(layer.ln1(st))
        # ---- FFN sublayer
        sums2_t, acts, base = [], [], []
        for real, hs, ht in zip(real_all, h1_s, h1_t, strict=True):
            sums2_t.append(layer.fo(layer.act(layer.fi(ht))) + ht)
            acts.append(layer.act(layer.fi(hs[real]))[:, kept_n])
            base.append(hs[real] + layer.fo.bias)
        act = torch.cat(acts)
        w = layer.fo.weight[:, kept_n]
        sum2_t = torch.cat([st[r] for st, r in zip(sums2_t, real_all, strict=True)])
        res = torch.cat(base)
        out_t = layer.ln2(sum2_t)
        scales_n, ffn_before, ffn_after = _fit_scales(
            len(kept_n),
            lambda sc, act=act, w=w, res=res: (act * sc) @ w.T + res,
            lambda tau, lin, act=act, w=w: _neuron_system(act, w, tau, lin),
            layer.ln2,
            out_t,
            damp,
            iters,
        )
        errors.append(
            {
                "layer": li,
                "attention_error_before": err_before,
                "attention_error_after": err_after,
                "ffn_error_before": ffn_before,
                "ffn_error_after": ffn_after,
            }
        )
        tuned.head_scales.append(scales_h)
        tuned.neuron_scales.append(scales_n)
        full = torch.zeros(layer.ffn)
        full[kept_n] = torch.as_tensor(scales_n).float()
        student = [layer.feed_forward(hs, full) for hs in h1_s]
        teacher = [layer.ln2(st) for st in sums2_t]
    return tuned, errors


def _slice_layer(
    layer: SlimLayer,
    heads: list[int],
    neurons: list[int],
    head_scales: np.ndarray | None,
    neuron_scales: np.ndarray | None,
) -> SlimLayer:
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
def pooled_embeddings(model: SlimEncoder, calibration: Sequence[Batch]) -> list[torch.Tensor]:
    """Mean-pooled, L2-normalised embeddings of each batch (the sentence-embedding output)."""
    out = []
    for batch in calibration:
        ids, mask = _torch_batch(batch)
        out.append(F.normalize(mean_pool(model(ids, mask), mask), dim=-1))
    return out


def calibration_cosine(
    reference: SlimEncoder | list[torch.Tensor],
    model: SlimEncoder,
    calibration: Sequence[Batch],
    max_batches: int = 16,
) -> float:
    """Mean cosine of mean-pooled embeddings of ``model`` vs ``reference``.

    ``reference`` is an encoder or its ``pooled_embeddings`` on the same batches.
    """
    batches = _spread(calibration, max_batches)
    ref = (
        reference[: len(batches)]
        if isinstance(reference, list)
        else pooled_embeddings(reference, batches)
    )
    got = pooled_embeddings(model, batches)
    return float(torch.cat([(a * b).sum(-1) for a, b in zip(ref, got, strict=True)]).mean())


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
    encoder: SlimEncoder,
    calibration: Sequence[Batch],
    config: PruneConfig = PruneConfig(),
    progress: Progress | None = None,
    check: Callable[[], None] | None = None,
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
    masks = search_masks(
        stats.head_importance,
        stats.neuron_importance,
        config.flops_keep * flops_before,
        per_head,
        per_neuron,
    )
    timings["search_s"] = time.perf_counter() - t0
    rearr: dict[str, float] = {}
    if config.rearrange:
        say("mask rearrangement", 0.5)
        t0 = time.perf_counter()
        masks, rearr = rearrange_masks(masks, stats)
        timings["rearrange_s"] = time.perf_counter() - t0
    errors: list[dict[str, float]] = []
    pruned = apply_masks(encoder, masks)
    ref = pooled_embeddings(encoder, _spread(calibration, 16))
    fidelity = {"calibration_cosine_untuned": calibration_cosine(ref, pruned, calibration)}
    if config.tune:
        say("mask tuning (least squares per layer)", 0.6)
        t0 = time.perf_counter()
        tuned, errors = tune_masks(encoder, masks, calibration, config.damp, check=check)
        candidate = apply_masks(encoder, tuned)
        fidelity["calibration_cosine_tuned"] = calibration_cosine(ref, candidate, calibration)
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
