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
5. Beyond the paper, **output-projection refit** (``projection_refit``): the attention and
   FFN output matrices are refitted in closed form to the unpruned layer's output, checked
   on held-out calibration tokens.

The default (``PruneConfig.selection="obs"``) keeps step 1's per-layer counts and replaces
steps 2, 3 and 5 by **structured OBS** (``obs_selection``): per layer, the kept heads and
neurons are chosen by what the layer can still reconstruct without the others, and the
output projections compensated in the same closed form. It needs a few hundred calibration
sentences and falls back to steps 2-5 with less.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from optimizers.transformer.data import right_pad
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


def _examples(calibration: Sequence[Batch]) -> list[np.ndarray] | None:
    """The real token ids of every example, or ``None`` unless all batches are right-padded
    (only then can examples be re-batched without changing their position ids)."""
    out = []
    for batch in calibration:
        mask = np.asarray(batch["attention_mask"]).astype(bool)
        lengths = mask.sum(1)
        if not (mask == (np.arange(mask.shape[1])[None, :] < lengths[:, None])).all():
            return None
        out.extend(row[:n] for row, n in zip(np.asarray(batch["input_ids"]), lengths, strict=True))
    return out


def _pack(examples: Sequence[np.ndarray], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-padded batches of ``examples`` (token id rows), sorted by length."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]), i))
    return [
        right_pad([examples[i] for i in order[start : start + batch_size]], pad_id)
        for start in range(0, len(order), batch_size)
    ]


def repack(calibration: Sequence[Batch], batch_size: int = 16, pad_id: int = 0) -> list[Batch]:
    """The examples of ``calibration`` re-batched by token length (least padding).

    Left-padded input is returned unchanged (moving its tokens would move their positions).
    """
    examples = _examples(calibration)
    if examples is None:
        return list(calibration)
    return _pack(examples, batch_size, pad_id)


def fisher_gradients(
    encoder: SlimEncoder,
    calibration: Sequence[Batch],
    seed: int = 0,
    check: Callable[[], None] | None = None,
    batch_size: int = 32,
    draws: int = 1,
) -> FisherStats:
    """Per-example gradients of ``r . normalize(pooled embedding)`` w.r.t. the masks.

    Every example gets its own copy of the head/neuron masks (all ones), so one backward
    pass per batch yields one gradient per example; with ``r ~ N(0, I)`` drawn per example,
    ``E[g g^T] = J^T J``, the Gaussian Fisher of the embedding (the labels-free analogue of
    sampling labels from the model). Examples are first re-batched by length (``repack``)
    so little time goes to padding. ``draws`` > 1 draws several ``r`` per example (one
    forward, one backward each): more samples of ``J^T J``. Rows of the result are
    (example, draw) pairs.
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
            for batch in repack(calibration, batch_size, spec.pad_token_id):
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
                for draw in range(draws):
                    r = torch.randn(emb.shape, generator=gen)
                    g_h, g_n = torch.autograd.grad(
                        (emb * r).sum(), [head_mask, neuron_mask], retain_graph=draw < draws - 1
                    )
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
    the block-diagonal Fisher loss never increases. Works on the Gram matrix ``G = g g^T``
    with running ``G[:, P] 1`` and ``||sum_P g||^2``: O(units) per visited unit.
    """
    n_units = grads.shape[1]
    if n_prune in (0, n_units):
        return np.arange(n_units)[:n_prune]
    gram = grads.T @ grads  # [units, units]
    sq = np.diag(gram).copy()
    order = np.argsort(sq, kind="stable")
    members = np.empty(n_prune + 1, dtype=int)
    members[:n_prune] = order[:n_prune]
    dots = gram[:, members[:n_prune]].sum(1)  # g_j . sum_P g for every unit j
    total = float(dots[members[:n_prune]].sum())  # ||sum_P g||^2
    for idx in order[n_prune:]:
        members[n_prune] = idx
        total += 2.0 * dots[idx] + sq[idx]
        dots += gram[idx]  # rows: gram is symmetric
        lengths = total - 2.0 * dots[members] + sq[members]  # ||sum_P g - g_j||^2
        slot = int(np.argmin(lengths))
        drop = members[slot]
        total = float(lengths[slot])
        dots -= gram[drop]
        members[slot] = members[n_prune]
    return np.sort(members[:n_prune])


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


def _damped_step(gram: torch.Tensor, rhs: torch.Tensor, damp: float) -> torch.Tensor | None:
    """``argmin ||A d - e||^2 + lam ||d||^2`` from FP64 ``A^T A``, ``A^T e`` (``None`` if the
    damped system is not positive definite or the step is not finite)."""
    k = gram.shape[0]
    lam = damp * float(gram.diagonal().sum()) / max(k, 1) + 1e-12
    chol, info = torch.linalg.cholesky_ex(gram + lam * torch.eye(k, dtype=gram.dtype))
    if int(info) != 0:
        return None
    delta = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
    return delta if bool(torch.isfinite(delta).all()) else None


def _fit_scales(
    n: int,
    pre_ln: Callable[[torch.Tensor], torch.Tensor],
    system: Callable[[torch.Tensor, _LayerNormLinearization], tuple[torch.Tensor, torch.Tensor]],
    ln: torch.nn.LayerNorm,
    target: torch.Tensor,
    damp: float,
    iters: int,
) -> tuple[np.ndarray, float, float, torch.Tensor]:
    """Damped Gauss-Newton on ``||LN(pre_ln(s)) - target||^2`` from ``s = 1``.

    Each step linearises the LayerNorm at the current pre-LN sum and solves the damped
    least squares problem for the scale update; a step is taken only if it lowers the
    actual error, and scales outside [-10, 10] are rejected (as in the reference code).
    Returns (scales, error at s = 1, error at the returned scales, pre-LN sum there),
    errors relative.
    """
    scales = torch.ones(n, dtype=torch.float64)
    x = pre_ln(scales.float())
    before = best = _rel_err(ln(x), target)
    for _ in range(iters if n else 0):
        lin = _LayerNormLinearization.at(x, ln)
        delta = _damped_step(*system(target - ln(x), lin), damp)
        if delta is None:
            break
        cand = scales + delta
        if float(cand.abs().max()) > 10.0:
            break
        x_cand = pre_ln(cand.float())
        err = _rel_err(ln(x_cand), target)
        if err >= best:
            break
        scales, best, x = cand, err, x_cand
    return scales.numpy(), before, best, x


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
    """Normal equations ``(LA)^T LA``, ``(LA)^T tau`` (FP64) for head scales
    (``contribs [k, N, d]``, ``tau [N, d]`` in the LayerNorm's output space)."""
    a = lin(contribs).reshape(contribs.shape[0], -1).double()
    return a @ a.T, a @ tau.reshape(-1).double()


def _neuron_system(
    act: torch.Tensor, w: torch.Tensor, tau: torch.Tensor, lin: _LayerNormLinearization
):
    """Normal equations for neuron scales without forming ``A`` (``[N*d, k]``).

    Token ``n``'s design is ``W diag(act_n)``; after the LN map it is
    ``(B diag(act_n) - q_n u_n^T / d) / sigma_n`` with ``B = g * C W``, ``q_n = g * xhat_n``
    and ``u_n = act_n * (W^T xhat_n)``, so the Gram matrix is a Hadamard product plus two
    low-rank corrections: three ``[k, N] x [N, k]`` FP32 products, summed in FP64.
    """
    d = w.shape[0]
    a = act
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
    return gram, rhs.double()


def _rel_err(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).norm() / target.norm().clamp(min=1e-12))


def _spread(calibration: Sequence[Batch], n: int) -> list[Batch]:
    """Up to ``n`` batches evenly spread over ``calibration`` (which may be length-sorted)."""
    cal = list(calibration)
    if len(cal) <= n:
        return cal
    return [cal[i] for i in np.linspace(0, len(cal) - 1, n).round().astype(int)]


def tuning_batches(
    calibration: Sequence[Batch], max_tokens: int, pad_id: int = 0, batch_size: int = 16
) -> list[Batch]:
    """About ``max_tokens`` real tokens of examples evenly spread over ``calibration``,
    re-batched by length (whole batches, spread, if the input is left-padded)."""
    examples = _examples(calibration)
    if examples is None:
        cal = list(calibration)
        per_batch = max(1.0, float(np.mean([b["attention_mask"].sum() for b in cal])))
        return _spread(cal, max(1, int(np.ceil(max_tokens / per_batch))))
    lengths = np.array([len(e) for e in examples])
    if lengths.sum() > max_tokens:
        n = max(1, int(np.ceil(max_tokens / lengths.mean())))
        idx = np.unique(np.linspace(0, len(examples) - 1, n).round().astype(int))
        examples = [examples[i] for i in idx]
    return _pack(examples, batch_size, pad_id)


def _context(
    layer: SlimLayer, hidden: list[torch.Tensor], biases: list[torch.Tensor], real: list
) -> torch.Tensor:
    """Attention context ``[N, heads*dh]`` of the real tokens of every padded batch."""
    out = []
    for h, bias, r in zip(hidden, biases, real, strict=True):
        ctx, _ = layer.attend(*layer.project_qkv(h), bias)
        out.append(ctx[r])
    return torch.cat(out)


def _unflatten(flat: torch.Tensor, real: list[torch.Tensor]) -> list[torch.Tensor]:
    """Real-token rows ``[N, d]`` back into zero-padded ``[B, S, d]`` batches."""
    out, offset = [], 0
    for r in real:
        h = flat.new_zeros(*r.shape, flat.shape[-1])
        n = int(r.sum())
        h[r] = flat[offset : offset + n]
        out.append(h)
        offset += n
    return out


def real_token_batches(
    encoder: SlimEncoder, calibration: Sequence[Batch], max_tokens: int
) -> tuple[list[Batch], list[tuple[torch.Tensor, torch.Tensor]], list, list]:
    """``tuning_batches`` as (ids, mask) tensors, with each batch's real-token mask and
    attention key bias."""
    batches = tuning_batches(calibration, max_tokens, encoder.spec.pad_token_id)
    tensors = [_torch_batch(b) for b in batches]
    real = [mask.bool() for _, mask in tensors]
    biases = [key_bias(mask) for _, mask in tensors]
    return batches, tensors, real, biases


def layer_targets(
    layer: SlimLayer, hidden: list[torch.Tensor], biases: list, real: list
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An unpruned layer on the real tokens of ``hidden``: pre- and post-LayerNorm outputs
    of its attention and FFN sublayers, ``[N, d]`` each."""
    x = torch.cat([h[r] for h, r in zip(hidden, real, strict=True)])
    pre1 = layer.o(_context(layer, hidden, biases, real)) + x
    out1 = layer.ln1(pre1)
    pre2 = layer.fo(layer.act(layer.fi(out1))) + out1
    return pre1, out1, pre2, layer.ln2(pre2)


@dataclass
class TuningRun:
    """Tuned masks, per-layer errors, and the pooled, normalised embeddings of the unpruned
    (``teacher``) and the pruned-and-tuned model (``student``) on the tuning ``batches``."""

    masks: Masks
    errors: list[dict[str, float]]
    batches: list[Batch]
    teacher: list[torch.Tensor]
    student: list[torch.Tensor]


@torch.no_grad()
def run_tuning(
    encoder: SlimEncoder,
    masks: Masks,
    calibration: Sequence[Batch],
    damp: float = 1e-3,
    max_tokens: int = 8192,
    check: Callable[[], None] | None = None,
    iters: int = 1,
) -> TuningRun:
    """Layer-wise least-squares scales for the kept heads and neurons (Kwon et al. step 3).

    Layers are tuned in order. For each sublayer the input is the pruned-and-tuned
    model's own hidden state (student) and the target the unpruned model's output for the
    same tokens (teacher); the scales of the kept heads (then neurons) solve damped least
    squares problems on the residual sum, measured through the LayerNorm that follows it
    (linearised, ``iters`` Gauss-Newton steps; ``_fit_scales``). A step is kept only if it
    lowers the actual post-LayerNorm error of that sublayer on the calibration tokens.
    Only attention sees padded batches; everything else runs on the real tokens, and the
    student computes only its kept heads and neurons. Errors reported are relative
    post-LayerNorm errors against the teacher.
    """
    batches, tensors, real, biases = real_token_batches(encoder, calibration, max_tokens)
    teacher = [encoder.embed(ids, mask) for ids, mask in tensors]
    student = [h.clone() for h in teacher]
    tuned = Masks(heads=masks.heads, neurons=masks.neurons)
    errors: list[dict[str, float]] = []
    for li, layer in enumerate(encoder.layers):
        if check is not None:
            check()
        kept_h, kept_n = masks.heads[li], masks.neurons[li]
        sub = _slice_layer(layer, kept_h, kept_n, None, None)
        # ---- teacher, real tokens only
        _, t1, _, t2 = layer_targets(layer, teacher, biases, real)
        # ---- student attention: one contribution per kept head
        xs = torch.cat([h[r] for h, r in zip(student, real, strict=True)])
        n_tok, d = xs.shape
        res = xs + layer.o.bias
        k, dh = len(kept_h), layer.head_dim
        if k:
            ctx = _context(sub, student, biases, real).view(n_tok, k, dh)
            contribs = torch.einsum("nkh,dkh->knd", ctx, sub.o.weight.view(d, k, dh))
        else:
            contribs = xs.new_zeros(0, n_tok, d)
        flat = contribs.reshape(k, -1)
        scales_h, err_before, err_after, x1 = _fit_scales(
            k,
            lambda sc, flat=flat, res=res: (sc @ flat).view(res.shape) + res,
            lambda tau, lin, a=contribs: _head_system(a, tau, lin),
            layer.ln1,
            t1,
            damp,
            iters,
        )
        del contribs, flat
        h1 = layer.ln1(x1)
        # ---- student FFN (kept neurons only)
        act = sub.act(sub.fi(h1))
        w = sub.fo.weight
        res = h1 + layer.fo.bias
        scales_n, ffn_before, ffn_after, x2 = _fit_scales(
            len(kept_n),
            lambda sc, act=act, w=w, res=res: (act * sc) @ w.T + res,
            lambda tau, lin, act=act, w=w: _neuron_system(act, w, tau, lin),
            layer.ln2,
            t2,
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
        teacher = _unflatten(t2, real)
        student = _unflatten(layer.ln2(x2), real)

    def pooled(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            F.normalize(mean_pool(h, mask), dim=-1)
            for h, (_, mask) in zip(hidden, tensors, strict=True)
        ]

    return TuningRun(tuned, errors, batches, pooled(teacher), pooled(student))


def tune_masks(
    encoder: SlimEncoder,
    masks: Masks,
    calibration: Sequence[Batch],
    damp: float = 1e-3,
    max_tokens: int = 8192,
    check: Callable[[], None] | None = None,
    iters: int = 1,
) -> tuple[Masks, list[dict[str, float]]]:
    """``run_tuning``'s tuned masks and per-layer errors."""
    run = run_tuning(encoder, masks, calibration, damp, max_tokens, check, iters)
    return run.masks, run.errors


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


SELECTIONS = ("obs", "fisher")


@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning settings.

    ``selection`` picks which heads/neurons each layer keeps (the counts come from Kwon's
    Fisher search either way): ``"obs"`` chooses and compensates them by structured OBS on
    up to ``refit_max_tokens`` tokens of all the calibration data (ridges ``obs_damp`` for
    the search and ``refit_damp`` for the final fit; see ``obs_selection``) and falls back
    to ``"fisher"`` when there is too little data; ``"fisher"`` is Kwon's rearrangement and
    mask tuning (``max_tokens`` real tokens, ``gn_steps`` Gauss-Newton steps per sublayer),
    then, with ``refit``, the output-projection refit (``projection_refit``).
    """

    flops_keep: float = 0.6
    seq_len: int = 128
    rearrange: bool = True
    tune: bool = True
    damp: float = 1e-3
    seed: int = 0
    max_batches: int = 64
    max_tokens: int = 8192
    gn_steps: int = 1
    fisher_draws: int = 1
    refit: bool = True
    refit_damp: float = 1e-3
    refit_max_tokens: int = 32768
    selection: str = "obs"
    obs_damp: float = 1e-2

    def __post_init__(self) -> None:
        if not 0.0 < self.flops_keep <= 1.0:
            raise ValueError(f"flops_keep must be in (0, 1], got {self.flops_keep}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.fisher_draws < 1:
            raise ValueError(f"fisher_draws must be >= 1, got {self.fisher_draws}")
        if self.gn_steps < 0:
            raise ValueError(f"gn_steps must be >= 0, got {self.gn_steps}")
        if self.refit_damp < 0:
            raise ValueError(f"refit_damp must be >= 0, got {self.refit_damp}")
        if self.refit_max_tokens < 1:
            raise ValueError(f"refit_max_tokens must be >= 1, got {self.refit_max_tokens}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.obs_damp < 0:
            raise ValueError(f"obs_damp must be >= 0, got {self.obs_damp}")


def _mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(torch.cat([(x * y).sum(-1) for x, y in zip(a, b, strict=True)]).mean())


def _technique(obs: dict[str, Any], refit: dict[str, Any]) -> str:
    if "held_out_cosine" in obs and "skipped" not in obs:
        return (
            "structured pruning: Kwon et al. (2022) Fisher search for the per-layer counts, "
            "structured OBS choice and compensation of the kept heads/neurons, physically "
            "removed"
        )
    return (
        "structured pruning (Kwon et al. 2022), Fisher search + rearrangement + least-squares "
        "mask tuning, heads/neurons physically removed"
        + (", output projections refitted" if refit.get("kept") else "")
    )


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
    With ``selection="obs"`` the OBS model is kept only if its held-out pooled cosine beats
    the searched masks' without compensation; otherwise (or with too little data) Kwon's
    rearrangement and tuning run, and the tuned model is kept only if its calibration
    cosine is at least the untuned one's. The report has per-stage seconds.
    """
    if not calibration:
        raise ValueError("structured pruning needs calibration batches")
    every_batch = list(calibration)
    calibration = every_batch[: config.max_batches]
    spec = encoder.spec
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cpu_start = time.process_time()

    def say(msg: str, frac: float) -> None:
        if progress is not None:
            progress(msg, frac)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    say("fisher information of head/neuron masks", 0.0)
    t0 = start
    if stats is None:
        stats = fisher_gradients(
            encoder, calibration, config.seed, check, draws=config.fisher_draws
        )
        t0 = lap("fisher_s", t0)
    per_head = head_flops(spec.hidden, spec.head_dim, config.seq_len)
    per_neuron = neuron_flops(spec.hidden, config.seq_len)
    flops_before = encoder_flops(encoder, config.seq_len)
    masks = search_masks(
        stats.head_importance,
        stats.neuron_importance,
        config.flops_keep * flops_before,
        per_head,
        per_neuron,
    )
    t0 = lap("search_s", t0)
    pruned: SlimEncoder | None = None
    obs: dict[str, Any] = {}
    if config.selection == "obs":
        from optimizers.transformer.obs_selection import obs_prune

        say("structured OBS: choose and compensate the kept heads/neurons per layer", 0.5)
        pruned, obs = obs_prune(
            encoder,
            [len(h) for h in masks.heads],
            [len(n) for n in masks.neurons],
            every_batch,
            config.obs_damp,
            config.refit_damp,
            config.refit_max_tokens,
            check,
            baseline=apply_masks(encoder, masks),
        )
        t0 = lap("obs_s", t0)
    rearr: dict[str, float] = {}
    errors: list[dict[str, float]] = []
    fidelity: dict[str, Any] = {}
    refit: dict[str, Any] = {}
    if pruned is None:
        if config.rearrange:
            say("mask rearrangement", 0.5)
            masks, rearr = rearrange_masks(masks, stats)
            t0 = lap("rearrange_s", t0)
        pruned = apply_masks(encoder, masks)
        if config.tune:
            say("mask tuning (least squares per layer)", 0.6)
            run = run_tuning(
                encoder, masks, calibration, config.damp, config.max_tokens, check, config.gn_steps
            )
            errors = run.errors
            t0 = lap("tune_s", t0)
            untuned = _mean_cosine(run.teacher, pooled_embeddings(pruned, run.batches))
            fidelity["calibration_cosine_untuned"] = untuned
            fidelity["calibration_cosine_tuned"] = _mean_cosine(run.teacher, run.student)
            fidelity["tuning_kept"] = fidelity["calibration_cosine_tuned"] >= untuned
            if fidelity["tuning_kept"]:
                pruned = apply_masks(encoder, run.masks)
        else:
            batches = tuning_batches(calibration, config.max_tokens, spec.pad_token_id)
            fidelity["calibration_cosine_untuned"] = _mean_cosine(
                pooled_embeddings(encoder, batches), pooled_embeddings(pruned, batches)
            )
        t0 = lap("check_s", t0)
        if config.refit:
            from optimizers.transformer.projection_refit import refit_projections

            say("output-projection refit (least squares per sublayer)", 0.85)
            refit = refit_projections(
                encoder, pruned, every_batch, config.refit_damp, config.refit_max_tokens, check
            )
            lap("refit_s", t0)
    timings["total_s"] = time.perf_counter() - start
    timings["cpu_s"] = time.process_time() - cpu_start
    say("pruned", 1.0)
    report = {
        "technique": _technique(obs, refit),
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
        "refit": refit,
        "obs": obs,
        **timings,
    }
    report["flops_ratio"] = report["flops_after"] / report["flops_before"]
    return pruned, report
