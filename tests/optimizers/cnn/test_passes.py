"""The CNN passes through the registry, alone, chained, and in the real pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optimizers.cnn import graph, timing
from optimizers.passes.base import Artifact, PassContext, PassNotApplicable
from optimizers.registry import available_passes, get_pass, registered_chains
from tests.optimizers.cnn.conftest import accuracy


@pytest.fixture
def ctx(tmp_path, digits_splits):
    x = digits_splits.calibration(256)
    return PassContext(
        workdir=tmp_path,
        batch_size=8,
        calibration={
            "inputs": [{"input": x[i : i + 64]} for i in range(0, len(x), 64)],
            "eval": [{"input": digits_splits.x_test}],
            "labels": digits_splits.y_test,
        },
    )


@pytest.fixture
def artifact(digits_model):
    return Artifact("onnx", "cnn", onnx_path=digits_model)


def test_passes_and_chains_are_registered():
    passes = available_passes()
    assert {"winograd", "cnn_static_int8", "channel_prune"} <= set(passes)
    chains = registered_chains("cnn")
    assert [("channel_prune", {}), ("cnn_static_int8", {})] in chains
    with pytest.raises(ValueError, match="flops_budget"):
        get_pass("channel_prune", flops_budget=1.5)


def test_winograd_pass_reports_every_layer(artifact, ctx):
    result = get_pass("winograd", min_speedup=0.0, repeats=2).run(artifact, ctx)
    assert result.modified  # min_speedup 0: every accurate rewrite is kept
    assert [row["choice"][:8] for row in result.report["layers"]] == ["winograd", "winograd"]
    assert result.report["gpu_engine_setting"] == {"cudnn_conv_algo_search": "EXHAUSTIVE"}
    ops = {n.op_type for n in graph.load(result.artifact.onnx_path).graph.node}
    assert "Conv" not in ops


def test_winograd_pass_declines_gpu_targets_with_reason(artifact, ctx):
    ctx.target = "cuda"
    with pytest.raises(PassNotApplicable, match="cudnn_conv_algo_search=EXHAUSTIVE"):
        get_pass("winograd").run(artifact, ctx)


def test_prune_then_int8_chain(artifact, ctx, digits_splits):
    pruned = get_pass("channel_prune").run(artifact, ctx)
    assert pruned.modified
    assert pruned.report["macs_ratio"] <= 0.51
    quant = get_pass("cnn_static_int8").run(pruned.artifact, ctx, before=["channel_prune"])
    assert quant.artifact.meta["quantized"].startswith("static-qdq")
    x, y = digits_splits.x_test, digits_splits.y_test
    base = accuracy(timing.session(artifact.onnx_path), x, y)
    final = accuracy(timing.session(quant.artifact.onnx_path), x, y)
    assert base - final <= 0.03
    with pytest.raises(PassNotApplicable, match="already quantized"):
        get_pass("channel_prune").run(quant.artifact, ctx)


@pytest.mark.slow
def test_pipeline_runs_the_cnn_passes(digits_model, digits_splits, tmp_path):
    from optimizers.api import OptimizationRequest, run_optimization

    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=digits_splits.x_test, labels=digits_splits.y_test)
    request = OptimizationRequest(
        name="digits_cnn",
        batch_size=8,
        min_cosine=None,
        max_accuracy_drop=0.02,
        allow=("channel_prune", "cnn_static_int8"),
    )
    result = run_optimization(digits_model, request, tmp_path / "work", calibration=calibration)
    text = json.dumps(result.report, default=str)
    assert "channel_prune" in text
    assert "cnn_static_int8" in text
    assert result.engine_file.exists()
