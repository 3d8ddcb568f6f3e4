"""The three techniques as registered pipeline passes, chained with H5's passes."""

from __future__ import annotations

import numpy as np
import pytest

from optimizers.fidelity import compare, run_batches
from optimizers.passes.base import Artifact, PassContext, PassNotApplicable
from optimizers.registry import available_passes, get_pass, registered_chains
from optimizers.transformer.encoder import PooledEncoder
from optimizers.transformer.export import export_onnx, onnx_initializer_shapes, ort_session
from optimizers.transformer.token_prune import HiddenStateOnly
from tests.optimizers.transformer.helpers import random_batches, tiny_encoder

META = {
    "input_names": ["input_ids", "attention_mask"],
    "output_names": ["last_hidden_state"],
    "model_type": "bert",
    "num_heads": 4,
    "hidden_size": 64,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("passes")
    encoder = tiny_encoder(seed=7, layers=3)
    path = export_onnx(HiddenStateOnly(PooledEncoder(encoder)), folder / "original.onnx")
    artifact = Artifact("onnx", "transformer", onnx_path=path, torch_model=encoder, meta=dict(META))
    batches = random_batches(6, 4, 32, seed=11, min_len=12)
    ctx = PassContext(workdir=folder / "work", calibration={"inputs": batches[:4]}, seq_len=32)
    reference = run_batches(ort_session(path), batches[4:])
    return artifact, ctx, batches[4:], reference


def _elements(path) -> int:
    return sum(int(np.prod(s)) for s in onnx_initializer_shapes(path).values())


def _fidelity(artifact, batches, reference):
    outputs = run_batches(ort_session(artifact.onnx_path), batches)
    assert outputs[0][0].shape == reference[0][0].shape  # same output contract as the original
    return compare(reference, outputs, batches, family="transformer")


def test_passes_and_chains_are_registered():
    passes = available_passes()
    assert {"struct_prune", "token_prune", "pack_padding"} <= set(passes)
    chains = registered_chains("transformer")
    assert any([n for n, _ in c][:2] == ["struct_prune", "token_prune"] for c in chains)
    with pytest.raises(ValueError, match="flops_keep"):
        get_pass("struct_prune", flops_keep=1.5)


def test_struct_prune_then_token_prune_then_int8(setup):
    artifact, ctx, batches, reference = setup
    pruned = get_pass("struct_prune", flops_keep=0.6).run(artifact, ctx)
    assert pruned.modified
    assert pruned.report["flops_after"] <= 0.6 * pruned.report["flops_before"]
    assert _elements(pruned.artifact.onnx_path) < _elements(artifact.onnx_path)
    assert _fidelity(pruned.artifact, batches, reference)["cosine"] > 0.5
    tokens = get_pass("token_prune", final_keep=0.5).run(pruned.artifact, ctx, ["struct_prune"])
    assert tokens.modified
    assert tokens.report["avg_tokens_per_layer"][-1] < tokens.report["avg_tokens_per_layer"][0]
    assert _fidelity(tokens.artifact, batches, reference)["cosine"] > 0.5
    quant = get_pass("quantize_dynamic").run(tokens.artifact, ctx, ["struct_prune", "token_prune"])
    assert _fidelity(quant.artifact, batches, reference)["cosine"] > 0.5


def test_pack_padding_pass_matches_the_original(setup):
    artifact, ctx, batches, reference = setup
    packed = get_pass("pack_padding").run(artifact, ctx)
    metrics = _fidelity(packed.artifact, batches, reference)
    assert metrics["cosine"] > 0.99999
    outputs = run_batches(ort_session(packed.artifact.onnx_path), batches)
    for batch, got, want in zip(batches, outputs, reference, strict=True):
        real = batch["attention_mask"].astype(bool)  # padding rows: zeros instead of garbage
        np.testing.assert_allclose(got[0][real], want[0][real], atol=1e-4)


def test_not_applicable_without_a_checkpoint(setup):
    artifact, ctx, _, _ = setup
    bare = Artifact("onnx", "transformer", onnx_path=artifact.onnx_path, meta=dict(META))
    with pytest.raises(PassNotApplicable, match="checkpoint"):
        get_pass("struct_prune").run(bare, ctx)
    cnn = Artifact("onnx", "cnn", onnx_path=artifact.onnx_path, meta={})
    with pytest.raises(PassNotApplicable):
        get_pass("pack_padding").run(cnn, ctx)
