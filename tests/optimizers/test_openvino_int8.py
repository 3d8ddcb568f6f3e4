"""``openvino_int8``: NNCF INT8 of a real (tiny) BERT export, run on ONNX Runtime's OpenVINO
plugin EP, within the fidelity bound; the search measures it there and the pipeline runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizers.api import OptimizationRequest, run_optimization
from optimizers.calibration import pydoc_sentences
from optimizers.chains import build_chains
from optimizers.fidelity import compare, run_batches
from optimizers.loaders import load_hf_checkpoint
from optimizers.onnxutil import make_session, op_counts
from optimizers.passes.base import PassContext, PassNotApplicable
from optimizers.passes.openvino_int8 import _unusable
from optimizers.registry import get_pass
from serving.backends import openvino

REASON = _unusable()
needs_openvino = pytest.mark.skipif(REASON is not None, reason=f"not usable here: {REASON}")


def _batches(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((4, 16), np.int64)
        mask[1, 11:] = 0
        ids = rng.integers(5, 60, (4, 16))
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})
    return out


def _ctx(folder: Path, calibration: list | None = None) -> PassContext:
    return PassContext(
        workdir=folder, calibration={"inputs": calibration or []}, batch_size=4, seq_len=16
    )


@pytest.fixture(scope="module")
def exported(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("ov_int8")
    return get_pass("export").run(load_hf_checkpoint(tiny_bert_dir).artifact, _ctx(folder)).artifact


@needs_openvino
def test_int8_on_openvino_within_bound(exported, tmp_path: Path) -> None:
    result = get_pass("openvino_int8").run(exported, _ctx(tmp_path, _batches(8, 0)))
    artifact = result.artifact
    assert result.modified
    assert artifact.meta["cpu_accelerator"] == "openvino"
    assert artifact.meta["quantized"] == "nncf-int8"
    assert result.report["float_attention_matmuls"] == 4  # Q·Kᵀ and P·V of 2 layers
    ops = op_counts(artifact.onnx_path)
    assert ops.get("QuantizeLinear", 0) >= 4  # activations of the layers' MatMuls
    assert ops.get("DequantizeLinear", 0) > ops["QuantizeLinear"]  # + weights
    held = _batches(4, 1)
    reference = run_batches(make_session(exported.onnx_path), held)
    session = make_session(artifact.onnx_path, accelerator="openvino")
    assert session.get_providers()[0] == openvino.EP_NAME
    fidelity = compare(reference, run_batches(session, held), held, family="transformer")
    assert fidelity["cosine"] > 0.98, fidelity


def test_not_applicable_without_calibration_or_on_fused(exported, tmp_path: Path) -> None:
    with pytest.raises(PassNotApplicable):
        get_pass("openvino_int8").requires(exported, _ctx(tmp_path))
    fused = exported.with_onnx(exported.onnx_path, fused=True)
    with pytest.raises(PassNotApplicable, match="fused"):
        get_pass("openvino_int8").requires(fused, _ctx(tmp_path, _batches(1, 0)))
    with pytest.raises(ValueError, match="preset"):
        get_pass("openvino_int8", preset="fast")


def test_registered_for_cpu_transformers() -> None:
    chains, _ = build_chains("transformer", "cpu")
    assert [("openvino_int8", {})] in chains
    assert [("openvino_int8", {"smooth_quant": False})] in chains
    cuda, _ = build_chains("transformer", "cuda")
    assert not any(name == "openvino_int8" for chain in cuda for name, _ in chain)


@needs_openvino
@pytest.mark.slow
def test_pipeline_measures_it_on_openvino(tiny_bert_dir: Path, tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(pydoc_sentences()[:32]) + "\n")
    request = OptimizationRequest(
        name="tiny-bert", batch_size=2, seq_len=16, min_cosine=0.9, allow=("openvino_int8",)
    )
    result = run_optimization(tiny_bert_dir, request, tmp_path / "job", calibration=calibration)
    candidates = {tuple(c["passes"]): c for c in result.report["candidates"]}
    measured = candidates[("openvino_int8",)]
    assert measured["latency_ms"] > 0, measured["reason"]
    assert measured["fidelity"]["cosine"] > 0.9
    assert openvino.EP_NAME in measured["latency"]["providers"]
