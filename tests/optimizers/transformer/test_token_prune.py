"""Token pruning: the exported ONNX graph shrinks the sequence layer by layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from optimizers.transformer.encoder import mean_pool
from optimizers.transformer.export import export_onnx, ort_session, run_session
from optimizers.transformer.token_prune import (
    TokenPruneConfig,
    TokenPrunedEncoder,
    calibrate_thresholds,
    keep_schedule,
    token_importance,
    token_prune,
)
from tests.optimizers.transformer.helpers import random_batches, tiny_encoder


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder(seed=3, layers=3)


@pytest.fixture(scope="module")
def calibration():
    return random_batches(6, 4, 48, seed=5, min_len=24)


def test_importance_is_normalised_attention_received():
    probs = torch.full((1, 2, 4, 4), 0.25)
    mask = torch.ones(1, 4)
    torch.testing.assert_close(token_importance(probs, mask), torch.ones(1, 4))
    probs = torch.zeros(1, 1, 3, 3)
    probs[..., 1] = 1.0  # everyone attends to token 1
    imp = token_importance(probs, torch.ones(1, 3))
    torch.testing.assert_close(imp, torch.tensor([[0.0, 3.0, 0.0]]))


def test_onnx_sequence_shrinks_per_layer(encoder, calibration, tmp_path):
    thresholds = calibrate_thresholds(encoder, calibration, final_keep=0.4)
    assert thresholds[-1] is None
    assert thresholds[0] is not None
    model = TokenPrunedEncoder(encoder, thresholds)
    session = ort_session(export_onnx(model, tmp_path / "tp.onnx"))
    for batch in calibration[:3]:
        out = run_session(session, batch)
        lens = out["seq_lens"]
        assert lens[0] == batch["input_ids"].shape[1]
        assert all(b <= a for a, b in itertools.pairwise(lens))
        assert lens[-1] < lens[0]  # the sequence really got shorter inside the graph
        with torch.no_grad():
            want_hidden, want, want_lens = model(torch.as_tensor(batch["input_ids"]),
                                    torch.as_tensor(batch["attention_mask"]))
        np.testing.assert_allclose(out["embedding"], want.numpy(), atol=5e-5)
        np.testing.assert_array_equal(lens, want_lens.numpy())
        # per-token output keeps the original positions; padding rows stay zero
        hidden = out["last_hidden_state"]
        assert hidden.shape == (*batch["input_ids"].shape, 64)
        np.testing.assert_allclose(hidden, want_hidden.numpy(), atol=5e-5)
        real = batch["attention_mask"].astype(bool)
        assert not hidden[~real].any()
        assert (np.abs(hidden[real]).sum(-1) > 0).all()
        pooled = (hidden * real[..., None]).sum(1) / real.sum(1, keepdims=True)
        np.testing.assert_allclose(pooled, out["embedding"], atol=5e-5)


def test_no_pruning_equals_the_original(encoder, calibration):
    model = TokenPrunedEncoder(encoder, [None, None, None])
    batch = calibration[0]
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    with torch.no_grad():
        hidden, got, lens = model(ids, mask)
        full = encoder(ids, mask)
        want = mean_pool(full, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], full[real], atol=1e-5, rtol=1e-4)
    assert lens.tolist() == [ids.shape[1]] * 3


def test_first_token_always_kept(encoder, calibration):
    model = TokenPrunedEncoder(encoder, [1e9, None, None])  # drop everything it may
    batch = calibration[0]
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    with torch.no_grad():
        _, emb, lens = model(ids, mask)
    assert lens.tolist()[1:] == [1, 1]
    assert torch.isfinite(emb).all()


def test_keep_schedule_and_bisection(encoder, calibration):
    sched = keep_schedule(4, 0.4)
    assert sched[0] > sched[1] > sched[2] == pytest.approx(0.4) == sched[3]
    model, report = token_prune(encoder, calibration, TokenPruneConfig(min_cosine=0.97, steps=3))
    tokens = report["avg_tokens_per_layer"]
    assert tokens[0] >= tokens[-1]
    accepted = [t for t in report["tried"] if t["calibration_cosine"] >= 0.97]
    if report["final_keep"] < 1.0:
        assert accepted
    with pytest.raises(ValueError, match="final_keep"):
        TokenPruneConfig(final_keep=1.5)
    assert isinstance(model, TokenPrunedEncoder)
