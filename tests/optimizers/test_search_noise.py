"""Slower-than-parent drops allow for measurement noise (``SearchSettings.slower_tolerance``)
and the report carries each candidate's spread (IQR) so a reader can judge."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from optimizers import registry, search
from optimizers.api import OptimizationRequest, run_optimization
from optimizers.measure import MeasureSettings, time_calls
from optimizers.passes.base import Artifact, Pass, PassContext, PassResult
from optimizers.search import SearchSettings


class _Copy(Pass):
    """A changed artifact numerically identical to its parent; the file name carries the
    latency factor the patched timer reports for it."""

    name = "test_copy"

    @dataclass(frozen=True)
    class Config:
        factor: float = 1.0

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        target = ctx.scratch(self.name) / f"model_x{self.config.factor}.onnx"
        shutil.copyfile(artifact.onnx_path, target)
        return PassResult(artifact.with_onnx(target), True, {})


def _fixed_latency(path: Path, *_args, **_kwargs) -> dict:
    """Deterministic timings: 1 ms times the factor in the file name, 2% IQR."""
    stem = Path(path).stem
    factor = float(stem.split("_x", 1)[1]) if "_x" in stem else 1.0
    median = 1.0 * factor
    return {
        "median_ms": median,
        "p25_ms": median * 0.99,
        "p75_ms": median * 1.01,
        "iqr_ms": median * 0.02,
        "p90_ms": median * 1.02,
        "min_ms": median * 0.98,
        "runs": 5,
        "providers": ["CPUExecutionProvider"],
    }


def test_default_tolerance_is_small_and_positive() -> None:
    assert 0 < SearchSettings(bound={}).slower_tolerance <= 0.05


def test_time_calls_reports_quartiles() -> None:
    result = time_calls(lambda: time.sleep(0.001), MeasureSettings(warmup=1, min_repeats=7))
    assert result["p25_ms"] <= result["median_ms"] <= result["p75_ms"]
    assert result["iqr_ms"] == pytest.approx(result["p75_ms"] - result["p25_ms"])
    assert result["iqr_ms"] >= 0
    assert result["median_ms"] >= 1.0


def test_equal_kept_within_noise_slower_dropped_with_spread(
    tiny_mlp_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.available_passes()
    monkeypatch.setitem(registry._PASSES, _Copy.name, _Copy)
    monkeypatch.setitem(
        registry._CHAINS,
        "generic",
        [[("test_copy", {"factor": f})] for f in (1.0, 1.02, 1.1, 0.9)],
    )
    monkeypatch.setattr(search, "onnx_latency", _fixed_latency)
    request = OptimizationRequest(name="mlp", batch_size=2, allow=("test_copy",))
    report = run_optimization(tiny_mlp_onnx, request, tmp_path / "job").report
    by_label = {c["label"]: c for c in report["candidates"]}
    assert report["search"]["slower_tolerance"] == pytest.approx(0.03)

    equal = by_label["test_copy(factor=1.0)"]
    assert equal["status"] == "kept", equal["reason"]
    assert "within the 3% noise tolerance" in equal["reason"]
    noisy = by_label["test_copy(factor=1.02)"]
    assert noisy["status"] == "kept", noisy["reason"]
    slower = by_label["test_copy(factor=1.1)"]
    assert slower["status"] == "dropped"
    assert "slower than its parent c0" in slower["reason"]
    assert "3% tolerance" in slower["reason"]
    assert "IQR" in slower["reason"]
    faster = by_label["test_copy(factor=0.9)"]
    assert faster["status"] == "kept"
    assert report["winner"]["id"] == faster["id"]  # the fastest median still wins
    for candidate in report["candidates"]:
        assert candidate["latency_spread"] == pytest.approx(0.02)
        assert candidate["latency"]["iqr_ms"] > 0


class _Slow(_Copy):
    """A pass the user requires even though it times slower (like packing on unpadded data)."""

    name = "test_slow"


def test_required_pass_is_served_even_when_slower(
    tiny_mlp_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.available_passes()
    monkeypatch.setitem(registry._PASSES, _Copy.name, _Copy)
    monkeypatch.setitem(registry._PASSES, _Slow.name, _Slow)
    monkeypatch.setitem(
        registry._CHAINS,
        "generic",
        [[("test_copy", {"factor": 0.5})], [("test_slow", {"factor": 1.5})]],
    )
    monkeypatch.setattr(search, "onnx_latency", _fixed_latency)
    allow = ("test_copy", "test_slow")
    free = OptimizationRequest(name="mlp", batch_size=2, allow=allow)
    report = run_optimization(tiny_mlp_onnx, free, tmp_path / "free").report
    assert report["winner"]["label"] == "test_copy(factor=0.5)"  # fastest wins when free

    required = OptimizationRequest(name="mlp", batch_size=2, allow=allow, require=("test_slow",))
    report = run_optimization(tiny_mlp_onnx, required, tmp_path / "required").report
    assert report["winner"]["label"] == "test_slow(factor=1.5)"
    assert report["require"] == {
        "passes": ["test_slow"],
        "met": True,
        "reason": "the winner holds every required pass",
    }
    labels = [c["label"] for c in report["candidates"]]
    assert "test_copy(factor=0.5)" not in labels  # chains without it are not searched
    assert any("lacks required" in s["reason"] for s in report["skipped_chains"])


def test_require_must_be_allowed_and_known(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    from serving.errors import InvalidInput

    with pytest.raises(InvalidInput, match="must also be named in allow"):
        OptimizationRequest(name="mlp", allow=("quantize_dynamic",), require=("lowrank",))
    request = OptimizationRequest(name="mlp", batch_size=2, require=("no_such_pass",))
    with pytest.raises(InvalidInput, match="no candidate chain"):
        run_optimization(tiny_mlp_onnx, request, tmp_path / "job")
