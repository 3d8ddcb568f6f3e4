"""``cpu_unfuse``: ORT's slow CPU fusions replaced by standard ops, numbers unchanged, and the
dynamic-INT8 graph ORT builds from it keeps the fast kernels (no re-fusion)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optimizers.api import OptimizationRequest, run_optimization
from optimizers.calibration import pydoc_sentences
from optimizers.chains import build_chains
from optimizers.loaders import load_hf_checkpoint
from optimizers.onnxutil import make_session, op_counts
from optimizers.passes.base import PassContext, PassNotApplicable
from optimizers.registry import get_pass


def _ctx(folder: Path) -> PassContext:
    return PassContext(workdir=folder, calibration={"inputs": []}, batch_size=2, seq_len=16)


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with random biases and LayerNorm parameters: a fresh init has them all
    equal (0 / 1), so the exporter shares one initializer between layers, unlike real
    checkpoints."""
    import shutil

    import torch
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("bert_random_bias")
    shutil.copytree(tiny_bert_dir, folder, dirs_exist_ok=True)
    model = BertModel.from_pretrained(str(tiny_bert_dir)).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def fused(bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("cpu_unfuse")
    exported = get_pass("export").run(load_hf_checkpoint(bert_dir).artifact, _ctx(folder))
    return get_pass("ort_transformer_optimize").run(exported.artifact, _ctx(folder / "f")).artifact


def _feeds(padded: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((3, 24), np.int64)
    if padded:
        mask[0, 10:] = 0
        mask[2, 17:] = 0
    return {
        "input_ids": rng.integers(5, 60, (3, 24)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((3, 24), np.int64),
    }


def _assert_same_outputs(reference: Path, candidate: Path, atol: float) -> None:
    a, b = make_session(reference), make_session(candidate)
    for padded in (True, False):
        feeds = _feeds(padded)
        real = feeds["attention_mask"].astype(bool)
        want, got = a.run(None, feeds)[0], b.run(None, feeds)[0]
        np.testing.assert_allclose(got[real], want[real], atol=atol)


def _session_ops(path: Path, folder: Path) -> Counter:
    """Op types of the graph ONNX Runtime actually runs (ORT_ENABLE_ALL, saved)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "session.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(folder / "session.onnx")).graph.node)


def test_unfuse_replaces_slow_ops_with_same_numbers(fused, tmp_path: Path) -> None:
    before = op_counts(fused.onnx_path)
    assert before.get("SkipLayerNormalization")
    assert before.get("BiasGelu")
    result = get_pass("cpu_unfuse").run(fused, _ctx(tmp_path))
    assert result.modified
    assert result.report["replaced"] == {
        "SkipLayerNormalization": before["SkipLayerNormalization"],
        "BiasGelu": before["BiasGelu"],
    }
    after = op_counts(result.artifact.onnx_path)
    assert "SkipLayerNormalization" not in after
    assert "BiasGelu" not in after
    assert after["LayerNormalization"] == before["SkipLayerNormalization"]
    assert after["Sum"] == before["SkipLayerNormalization"]
    assert after["Gelu"] == before["BiasGelu"]
    assert after["Attention"] == before["Attention"]  # kept unless asked
    _assert_same_outputs(fused.onnx_path, result.artifact.onnx_path, atol=1e-5)


def test_int8_graph_keeps_fast_kernels(fused, tmp_path: Path) -> None:
    unfused = get_pass("cpu_unfuse").run(fused, _ctx(tmp_path / "u")).artifact
    quant = get_pass("quantize_dynamic").run(unfused, _ctx(tmp_path / "q")).artifact
    ops = _session_ops(quant.onnx_path, tmp_path)
    # ORT neither re-fuses SkipLayerNorm / BiasGelu nor leaves the bias Adds behind: every
    # MatMul runs as DynamicQuantizeMatMul with the bias folded in
    assert ops["SkipLayerNormalization"] == 0
    assert ops["BiasGelu"] == 0
    assert ops["LayerNormalization"] > 0
    assert ops["Gelu"] > 0
    assert ops["DynamicQuantizeMatMul"] == op_counts(fused.onnx_path)["MatMul"]
    assert ops["Add"] == 0
    assert ops["QAttention"] == op_counts(fused.onnx_path)["Attention"]
    # the same quantized graph without the rewrite runs the slow fused kernels
    plain = get_pass("quantize_dynamic").run(fused, _ctx(tmp_path / "p")).artifact
    plain_ops = _session_ops(plain.onnx_path, tmp_path)
    assert plain_ops["SkipLayerNormalization"] > 0
    assert plain_ops["BiasGelu"] > 0
    _assert_same_outputs(plain.onnx_path, quant.onnx_path, atol=1e-4)


def test_attention_dispatch_exact_on_padded_and_full_batches(fused, tmp_path: Path) -> None:
    result = get_pass("cpu_unfuse", attention=True).run(fused, _ctx(tmp_path))
    before = op_counts(fused.onnx_path)
    layers = before["Attention"]
    assert result.report["replaced"]["Attention"] == layers
    after = op_counts(result.artifact.onnx_path)
    assert "Attention" not in after
    assert after["If"] == layers  # MHA without mask when the batch has no padding
    assert after["MatMul"] == before["MatMul"] + 3 * layers  # Q, K, V from sliced weights
    assert "Split" not in after
    packed_qkv = {
        n.input[1] for n in onnx.load(str(fused.onnx_path)).graph.node if n.op_type == "Attention"
    }
    left = {i.name for i in onnx.load(str(result.artifact.onnx_path)).graph.initializer}
    assert not packed_qkv & left  # the packed weights are gone, not carried as dead weight
    _assert_same_outputs(fused.onnx_path, result.artifact.onnx_path, atol=1e-5)
    quant = get_pass("quantize_dynamic").run(result.artifact, _ctx(tmp_path / "q")).artifact
    ops = _session_ops(quant.onnx_path, tmp_path)
    # every projection runs in INT8; Q, K and V share one quantization of their input
    int8_matmuls = ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"]
    assert int8_matmuls == before["MatMul"] + 3 * layers
    assert ops["DynamicQuantizeLinear"] == layers
    assert ops["MultiHeadAttention"] == 0  # inside the If branches
    _assert_same_outputs(fused.onnx_path, quant.onnx_path, atol=0.2)


def test_not_applicable_without_fused_ops(fused, tmp_path: Path) -> None:
    once = get_pass("cpu_unfuse").run(fused, _ctx(tmp_path / "a")).artifact
    with pytest.raises(PassNotApplicable, match="no SkipLayerNormalization"):
        get_pass("cpu_unfuse").run(once, _ctx(tmp_path / "b"))


@pytest.mark.slow
def test_chain_runs_through_the_pipeline(bert_dir: Path, tmp_path: Path) -> None:
    allow = ("ort_transformer_optimize", "cpu_unfuse", "quantize_dynamic")
    chains, _ = build_chains("transformer", "cpu", allow)
    assert [(n, {}) for n in allow] in chains
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(pydoc_sentences()[:16]) + "\n")
    request = OptimizationRequest(
        name="tiny-bert", batch_size=2, seq_len=16, min_cosine=0.9, allow=allow
    )
    result = run_optimization(bert_dir, request, tmp_path / "job", calibration=calibration)
    candidates = {tuple(c["passes"]): c for c in result.report["candidates"]}
    measured = candidates[allow]
    assert measured["latency_ms"] > 0, measured["reason"]
    assert measured["fidelity"]["cosine"] > 0.9
    (unfuse,) = candidates[allow[:2]]["pass_reports"]  # each candidate reports its own step
    assert unfuse["pass"] == "cpu_unfuse"
    assert unfuse["replaced"]["SkipLayerNormalization"] > 0


def test_optional_empty_inputs_elsewhere_do_not_block_the_rewrite() -> None:
    """An omitted optional input ("") in another node is not a use of SkipLayerNorm's
    unused optional outputs (exports with Clip/Pad/MHA often have one)."""
    from onnx import TensorProto, helper, numpy_helper

    from optimizers.passes.cpu_kernels import unfuse_for_cpu

    rng = np.random.default_rng(0)
    hidden = 8
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node(
                "SkipLayerNormalization",
                ["x", "skip", "gamma", "beta"],
                ["y", "", ""],
                domain="com.microsoft",
                epsilon=1e-12,
            ),
            helper.make_node("Clip", ["y", "", "hi"], ["out"]),
        ],
        "g",
        [value(n, TensorProto.FLOAT, [2, 3, hidden]) for n in ("x", "skip")],
        [value("out", TensorProto.FLOAT, [2, 3, hidden])],
        [
            numpy_helper.from_array(rng.random(hidden).astype(np.float32), "gamma"),
            numpy_helper.from_array(rng.random(hidden).astype(np.float32), "beta"),
            numpy_helper.from_array(np.array(0.5, np.float32), "hi"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 9
    feeds = {n: rng.standard_normal((2, 3, hidden)).astype(np.float32) for n in ("x", "skip")}
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    rewritten, replaced = unfuse_for_cpu(model)
    assert replaced == {"SkipLayerNormalization": 1}
    got = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
