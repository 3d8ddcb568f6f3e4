"""Padding removal: packed ONNX outputs equal each sequence run alone; length bucketing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizers.transformer.export import export_onnx, ort_session, run_session
from optimizers.transformer.packing import PackedEncoder, bucket_by_length, padded_tokens
from tests.optimizers.transformer.helpers import random_batches, tiny_encoder


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder(seed=2)


def _alone(encoder, ids, length):
    with torch.no_grad():
        one = torch.as_tensor(ids[None, :length])
        return encoder(one, torch.ones_like(one))[0].numpy()


def test_packed_onnx_equals_each_sequence_alone(encoder, tmp_path):
    session = ort_session(export_onnx(PackedEncoder(encoder), tmp_path / "packed.onnx"))
    batch = random_batches(1, 6, 40, seed=4, min_len=2)[0]
    out = run_session(session, batch)
    hidden = out["last_hidden_state"]
    lengths = batch["attention_mask"].sum(1)
    assert hidden.shape == (*batch["input_ids"].shape, 64)
    for i, length in enumerate(lengths):
        want = _alone(encoder, batch["input_ids"][i], int(length))
        np.testing.assert_allclose(hidden[i, :length], want, atol=5e-5)
        assert not hidden[i, length:].any()  # padding rows are zero, never computed
        np.testing.assert_allclose(out["embedding"][i], want.mean(0), atol=5e-5)


def test_packed_graph_runs_dense_layers_on_real_tokens_only(encoder, tmp_path):
    import onnx

    path = export_onnx(PackedEncoder(encoder), tmp_path / "packed.onnx")
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"NonZero", "Gather"} <= ops  # tokens gathered by a data-dependent index
    # the packed model equals the padded one on real tokens for a new batch shape
    session = ort_session(path)
    padded = ort_session(export_onnx(encoder, tmp_path / "padded.onnx"))
    batch = random_batches(1, 3, 70, seed=9)[0]
    a, b = run_session(session, batch), run_session(padded, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(a["last_hidden_state"][real], b["last_hidden_state"][real],
                               atol=5e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=0, max_size=70), st.integers(1, 16))
def test_bucket_by_length_properties(lengths, max_batch):
    buckets = bucket_by_length(lengths, max_batch)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # each request exactly once
    assert all(1 <= len(b) <= max_batch for b in buckets)
    assert len(buckets) == -(-len(lengths) // max_batch)  # as few batches as possible
    # never more padding than cutting the sorted order into consecutive full chunks
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks = [order[i:i + max_batch] for i in range(0, len(order), max_batch)]
    assert padded_tokens(lengths, buckets) <= padded_tokens(lengths, chunks)


def test_bucket_by_length_groups_similar_lengths():
    lengths = [100, 10, 101, 11, 99, 12]
    buckets = bucket_by_length(lengths, 3)
    assert sorted(map(sorted, buckets)) == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(ValueError, match="max_batch"):
        bucket_by_length(lengths, 0)
