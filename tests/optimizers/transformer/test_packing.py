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


def test_packed_export_with_equal_biases_across_layers(tmp_path):
    """A fresh checkpoint's biases are all zero: the exporter deduplicates them into an
    Identity of one initializer, which the attention expansion must follow."""
    encoder = tiny_encoder(seed=5)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("bias") and ".ln" not in name:
                parameter.zero_()
    session = ort_session(export_onnx(PackedEncoder(encoder), tmp_path / "packed.onnx"))
    batch = random_batches(1, 3, 12, seed=1, min_len=2)[0]
    hidden = run_session(session, batch)["last_hidden_state"]
    for i, length in enumerate(batch["attention_mask"].sum(1)):
        want = _alone(encoder, batch["input_ids"][i], int(length))
        np.testing.assert_allclose(hidden[i, :length], want, atol=5e-5)


def test_packed_graph_runs_dense_layers_on_real_tokens_only(encoder, tmp_path):
    import onnx

    path = export_onnx(PackedEncoder(encoder), tmp_path / "packed.onnx")
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"NonZero", "Gather"} <= ops  # tokens gathered by a data-dependent index
    # attention: one Loop per layer over the sequences, fused attention without a key mask
    loops = [n for n in graph.node if n.op_type == "Loop"]
    assert len(loops) == len(encoder.layers)
    body = next(a.g for a in loops[0].attribute if a.name == "body")
    (mha,) = [n for n in body.node if n.op_type == "MultiHeadAttention"]
    assert len(mha.input) == 4  # q, k, v, bias: no key padding mask
    assert all(n.domain != "slimserve" for n in graph.node)
    # the dense layers run on [T, hidden]: one fused Q/K/V MatMul per layer, no padded MatMul
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(matmuls) == 4 * len(encoder.layers)
    # the packed model equals the padded one on real tokens for a new batch shape
    session = ort_session(path)
    padded = ort_session(export_onnx(encoder, tmp_path / "padded.onnx"))
    batch = random_batches(1, 3, 70, seed=9)[0]
    a, b = run_session(session, batch), run_session(padded, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        a["last_hidden_state"][real], b["last_hidden_state"][real], atol=5e-5
    )


@pytest.fixture(scope="module")
def packed_session(encoder, tmp_path_factory):
    return ort_session(export_onnx(PackedEncoder(encoder), tmp_path_factory.mktemp("p") / "p.onnx"))


def _batch(lengths: list[int], seed: int, left: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(1, 200, size=(len(lengths), width)).astype(np.int64)
    mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    if left:
        mask = mask[:, ::-1].copy()
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    "lengths",
    [[37], [1], [9, 9, 9, 9], [1, 30, 1, 7], [64, 1], list(range(1, 21)), [5] * 33],
    ids=["one", "one-token", "all-equal", "length-1s", "long+1", "1..20", "33x5"],
)
def test_packed_equals_padded_on_real_tokens(encoder, packed_session, lengths):
    batch = _batch(lengths, seed=len(lengths))
    out = run_session(packed_session, batch)
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    with torch.no_grad():
        padded = encoder(ids, mask).numpy()
        eager = PackedEncoder(encoder)(ids, mask)[0].numpy()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(out["last_hidden_state"][real], padded[real], atol=5e-5)
    np.testing.assert_allclose(eager[real], padded[real], atol=5e-5)
    assert not out["last_hidden_state"][~real].any()
    for i, n in enumerate(lengths):
        want = _alone(encoder, batch["input_ids"][i], n)
        np.testing.assert_allclose(out["embedding"][i], want.mean(0), atol=5e-5)


def test_packed_handles_left_padding(encoder, packed_session):
    batch = _batch([3, 11, 6], seed=3, left=True)
    out = run_session(packed_session, batch)["last_hidden_state"]
    with torch.no_grad():
        want = encoder(
            torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
        ).numpy()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(out[real], want[real], atol=5e-5)


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
    chunks = [order[i : i + max_batch] for i in range(0, len(order), max_batch)]
    assert padded_tokens(lengths, buckets) <= padded_tokens(lengths, chunks)


def test_bucket_by_length_groups_similar_lengths():
    lengths = [100, 10, 101, 11, 99, 12]
    buckets = bucket_by_length(lengths, 3)
    assert sorted(map(sorted, buckets)) == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(ValueError, match="max_batch"):
        bucket_by_length(lengths, 0)
