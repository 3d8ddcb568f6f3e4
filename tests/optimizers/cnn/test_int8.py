"""Static INT8 on the real digits demo model: QDQ graph, accuracy, sensitivity, exclusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizers.cnn import graph, int8, timing
from tests.optimizers.cnn.conftest import ROOT, accuracy


@pytest.fixture(scope="module")
def calibration(digits_splits):
    x = digits_splits.calibration(128)
    return [{"input": x[i : i + 32]} for i in range(0, len(x), 32)]


@pytest.fixture(scope="module")
def evaluation(digits_splits):
    return int8.Evaluation([{"input": digits_splits.x_test}], digits_splits.y_test)


def test_splits_match_the_saved_test_split(digits_splits):
    saved = ROOT / "bench" / "data" / "digits_test.npz"
    if not saved.exists():
        pytest.skip("bench/data/digits_test.npz not present")
    with np.load(saved) as arrays:
        np.testing.assert_array_equal(arrays["x"], digits_splits.x_test)
        np.testing.assert_array_equal(arrays["y"], digits_splits.y_test)


def test_static_int8_keeps_demo_accuracy_within_one_point(
    digits_model, digits_splits, calibration, evaluation, tmp_path
):
    path, report = int8.quantize_cnn(digits_model, tmp_path, calibration, evaluation)
    ops = [n.op_type for n in graph.load(path).graph.node]
    assert ops.count("QuantizeLinear") >= 3
    assert ops.count("DequantizeLinear") >= 6
    x, y = digits_splits.x_test, digits_splits.y_test
    fp32 = accuracy(timing.session(digits_model), x, y)
    quant = accuracy(timing.session(path), x, y)
    assert fp32 - quant <= 0.01
    assert report["within_bound"]
    assert report["int8"]["accuracy"] == pytest.approx(quant)
    assert set(report["methods"]) == {"minmax", "percentile", "entropy"}
    assert report["method"] in report["methods"]
    # per-channel weights: one scale per output channel of the 32-filter conv
    model = graph.load(path)
    inits = graph.initializers(model)
    scales = [
        tuple(inits[n.input[1]].dims)
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[1] in inits
    ]
    assert (32,) in scales


def test_sensitivity_ranks_every_layer(digits_model, calibration, evaluation, tmp_path):
    options = int8.Int8Options(methods=("minmax",))
    rows = int8.sensitivity(
        Path(digits_model), tmp_path, calibration, evaluation, "minmax", options
    )
    assert len(rows) == 4  # two convs, two gemms
    assert all(r["mse"] > 0 for r in rows)
    assert [r["mse"] for r in rows] == sorted((r["mse"] for r in rows), reverse=True)


def test_exclusion_leaves_layers_in_float_until_bound_or_limit(
    digits_model, calibration, evaluation, tmp_path
):
    options = int8.Int8Options(methods=("minmax",), max_mse=1e-12, max_excluded=2)
    path, report = int8.quantize_cnn(digits_model, tmp_path, calibration, evaluation, options)
    assert not report["within_bound"]
    steps = report["exclusion_steps"]
    assert [step["excluded"] for step in steps] == [0, 1, 2]  # tried up to the limit
    ranked = [r["node"] for r in report["sensitivity"]]
    assert report["excluded"] == ranked[: len(report["excluded"])]  # most sensitive first
    kept = steps[len(report["excluded"])]
    best = max(steps, key=lambda step: (step["accuracy"], -step["mse"]))
    assert kept == best  # the best-scoring step is returned, not merely the last
    assert report["int8"]["mse"] == pytest.approx(kept["mse"])
    model = graph.load(path)
    producers = graph.producers(model)
    for node in model.graph.node:
        if node.name in report["excluded"]:
            weight_source = producers.get(node.input[1])
            assert weight_source is None or weight_source.op_type != "DequantizeLinear"


def test_options_name_the_bad_field():
    with pytest.raises(ValueError, match="methods"):
        int8.Int8Options(methods=("kl",))
    with pytest.raises(ValueError, match="activation_type"):
        int8.Int8Options(activation_type="int4")


def test_entropy_calibration_really_searches_thresholds(digits_model, calibration, tmp_path):
    from onnxruntime.quantization.calibrate import load_tensors_data

    options = int8.Int8Options(methods=("minmax", "entropy"))
    for method in options.methods:
        int8.quantize(
            digits_model,
            tmp_path / f"{method}.onnx",
            calibration,
            method,
            options,
            cache_dir=tmp_path,
        )
    minmax = load_tensors_data(tmp_path / "calibration_minmax.json")
    entropy = load_tensors_data(tmp_path / "calibration_entropy.json")

    def width(data, name):
        low, high = data[name].range_value
        return float(np.asarray(high).max() - np.asarray(low).min())

    narrower = [n for n in minmax if width(entropy, n) < 0.99 * width(minmax, n)]
    assert narrower, "entropy calibration returned the min/max range for every tensor"
