"""Token pruning: the exported ONNX graph shrinks the sequence layer by layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from optimizers.transformer.encoder import mean_pool
from optimizers.transformer.export import export_onnx, ort_session, run_session
from optimizers.transformer.ltp import LTPConfig, SoftTokenPruner, learn_thresholds
from optimizers.transformer.token_prune import (
    POOL_MODES,
    TokenPruneConfig,
    TokenPrunedEncoder,
    calibrate_thresholds,
    keep_schedule,
    kept_tokens,
    token_importance,
    token_prune,
    transfer_matrix,
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
            want_hidden, want, want_lens = model(
                torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
            )
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


@pytest.mark.parametrize("pool", POOL_MODES)
def test_pool_modes_export_and_match(encoder, calibration, tmp_path, pool):
    thresholds = calibrate_thresholds(encoder, calibration, final_keep=0.4)
    model = TokenPrunedEncoder(encoder, thresholds, pool=pool)
    session = ort_session(export_onnx(model, tmp_path / f"{pool}.onnx"))
    batch = calibration[1]
    out = run_session(session, batch)
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    with torch.no_grad():
        hidden, emb, lens = model(ids, mask)
        frozen = TokenPrunedEncoder(encoder, thresholds, pool="frozen")(ids, mask)[0]
    np.testing.assert_allclose(out["last_hidden_state"], hidden.numpy(), atol=5e-5)
    np.testing.assert_allclose(out["embedding"], emb.numpy(), atol=5e-5)
    assert lens[-1] < lens[0]
    assert not out["last_hidden_state"][batch["attention_mask"] == 0].any()  # padding rows
    # the first token never leaves: its row is its exact final state in every mode
    torch.testing.assert_close(hidden[:, 0], frozen[:, 0])
    # dropped tokens' rows differ between modes (they are approximations)
    if pool != "frozen":
        assert (hidden - frozen).abs().amax() > 1e-3


def test_transfer_matrix_conserves_weight():
    probs = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    keep = torch.tensor([[1.0, 0, 1, 0, 1], [1, 1, 0, 0, 0]])
    for pool in ("carry", "survivors"):
        t = transfer_matrix(probs, keep, pool)
        torch.testing.assert_close(t.sum(-1), torch.ones(2, 5))
        assert (t[..., :] * (1 - keep).unsqueeze(1)).abs().max() == 0  # nothing to dropped


def test_soft_pruner_is_the_hard_model_at_low_temperature(encoder, calibration):
    thresholds = calibrate_thresholds(encoder, calibration, final_keep=0.5)
    soft = SoftTokenPruner(encoder, thresholds, temperature=1e-4)
    hard = TokenPrunedEncoder(encoder, soft.thresholds())
    for batch in calibration[:2]:
        ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        with torch.no_grad():
            got, entering = soft(ids, mask)
            want = hard(ids, mask)
        # equal up to near-ties (importance within ~T of a threshold stays fractional)
        assert torch.nn.functional.cosine_similarity(got, want[1]).min() > 0.999
        # soft presence entering each layer matches the hard kept counts
        kept = [float(p.sum()) for p in entering]
        hard_kept = [k * ids.shape[0] for k in kept_tokens(hard, [batch])]
        np.testing.assert_allclose(kept, hard_kept, atol=1.0)
        assert kept[-1] < kept[0]


def test_learned_thresholds_move_and_regularizer_prunes_more(encoder, calibration, tmp_path):
    init = calibrate_thresholds(encoder, calibration, final_keep=0.7)
    cfg = LTPConfig(steps=25, lr=0.1, temperature=0.3, keep_weight=0.0)
    loose, rep = learn_thresholds(encoder, calibration, init, cfg)
    tight, _ = learn_thresholds(
        encoder, calibration, init, LTPConfig(steps=25, lr=0.1, temperature=0.3, keep_weight=1.0)
    )
    assert rep["steps"] == 25
    assert rep["history"]
    assert all(p.requires_grad for p in encoder.parameters())  # restored after training
    assert loose[-1] is None
    assert tight[-1] is None
    assert any(abs(a - b) > 1e-3 for a, b in zip(loose[:-1], init[:-1], strict=True))
    # the keep-ratio penalty raises the thresholds (here the first layer's), so fewer stay;
    # without it the distillation loss alone lowers them
    assert tight[0] > loose[0]
    assert loose[0] < init[0]
    kept_loose = kept_tokens(TokenPrunedEncoder(encoder, loose), calibration)
    kept_tight = kept_tokens(TokenPrunedEncoder(encoder, tight), calibration)
    assert sum(kept_tight) < sum(kept_loose)
    # the hard-threshold model still shrinks per layer in ONNX Runtime and matches PyTorch
    model = TokenPrunedEncoder(encoder, tight)
    session = ort_session(export_onnx(model, tmp_path / "ltp.onnx"))
    batch = calibration[0]
    out = run_session(session, batch)
    with torch.no_grad():
        _, want, lens = model(
            torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        )
    np.testing.assert_array_equal(out["seq_lens"], lens.numpy())
    assert all(b <= a for a, b in itertools.pairwise(out["seq_lens"]))
    assert out["seq_lens"][-1] < out["seq_lens"][0]
    np.testing.assert_allclose(out["embedding"], want.numpy(), atol=5e-5)


def test_learned_token_prune_meets_the_bound(encoder, calibration):
    cfg = TokenPruneConfig(
        min_cosine=0.97, steps=4, method="learned", ltp=LTPConfig(steps=15, keep_weight=0.05)
    )
    model, report = token_prune(encoder, calibration, cfg)
    assert report["method"] == "learned"
    assert report["calibration_cosine"] >= 0.97
    assert report["ltp"]["steps"] == 15
    assert model.pool == "survivors"


@pytest.mark.parametrize("pool", POOL_MODES)
def test_batched_equals_alone(encoder, pool):
    """Shrinking to the batch's largest kept length and masking the rest changes nothing."""
    batches = random_batches(2, 4, 40, seed=9, min_len=4)
    model = TokenPrunedEncoder(encoder, calibrate_thresholds(encoder, batches, 0.5), pool)
    for batch in batches:
        ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        with torch.no_grad():
            _, emb, _ = model(ids, mask)
            for i in range(ids.shape[0]):
                n = int(mask[i].sum())
                _, alone, _ = model(ids[i : i + 1, :n], mask[i : i + 1, :n])
                torch.testing.assert_close(alone[0], emb[i], atol=1e-5, rtol=1e-4)
