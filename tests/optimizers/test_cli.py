"""The offline CLI: ``optimize`` on a tiny model publishes into a repository; ``report``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from optimizers.cli import app
from optimizers.onnxutil import make_session
from serving.repository import ModelRepository

runner = CliRunner()


def test_cli_optimize_publishes_versions(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = runner.invoke(
        app,
        [
            "optimize",
            str(tiny_mlp_onnx),
            "--batch-size",
            "4",
            "--allow",
            "quantize_dynamic,lowrank",
            "--repository",
            str(repo),
            "--name",
            "mlp",
            "--output",
            str(tmp_path / "work"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "winner" in result.output
    assert "quantize_dynamic" in result.output
    entry = ModelRepository(repo).entry("mlp")
    assert entry.ok, entry.error
    assert entry.all_versions == [1, 2]
    v2 = entry.version(2)  # the default version policy serves the latest
    v1_file = repo / "mlp" / "1" / "model.onnx"
    assert (v2.path / "report.json").is_file()
    assert (v2.path / "report.png").is_file()
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    want = make_session(tiny_mlp_onnx).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_session(v1_file).run(None, {"x": x})[0], want)
    got = make_session(v2.model_file).run(None, {"x": x})[0]
    cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cosine >= 0.99

    shown = runner.invoke(app, ["report", str(v2.path)])
    assert shown.exit_code == 0, shown.output
    assert "original" in shown.output


def test_cli_bad_request_is_an_error(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["optimize", str(tiny_mlp_onnx), "--target", "tpu"])
    assert result.exit_code == 2
    assert "target" in result.output


def test_cli_report_missing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no report.json" in result.output


def test_slimserve_command_runs_the_pipeline(tiny_mlp_onnx: Path, tmp_path: Path) -> None:
    """``slimserve optimize`` / ``report`` (the server's CLI) are the pipeline's commands."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    command = [sys.executable, "-m", "serving", "optimize", str(tiny_mlp_onnx)]
    command += ["--batch-size", "4", "--allow", "lowrank", "--repository", str(repo)]
    command += ["--name", "mlp", "--output", str(tmp_path / "work")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    entry = ModelRepository(repo).entry("mlp")
    assert entry.ok, entry.error
    assert entry.all_versions == [1, 2]
    shown = subprocess.run(
        [sys.executable, "-m", "serving", "report", str(repo / "mlp" / "2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "original" in shown.stdout
