"""Structured OBS selection of heads/neurons, on least-squares problems and a tiny BERT."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from optimizers.transformer.encoder import count_parameters
from optimizers.transformer.flops import encoder_flops, head_flops, neuron_flops
from optimizers.transformer.obs_selection import obs_prune, obs_remove
from optimizers.transformer.structured_prune import (
    PruneConfig,
    apply_masks,
    fisher_gradients,
    search_masks,
    structured_prune,
)
from tests.optimizers.transformer.helpers import (
    pooled_relative_error,
    random_batches,
    tiny_encoder,
)


def _problem(seed: int, n: int = 400, k: int = 8, d: int = 5):
    """Normal equations of a random weighted least-squares problem with correlated inputs
    (bias column last) and a function giving the exact loss of a fit on any row subset."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=gen, dtype=torch.float64)
    a[:, 1] = a[:, 0] + 0.1 * a[:, 1]  # rows 0 and 1 nearly redundant
    a1 = torch.cat([a, torch.ones(n, 1, dtype=torch.float64)], 1)
    r = a1 @ torch.randn(k + 1, d, generator=gen, dtype=torch.float64)
    r += 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    gram, rhs = a1.T @ a1, a1.T @ r

    def loss(rows: list[int]) -> tuple[float, torch.Tensor]:
        cols = [*rows, k]
        w = torch.linalg.lstsq(a1[:, cols], r).solution
        return float(((a1[:, cols] @ w - r) ** 2).sum()), w

    return gram, rhs, loss, k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_removal_compensates_exactly_and_picks_the_cheapest_row(seed):
    gram, rhs, loss, k = _problem(seed)
    kept, w = obs_remove(gram, rhs, [[j] for j in range(k)], 3, damp=0.0)
    assert len(kept) == k - 3
    removed = sorted(set(range(k)) - set(kept))
    assert torch.equal(w[removed], torch.zeros_like(w[removed]))
    # the compensated weights are the least-squares fit on the kept rows (and bias)
    _, exact = loss(kept)
    torch.testing.assert_close(w[[*kept, k]], exact, atol=1e-8, rtol=1e-6)
    # the first removal is the row whose exact refit loses least
    first, _ = obs_remove(gram, rhs, [[j] for j in range(k)], 1, damp=0.0)
    costs = {j: loss([i for i in range(k) if i != j])[0] for j in range(k)}
    assert set(range(k)) - set(first) == {min(costs, key=costs.get)}
    # greedy OBS is near the best subset of that size, far from the worst
    subsets = [loss(list(c))[0] for c in itertools.combinations(range(k), k - 3)]
    assert loss(kept)[0] <= min(subsets) + 0.05 * (max(subsets) - min(subsets))


def test_obs_removes_whole_groups():
    gram, rhs, loss, k = _problem(3)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    kept, w = obs_remove(gram, rhs, groups, 2, damp=0.0)
    rows = [r for g in kept for r in groups[g]]
    _, exact = loss(rows)
    torch.testing.assert_close(w[[*rows, k]], exact, atol=1e-8, rtol=1e-6)
    gone = [r for g in set(range(4)) - set(kept) for r in groups[g]]
    assert torch.equal(w[gone], torch.zeros_like(w[gone]))
    pairs = [
        loss([r for g in c for r in groups[g]])[0] for c in itertools.combinations(range(4), 2)
    ]
    assert loss(rows)[0] <= sorted(pairs)[1]  # best or second-best pair of groups


@pytest.fixture(scope="module")
def setup():
    encoder = tiny_encoder(seed=3)
    calibration = random_batches(40, 8, 24, seed=4)
    spec = encoder.spec
    stats = fisher_gradients(encoder, calibration)
    masks = search_masks(
        stats.head_importance,
        stats.neuron_importance,
        0.5 * encoder_flops(encoder, 24),
        head_flops(spec.hidden, spec.head_dim, 24),
        neuron_flops(spec.hidden, 24),
    )
    return encoder, calibration, masks


def test_obs_prune_keeps_the_counts_and_beats_uncompensated_units(setup):
    encoder, calibration, masks = setup
    heads = [len(h) for h in masks.heads]
    neurons = [len(n) for n in masks.neurons]
    baseline = apply_masks(encoder, masks)
    model, report = obs_prune(encoder, heads, neurons, calibration, baseline=baseline)
    assert model is not None, report
    assert model.heads_per_layer == heads
    assert model.ffn_per_layer == neurons
    assert count_parameters(model) == count_parameters(baseline)
    assert report["held_out_cosine"] > report["held_out_cosine_baseline"]
    assert report["fit_tokens"] > 3 * report["held_out_tokens"] > 0
    unseen = random_batches(8, 8, 24, seed=99)
    assert pooled_relative_error(encoder, model, unseen) < 0.8 * pooled_relative_error(
        encoder, baseline, unseen
    )


def test_obs_prune_needs_enough_calibration_data(setup):
    encoder, _, masks = setup
    heads = [len(h) for h in masks.heads]
    neurons = [len(n) for n in masks.neurons]
    model, report = obs_prune(encoder, heads, neurons, random_batches(3, 4, 12, seed=6))
    assert model is None
    assert "at least 5" in report["skipped"]
    model, report = obs_prune(encoder, heads, neurons, random_batches(40, 2, 3, seed=5, min_len=2))
    assert model is None
    assert "fitting tokens" in report["skipped"]


def test_structured_prune_uses_obs_and_falls_back_to_kwon(setup):
    encoder, calibration, _ = setup
    config = PruneConfig(flops_keep=0.5, seq_len=24)
    model, report = structured_prune(encoder, calibration, config)
    assert "structured OBS" in report["technique"]
    assert report["obs_s"] > 0
    assert report["flops_ratio"] <= 0.5
    fisher, _ = structured_prune(
        encoder, calibration, PruneConfig(flops_keep=0.5, seq_len=24, selection="fisher")
    )
    unseen = random_batches(8, 8, 24, seed=99)
    assert pooled_relative_error(encoder, model, unseen) < pooled_relative_error(
        encoder, fisher, unseen
    )
    _, small = structured_prune(encoder, calibration[:2], config)
    assert "at least 5" in small["obs"]["skipped"]
    assert "Kwon" in small["technique"]
    assert small["tuning_errors"]
    with pytest.raises(ValueError, match="selection"):
        PruneConfig(selection="magnitude")
    assert np.isfinite(report["obs"]["held_out_cosine"])


def test_obs_prune_can_empty_a_sublayer(setup):
    encoder, calibration, _ = setup
    model, report = obs_prune(encoder, [0, 2], [64, 0], calibration)
    assert model is not None, report
    assert model.heads_per_layer == [0, 2]
    assert model.ffn_per_layer == [64, 0]
    batch = random_batches(1, 4, 24, seed=98)[0]
    with torch.no_grad():
        out = model(torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"]))
    assert bool(torch.isfinite(out).all())
