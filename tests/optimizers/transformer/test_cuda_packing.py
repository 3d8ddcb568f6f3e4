"""``ort_packing_mode``: ORT's packing mode (RemovePadding / PackedAttention) for CUDA targets.

The graph rewrite and the pass's guards are checked everywhere; the packed graph runs only
where the CUDA execution provider exists (its kernels have no CPU version), and there its
outputs are compared token by token with the padded graph's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizers.chains import build_chains
from optimizers.loaders import load_hf_checkpoint
from optimizers.onnxutil import make_session
from optimizers.passes.base import Artifact, PassContext, PassNotApplicable
from optimizers.registry import get_pass
from optimizers.transformer.passes.cuda_packing import (
    convert_to_packing_mode,
    cuda_unavailable_reason,
)

NO_CUDA = cuda_unavailable_reason()


@pytest.fixture(scope="module")
def fused_bert(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """The tiny 2-layer BERT exported and fused (ORT Attention) as a cuda job does it."""
    work = tmp_path_factory.mktemp("packing")
    loaded = load_hf_checkpoint(tiny_bert_dir)
    ctx = PassContext(workdir=work / "export", batch_size=2, seq_len=16)
    exported = get_pass("export").run(loaded.artifact, ctx).artifact
    ctx = PassContext(workdir=work / "fuse", target="cuda")
    return get_pass("ort_transformer_optimize").run(exported, ctx).artifact


def test_conversion_packs_every_attention_and_keeps_the_interface(fused_bert: Artifact) -> None:
    before = onnx.load(str(fused_bert.onnx_path))
    converted, ops = convert_to_packing_mode(onnx.load(str(fused_bert.onnx_path)))
    assert dict(ops) == {"RemovePadding": 1, "RestorePadding": 1, "PackedAttention": 2}
    assert not [n for n in converted.graph.node if n.op_type == "Attention"]
    assert [i.name for i in converted.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in converted.graph.output] == [o.name for o in before.graph.output]


def test_packing_is_an_opt_in_chain_for_cuda_only() -> None:
    chains, skipped = build_chains("transformer", "cuda")
    assert not any("ort_packing_mode" in [n for n, _ in c] for c in chains)
    assert any("ort_packing_mode" in s["passes"] and "opt-in" in s["reason"] for s in skipped), (
        skipped
    )
    allow = ("ort_transformer_optimize", "fp16", "ort_packing_mode")
    chains, _ = build_chains("transformer", "cuda", allow)
    assert [("ort_transformer_optimize", {}), ("fp16", {}), ("ort_packing_mode", {})] in chains
    chains, _ = build_chains("transformer", "cpu", allow)
    assert not any("ort_packing_mode" in [n for n, _ in c] for c in chains)


def test_not_applicable_on_the_cpu_target(fused_bert: Artifact, tmp_path: Path) -> None:
    with pytest.raises(PassNotApplicable, match="cuda target"):
        get_pass("ort_packing_mode").run(fused_bert, PassContext(workdir=tmp_path, target="cpu"))


def test_not_applicable_before_fusion(fused_bert: Artifact, tmp_path: Path) -> None:
    if NO_CUDA:  # the CUDA check comes first
        pytest.skip(NO_CUDA)
    unfused = Artifact("onnx", "transformer", onnx_path=fused_bert.onnx_path, meta={})
    with pytest.raises(PassNotApplicable, match="ort_transformer_optimize first"):
        get_pass("ort_packing_mode").run(unfused, PassContext(workdir=tmp_path, target="cuda"))


@pytest.mark.skipif(NO_CUDA is None, reason="this onnxruntime has CUDA; checks the refusal")
def test_not_applicable_without_cuda(fused_bert: Artifact, tmp_path: Path) -> None:
    with pytest.raises(PassNotApplicable, match="CUDA execution provider"):
        get_pass("ort_packing_mode").run(fused_bert, PassContext(workdir=tmp_path, target="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")
def test_packed_equals_padded_on_real_tokens_on_cuda(fused_bert: Artifact, tmp_path: Path) -> None:
    result = get_pass("ort_packing_mode").run(
        fused_bert, PassContext(workdir=tmp_path, target="cuda")
    )
    assert result.report["packing_operators"]["PackedAttention"] == 2
    rng = np.random.default_rng(0)
    lengths = [16, 9, 3, 1]
    ids = np.zeros((len(lengths), 16), np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):  # right-padded, as tokenizers pad
        ids[row, :length] = rng.integers(5, 60, length)
        mask[row, :length] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    padded = make_session(fused_bert.onnx_path, "cuda")
    packed = make_session(result.artifact.onnx_path, "cuda")
    assert packed.get_providers()[0] == "CUDAExecutionProvider"
    (want,) = padded.run(None, feeds)
    (got,) = packed.run(None, feeds)
    assert got.shape == want.shape
    real = mask.astype(bool)
    scale = np.abs(want[real]).max()
    assert np.abs(got[real] - want[real]).max() <= 2e-3 * scale  # TF32 on Ampere and newer
