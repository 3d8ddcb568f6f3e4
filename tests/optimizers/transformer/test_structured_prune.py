"""Structured pruning on a tiny random-init BERT: real mechanics, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimizers.transformer.encoder import count_parameters, mean_pool
from optimizers.transformer.export import (
    export_onnx,
    onnx_initializer_shapes,
    ort_session,
    run_session,
)
from optimizers.transformer.flops import encoder_flops, head_flops, neuron_flops
from optimizers.transformer.structured_prune import (
    Masks,
    PruneConfig,
    _greedy_pruned_set,
    _quadratic_loss,
    apply_masks,
    fisher_gradients,
    repack,
    run_tuning,
    search_masks,
    structured_prune,
    tune_masks,
    tuning_batches,
)
from tests.optimizers.transformer.helpers import (
    pooled_relative_error,
    random_batches,
    tiny_encoder,
)


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder()


@pytest.fixture(scope="module")
def calibration():
    return random_batches(8, 4, 24, seed=1)


@pytest.fixture(scope="module")
def pruned(encoder, calibration):
    return structured_prune(
        encoder, calibration, PruneConfig(flops_keep=0.5, seq_len=24, selection="fisher")
    )


def _onnx_elements(path) -> int:
    return sum(int(np.prod(s)) for s in onnx_initializer_shapes(path).values())


def test_pruned_units_are_physically_gone(encoder, pruned, tmp_path):
    model, report = pruned
    assert report["params_after"] == count_parameters(model) < count_parameters(encoder)
    assert sum(model.heads_per_layer) < 2 * 4
    assert sum(model.ffn_per_layer) < 2 * 128
    for layer in model.layers:
        width = layer.heads * layer.head_dim
        assert tuple(layer.q.weight.shape) == (width, 64)
        assert tuple(layer.o.weight.shape) == (64, width)
        assert tuple(layer.fi.weight.shape) == (layer.ffn, 64)
        assert tuple(layer.fo.weight.shape) == (64, layer.ffn)
    # FLOPs budget respected (search works at unit granularity)
    assert report["flops_after"] <= 0.5 * report["flops_before"] + 1e-6
    assert report["flops_after"] == encoder_flops(model, 24)

    full = export_onnx(encoder, tmp_path / "full.onnx")
    small = export_onnx(model, tmp_path / "pruned.onnx")
    # the ONNX weights shrink by exactly the removed parameters: no masks, no zero padding
    removed = count_parameters(encoder) - count_parameters(model)
    assert _onnx_elements(full) - _onnx_elements(small) == removed
    shapes = set(onnx_initializer_shapes(small).values())
    for layer in model.layers:
        if layer.ffn:
            assert (64, layer.ffn) in shapes or (layer.ffn, 64) in shapes


def test_pruned_onnx_matches_torch(pruned, calibration, tmp_path):
    model, _ = pruned
    session = ort_session(export_onnx(model, tmp_path / "p.onnx"))
    for batch in calibration[:3]:
        got = run_session(session, batch)
        with torch.no_grad():
            ids = torch.as_tensor(batch["input_ids"])
            mask = torch.as_tensor(batch["attention_mask"])
            want = mean_pool(model(ids, mask), mask).numpy()
        np.testing.assert_allclose(got["embedding"], want, atol=2e-5)


def test_slicing_equals_masking_with_scales(encoder, calibration):
    rng = np.random.default_rng(3)
    masks = Masks(
        heads=[[0, 2], []],
        neurons=[list(range(0, 128, 3)), list(range(50))],
        head_scales=[rng.uniform(0.5, 1.5, 2), np.zeros(0)],
        neuron_scales=[rng.uniform(0.5, 1.5, 43), rng.uniform(0.5, 1.5, 50)],
    )
    sliced = apply_masks(encoder, masks)
    assert sliced.heads_per_layer == [2, 0]  # second layer skips attention entirely
    head_masks = torch.zeros(2, 4)
    head_masks[0, [0, 2]] = torch.as_tensor(masks.head_scales[0]).float()
    neuron_masks = [torch.zeros(128), torch.zeros(128)]
    for i in range(2):
        neuron_masks[i][masks.neurons[i]] = torch.as_tensor(masks.neuron_scales[i]).float()
    batch = calibration[0]
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    with torch.no_grad():
        want = encoder(ids, mask, head_masks=head_masks, neuron_masks=neuron_masks)
        got = sliced(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_mask_tuning_reduces_layer_reconstruction_error(pruned):
    _, report = pruned
    errors = report["tuning_errors"]
    assert len(errors) == 2
    for e in errors:
        assert e["ffn_error_after"] < e["ffn_error_before"]
        assert e["attention_error_after"] <= e["attention_error_before"] + 1e-9
    assert any(e["attention_error_after"] < e["attention_error_before"] for e in errors)


def test_rearrangement_never_increases_fisher_loss(pruned):
    _, report = pruned
    assert report["fisher_loss_rearranged"] <= report["fisher_loss_search"] + 1e-12


def test_fisher_gradients_are_deterministic_and_per_example(encoder, calibration):
    a = fisher_gradients(encoder, calibration[:3], seed=5)
    b = fisher_gradients(encoder, calibration[:3], seed=5)
    np.testing.assert_array_equal(a.head_grads, b.head_grads)
    assert a.head_grads.shape == (12, 2, 4)  # one row per example (3 batches of 4)
    assert a.neuron_grads.shape == (12, 2, 128)
    two = fisher_gradients(encoder, calibration[:3], seed=5, draws=2)
    assert two.head_grads.shape == (24, 2, 4)  # one row per (example, draw)
    assert not np.allclose(two.head_grads[0::2], two.head_grads[1::2])
    assert (a.head_importance > 0).all()
    # the model's own parameters are left as they were
    assert all(p.requires_grad for p in encoder.parameters())


def test_fisher_is_not_degenerate_and_ranks_a_useless_head_last(calibration):
    enc = tiny_encoder()
    with torch.no_grad():  # head 1 of layer 0 barely reaches the output projection
        enc.layers[0].o.weight[:, 16:32] *= 1e-3
    stats = fisher_gradients(enc, calibration[:4], seed=0)
    imp = stats.head_importance
    assert np.isfinite(imp).all()
    assert (imp > 0).all()
    assert imp[0, 1] < 1e-3 * imp[0, [0, 2, 3]].min()
    assert (stats.neuron_importance > 0).mean() > 0.9


@pytest.mark.parametrize("outliers", [False, True])
@torch.no_grad()
def test_mask_tuning_lowers_end_to_end_error(calibration, outliers):
    enc = tiny_encoder()
    if outliers:
        # like MiniLM: one residual dimension per sublayer is huge before the LayerNorm and
        # has LN weight 0, so matching raw pre-LN sums would chase a dimension that never
        # reaches the output (and made tuning hurt end-to-end before the fix)
        for layer in enc.layers:
            layer.fo.weight[5] *= 60
            layer.ln2.weight[5] = 0.0
            layer.o.weight[7] *= 60
            layer.ln1.weight[7] = 0.0
    stats = fisher_gradients(enc, calibration, seed=0)
    per_h, per_n = head_flops(64, 16, 24), neuron_flops(64, 24)
    masks = search_masks(
        stats.head_importance,
        stats.neuron_importance,
        0.5 * encoder_flops(enc, 24),
        per_h,
        per_n,
    )
    tuned, errors = tune_masks(enc, masks, calibration)
    assert any((np.abs(s - 1) > 1e-3).any() for s in tuned.neuron_scales + tuned.head_scales)
    for e in errors:  # accepted only where the sublayer's post-LN error drops
        assert e["attention_error_after"] <= e["attention_error_before"]
        assert e["ffn_error_after"] <= e["ffn_error_before"]

    untuned_err = pooled_relative_error(enc, apply_masks(enc, masks), calibration)
    tuned_err = pooled_relative_error(enc, apply_masks(enc, tuned), calibration)
    assert tuned_err < 0.9 * untuned_err


def test_search_respects_budget_and_keeps_the_most_important():
    rng = np.random.default_rng(0)
    heads, neurons = rng.random((2, 4)), rng.random((2, 16))
    ph, pn = float(head_flops(64, 16, 8)), float(neuron_flops(64, 8))
    total = 8 * ph + 32 * pn
    masks = search_masks(heads, neurons, 0.5 * total, ph, pn)
    kept_h = sum(len(h) for h in masks.heads)
    kept_n = sum(len(n) for n in masks.neurons)
    assert kept_h * ph + kept_n * pn <= 0.5 * total
    # within each kind, kept units are the most important ones
    kept_scores = [heads[i, j] for i, row in enumerate(masks.heads) for j in row]
    dropped = [heads[i, j] for i in range(2) for j in range(4) if j not in masks.heads[i]]
    if kept_scores and dropped:
        assert min(kept_scores) >= max(dropped)
    everything = search_masks(heads, neurons, total, ph, pn)
    assert [len(h) for h in everything.heads] == [4, 4]


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="flops_keep"):
        PruneConfig(flops_keep=0.0)
    with pytest.raises(ValueError, match="fisher_draws"):
        PruneConfig(fisher_draws=0)
    with pytest.raises(ValueError, match="calibration"):
        structured_prune(tiny_encoder(), [], PruneConfig())


def _reference_greedy(grads: np.ndarray, n_prune: int) -> np.ndarray:
    """The rearrangement written out directly (re-summing the pruned set's gradients)."""
    order = np.argsort((grads**2).sum(0), kind="stable")
    pruned = list(order[:n_prune])
    for idx in order[n_prune:]:
        pruned.append(int(idx))
        losses = [
            _quadratic_loss(grads, np.array(pruned[:j] + pruned[j + 1 :]))
            for j in range(len(pruned))
        ]
        del pruned[int(np.argmin(losses))]
    return np.sort(pruned)


@pytest.mark.parametrize("n_prune", [1, 7, 15])
def test_incremental_rearrangement_matches_direct_greedy(n_prune):
    grads = np.random.default_rng(n_prune).normal(size=(12, 24))
    got = _greedy_pruned_set(grads, n_prune)
    np.testing.assert_array_equal(got, _reference_greedy(grads, n_prune))
    diag = np.argsort((grads**2).sum(0), kind="stable")[:n_prune]
    assert _quadratic_loss(grads, got) <= _quadratic_loss(grads, diag) + 1e-12


def test_repack_keeps_every_example_with_less_padding(calibration):
    packed = repack(calibration, batch_size=4)

    def rows(batches):
        return sorted(
            tuple(ids[m.astype(bool)])
            for b in batches
            for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        )

    assert rows(packed) == rows(calibration)
    assert sum(b["attention_mask"].size for b in packed) <= sum(
        b["attention_mask"].size for b in calibration
    )
    lengths = [int(m.sum()) for b in packed for m in b["attention_mask"]]
    assert lengths == sorted(lengths)
    left = [{k: v[:, ::-1].copy() for k, v in b.items()} for b in calibration[:2]]
    assert repack(left) == left  # left padding: positions would move, so left alone


def test_fisher_gradients_do_not_depend_on_batching(encoder, calibration):
    """Per-example gradients: the same with one example per batch as with padded batches."""
    alone = fisher_gradients(encoder, calibration[:3], seed=2, batch_size=1)
    batched = fisher_gradients(encoder, calibration[:3], seed=2, batch_size=6)
    np.testing.assert_allclose(batched.head_grads, alone.head_grads, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(batched.neuron_grads, alone.neuron_grads, rtol=1e-3, atol=1e-6)


def test_tuning_token_budget_and_steps(encoder, calibration):
    few = tuning_batches(calibration, max_tokens=40)
    total = sum(int(b["attention_mask"].sum()) for b in calibration)
    assert 40 <= sum(int(b["attention_mask"].sum()) for b in few) < total
    masks = Masks(heads=[[0, 1, 3], [1, 2]], neurons=[list(range(0, 128, 2)), list(range(70))])
    none = run_tuning(encoder, masks, calibration, iters=0)
    for s in none.masks.head_scales + none.masks.neuron_scales:
        np.testing.assert_array_equal(s, np.ones_like(s))
    one = run_tuning(encoder, masks, calibration, iters=1)
    assert any((np.abs(s - 1) > 1e-3).any() for s in one.masks.neuron_scales)
    for e0, e1 in zip(none.errors, one.errors, strict=True):
        assert e1["ffn_error_after"] < e0["ffn_error_after"]
    # the student embeddings reported are the tuned model's own
    tuned = apply_masks(encoder, one.masks)
    for batch, got in zip(one.batches, one.student, strict=True):
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch["attention_mask"])
        with torch.no_grad():
            want = torch.nn.functional.normalize(mean_pool(tuned(ids, mask), mask), dim=-1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
