"""Output-projection refit after structured pruning, on a tiny random-init BERT."""

from __future__ import annotations

import copy

import pytest
import torch

from optimizers.transformer.projection_refit import refit_projections
from optimizers.transformer.structured_prune import PruneConfig, structured_prune
from tests.optimizers.transformer.helpers import (
    pooled_relative_error,
    random_batches,
    tiny_encoder,
)


@pytest.fixture(scope="module")
def setup():
    encoder = tiny_encoder(seed=3)
    calibration = random_batches(40, 8, 24, seed=4)
    config = PruneConfig(flops_keep=0.5, seq_len=24, refit=False, selection="fisher")
    pruned, _ = structured_prune(encoder, calibration, config)
    return encoder, calibration, pruned


def test_refit_brings_unseen_text_closer_and_changes_only_output_projections(setup):
    encoder, calibration, pruned = setup
    model = copy.deepcopy(pruned)
    report = refit_projections(encoder, model, calibration)
    assert report["kept"]
    assert report["held_out_cosine_after"] > report["held_out_cosine_before"]
    assert report["fit_tokens"] > 3 * report["held_out_tokens"] > 0
    refitted = 0
    for row, old, new in zip(report["layers"], pruned.layers, model.layers, strict=True):
        for name, linear in (("attention", "o"), ("ffn", "fo")):
            sub = row[name]
            changed = not torch.equal(getattr(old, linear).weight, getattr(new, linear).weight)
            assert changed == sub["refit"]
            if sub["refit"]:  # kept only where it lowered the held-out post-LN error
                assert sub["error_after"] < sub["error_before"]
                refitted += 1
        for linear in ("q", "k", "v", "fi"):  # what feeds the nonlinearities stays
            assert torch.equal(getattr(old, linear).weight, getattr(new, linear).weight)
    assert refitted >= 2
    unseen = random_batches(8, 8, 24, seed=99)
    assert pooled_relative_error(encoder, model, unseen) < 0.9 * pooled_relative_error(
        encoder, pruned, unseen
    )


def test_refit_skips_sublayers_with_too_few_tokens(setup):
    encoder, _, pruned = setup
    model = copy.deepcopy(pruned)
    # 80 examples of 2-3 tokens: 5 packed batches, too few tokens for 50+ kept neurons
    report = refit_projections(encoder, model, random_batches(40, 2, 3, seed=5, min_len=2))
    assert all(row["ffn"].get("skipped") for row in report["layers"])
    assert not any(row["ffn"]["refit"] for row in report["layers"])
    for old, new in zip(pruned.layers, model.layers, strict=True):
        assert torch.equal(old.fo.weight, new.fo.weight)
    few = refit_projections(encoder, copy.deepcopy(pruned), random_batches(3, 4, 12, seed=6))
    assert "at least 5" in few["skipped"]


def test_structured_prune_reports_the_refit(setup):
    encoder, calibration, _ = setup
    _, report = structured_prune(
        encoder, calibration, PruneConfig(flops_keep=0.5, seq_len=24, selection="fisher")
    )
    assert report["refit"]["kept"]
    assert "output projections refitted" in report["technique"]
    assert report["refit_s"] > 0
    with pytest.raises(ValueError, match="refit_damp"):
        PruneConfig(refit_damp=-1)
