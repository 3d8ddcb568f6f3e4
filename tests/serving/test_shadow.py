"""Shadow fidelity: comparisons, settings, and monitors on a real ModelManager (ONNX Runtime)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from serving.errors import InvalidInput
from serving.manager import ModelManager
from serving.shadow import ShadowMonitor, compare, shadow_settings
from tests.models import config, mlp_model, write_model
from tests.serving.manager_runner import run

FEATURES = 64


def shadow_config(**params: str) -> dict[str, Any]:
    return {
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "dynamic_batching": {},
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


def perturbed(model: bytes, scale: float, seed: int = 1) -> bytes:
    """``model`` with every weight matrix multiplied by ``1 + scale * N(0, 1)`` noise."""
    proto = onnx.load_from_string(model)
    rng = np.random.default_rng(seed)
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:
            noisy = w * (1 + scale * rng.standard_normal(w.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    return proto.SerializeToString()


def int8(model: bytes, tmp: Path) -> bytes:
    src, dst = tmp / "fp32.onnx", tmp / "int8.onnx"
    src.write_bytes(model)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst.read_bytes()


def make_repo(root: Path, compressed: bytes, *, report: dict | None = None, **params: str) -> Path:
    """Model ``m``: version 1 the FP32 MLP, version 2 ``compressed`` with its report.json."""
    folder = write_model(
        root, "m", mlp_model(features=FEATURES), model_config=shadow_config(**params)
    )
    (folder / "2").mkdir()
    (folder / "2" / "model.onnx").write_bytes(compressed)
    report = (
        {"source_version": 1, "fidelity_bound": {"min_cosine": 0.99}} if report is None else report
    )
    (folder / "2" / "report.json").write_text(json.dumps(report))
    return root


def batches(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, FEATURES)).astype(np.float32) for _ in range(n)]


async def serve(manager: ModelManager, x: np.ndarray) -> tuple[int, dict[str, np.ndarray]]:
    """Answer one request the way the infer route does (including the shadow offer)."""
    loaded = manager.get("m")
    with loaded.use():
        outputs, _ = await loaded.batcher.submit({"x": x})
    if loaded.shadow is not None:
        loaded.shadow.offer({"x": x}, outputs)
    return loaded.version, outputs


async def settle(monitor: ShadowMonitor, samples: int) -> None:
    for _ in range(500):
        if monitor.samples + monitor.dropped >= samples:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {monitor.samples} samples compared: {monitor.summary()}")


def sample_value(manager: ModelManager, name: str, labels: dict[str, str]) -> float | None:
    return manager.metrics.registry.get_sample_value(name, labels)


LABELS = {"model": "m", "version": "2", "source_version": "1"}


# ------------------------------------------------------------------------ pure functions


def test_compare_identical_outputs() -> None:
    y = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    agreement = compare({"y": y}, {"y": y.copy()}, batched=True)
    assert agreement.cosine == pytest.approx(1.0)
    assert agreement.max_abs_error == 0.0
    assert agreement.top1 == 1.0


def test_compare_measures_error_and_top1() -> None:
    ref = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]], np.float32)
    out = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], np.float32)
    agreement = compare({"y": out}, {"y": ref}, batched=True)
    assert agreement.top1 == 0.5
    assert agreement.max_abs_error == 3.0
    expected = float(out.ravel() @ ref.ravel()) / (np.linalg.norm(out) * np.linalg.norm(ref))
    assert agreement.cosine == pytest.approx(expected)


def test_compare_worst_output_wins_and_no_top1_for_vectors() -> None:
    a = np.ones((2, 1), np.float32)
    agreement = compare({"a": a, "b": a}, {"a": a, "b": -a}, batched=True)
    assert agreement.cosine == pytest.approx(-1.0)
    assert agreement.top1 is None  # one column is not a classifier


def test_compare_without_common_outputs_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no numeric output"):
        compare({"a": np.ones(2)}, {"b": np.ones(2)}, batched=False)


def test_settings_default_from_report() -> None:
    cfg = config(shadow_config(shadow_sample_rate="0.01"))
    settings = shadow_settings(cfg, {"source_version": 3, "fidelity_bound": {"min_cosine": 0.97}})
    assert settings is not None
    assert (settings.sample_rate, settings.source_version, settings.min_cosine) == (0.01, 3, 0.97)
    assert settings.fallback is False
    # off without a rate, and without anything to compare with
    assert shadow_settings(config(shadow_config()), {"source_version": 3}) is None
    assert shadow_settings(cfg, {}) is None


def test_settings_explicit_values_win() -> None:
    cfg = config(
        shadow_config(
            shadow_sample_rate="1",
            shadow_source_version="1",
            shadow_min_cosine="0.9",
            shadow_fallback="true",
            shadow_window="5",
            shadow_min_samples="2",
        )
    )
    settings = shadow_settings(cfg, {"source_version": 3, "fidelity_bound": {"min_cosine": 0.99}})
    assert settings is not None
    assert (settings.source_version, settings.min_cosine, settings.fallback) == (1, 0.9, True)
    assert (settings.window, settings.min_samples) == (5, 2)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"shadow_sample_rate": "lots"}, "shadow_sample_rate: expected a number"),
        ({"shadow_sample_rate": "2"}, r"shadow_sample_rate must be in \[0, 1\]"),
        ({"shadow_sample_rate": "1", "shadow_fallback": "maybe"}, "shadow_fallback"),
        ({"shadow_sample_rate": "1", "shadow_source_version": "0"}, "shadow_source_version"),
        ({"shadow_sample_rate": "1", "shadow_min_samples": "500"}, "shadow_min_samples"),
    ],
)
def test_settings_refuse_bad_values(params: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        shadow_settings(config(shadow_config(**params)), {"source_version": 1})


# ------------------------------------------------------------------- on a real manager


def test_shadow_against_itself_is_exact(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", mlp_model(features=FEATURES), shadow_sample_rate="1")

    async def body(manager: ModelManager) -> None:
        loaded = manager.get("m")
        monitor = loaded.shadow
        assert monitor is not None
        assert loaded.version == 2
        assert monitor.owns_source  # version 1 is not served (latest 1): loaded for shadowing
        size = (repo / "m" / "1" / "model.onnx").stat().st_size
        assert sample_value(manager, "slimserve_shadow_source_model_bytes", LABELS) == size
        for x in batches(20):
            await serve(manager, x)
        await settle(monitor, 20)
        summary = monitor.summary()
        assert summary["samples"] == 20
        assert summary["dropped"] == 0
        assert summary["rolling_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert summary["rolling_max_abs_error"] == pytest.approx(0.0, abs=1e-5)
        assert summary["rolling_top1_agreement"] == 1.0
        assert not summary["alerting"]
        assert summary["alerts"] == 0
        assert sample_value(manager, "slimserve_shadow_samples_total", LABELS) == 20
        assert sample_value(manager, "slimserve_shadow_top1_agreement_total", LABELS) == 20
        assert sample_value(manager, "slimserve_shadow_alerts_total", LABELS) == 0
        assert sample_value(manager, "slimserve_shadow_cosine_count", LABELS) == 20

    run(repo, body)


def test_int8_version_agreement_matches_direct_comparison(tmp_path: Path) -> None:
    original = mlp_model(features=FEATURES)
    quantized = int8(original, tmp_path)
    repo = make_repo(tmp_path / "repo", quantized, shadow_sample_rate="1")
    inputs = batches(12, seed=3)
    # the expected agreement, from ONNX Runtime run directly on the two files
    ref = ort.InferenceSession(original, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(quantized, providers=["CPUExecutionProvider"])
    expected = [compare({"y": q.run(None, {"x": x})[0]}, {"y": ref.run(None, {"x": x})[0]},
                        batched=True) for x in inputs]  # fmt: skip

    async def body(manager: ModelManager) -> dict[str, Any]:
        monitor = manager.get("m").shadow
        assert monitor is not None
        for x in inputs:
            await serve(manager, x)
        await settle(monitor, len(inputs))
        return monitor.summary()

    summary = run(repo, body)
    mean_cosine = float(np.mean([e.cosine for e in expected]))
    assert 0.99 < mean_cosine < 1.0  # INT8 is close, not exact
    assert summary["rolling_cosine"] == pytest.approx(mean_cosine, abs=1e-5)
    assert summary["rolling_max_abs_error"] == pytest.approx(
        np.mean([e.max_abs_error for e in expected]), rel=1e-3
    )
    assert summary["rolling_top1_agreement"] == pytest.approx(np.mean([e.top1 for e in expected]))
    assert summary["alerts"] == 0  # within the report's 0.99 bound


def test_perturbed_version_trips_the_alert_without_fallback(tmp_path: Path) -> None:
    broken = perturbed(mlp_model(features=FEATURES), 1.0)
    repo = make_repo(tmp_path / "repo", broken, shadow_sample_rate="1", shadow_min_samples="5")

    async def body(manager: ModelManager) -> None:
        monitor = manager.get("m").shadow
        assert monitor is not None
        for x in batches(8):
            await serve(manager, x)
        await settle(monitor, 8)
        assert monitor.alerting
        assert monitor.alerts == 1
        assert monitor.rolling_cosine < 0.99
        assert sample_value(manager, "slimserve_shadow_alerts_total", LABELS) == 1
        assert sample_value(manager, "slimserve_shadow_alerting", LABELS) == 1
        assert manager.get("m").version == 2  # fallback is off by default

    run(repo, body)


def test_perturbed_version_falls_back_to_the_source(tmp_path: Path) -> None:
    broken = perturbed(mlp_model(features=FEATURES), 1.0)
    repo = make_repo(
        tmp_path / "repo",
        broken,
        shadow_sample_rate="1",
        shadow_min_samples="5",
        shadow_fallback="true",
    )
    source = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"))

    async def body(manager: ModelManager) -> None:
        monitor = manager.get("m").shadow
        assert monitor is not None
        for x in batches(5):
            await serve(manager, x)
        await settle(monitor, 5)
        assert monitor.fallback_active
        x = batches(1, seed=9)[0]
        version, outputs = await serve(manager, x)
        assert version == 1  # unversioned requests now get the source version
        np.testing.assert_allclose(outputs["y"], source.run(None, {"x": x})[0], rtol=1e-5)
        assert manager.get("m", 2).version == 2  # asking for the version still gets it
        assert sample_value(manager, "slimserve_shadow_fallback_active", LABELS) == 1

    run(repo, body)


def test_full_queue_drops_instead_of_waiting(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "repo",
        mlp_model(features=FEATURES),
        shadow_sample_rate="1",
        shadow_queue_size="2",
    )

    async def body(manager: ModelManager) -> None:
        loaded = manager.get("m")
        monitor = loaded.shadow
        assert monitor is not None
        x = batches(1)[0]
        outputs, _ = await loaded.batcher.submit({"x": x})
        for _ in range(10):  # offered without yielding: the worker cannot take any yet
            monitor.offer({"x": x}, outputs)
        assert monitor.dropped == 8
        assert sample_value(manager, "slimserve_shadow_dropped_total", LABELS) == 8
        await settle(monitor, 10)
        assert monitor.samples == 2

    run(repo, body)


def test_served_source_is_reused_and_unload_stops_shadowing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", mlp_model(features=FEATURES), shadow_sample_rate="1")
    cfg = shadow_config(shadow_sample_rate="1")
    cfg["version_policy"] = {"all": {}}
    write_model(repo, "m", mlp_model(features=FEATURES), versions=(), model_config=cfg)

    async def body(manager: ModelManager) -> None:
        v1, v2 = manager.get("m", 1), manager.get("m", 2)
        assert v1.shadow is None  # no report.json: not a compressed version
        monitor = v2.shadow
        assert monitor is not None
        assert monitor.source is v1
        assert not monitor.owns_source
        assert sample_value(manager, "slimserve_shadow_source_model_bytes", LABELS) == 0
        await manager.unload("m")
        assert v2.shadow is None
        assert sample_value(manager, "slimserve_shadow_source_model_bytes", LABELS) is None

    run(repo, body, model_control_mode="explicit", startup_models=["m"])


def test_reload_without_shadowing_releases_the_source(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", mlp_model(features=FEATURES), shadow_sample_rate="1")

    async def body(manager: ModelManager) -> None:
        monitor = manager.get("m").shadow
        assert monitor is not None
        assert monitor.owns_source
        source = monitor.source
        write_model(
            repo, "m", mlp_model(features=FEATURES), versions=(), model_config=shadow_config()
        )
        await manager.reload("m")
        assert manager.get("m").shadow is None
        assert source.batcher._closing  # the shadow-only source version was released
        assert sample_value(manager, "slimserve_shadow_source_model_bytes", LABELS) is None

    run(repo, body)
