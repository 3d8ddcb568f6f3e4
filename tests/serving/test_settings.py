"""Settings: defaults, SLIMSERVE_* environment variables, validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.settings import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLIMSERVE_"):
            monkeypatch.delenv(key)
    settings = Settings()
    assert settings.repository == Path("./model_repository")
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.model_control_mode == "none"
    assert settings.cors_origins == []
    assert settings.jobs_path == Path("./model_repository").resolve().parent / ".slimserve-jobs"


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLIMSERVE_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("SLIMSERVE_PORT", "9123")
    monkeypatch.setenv("SLIMSERVE_MODEL_CONTROL_MODE", "explicit")
    monkeypatch.setenv("SLIMSERVE_STARTUP_MODELS", "a, b")
    monkeypatch.setenv("SLIMSERVE_CORS_ORIGINS", '["http://x.example"]')
    monkeypatch.setenv("SLIMSERVE_MAX_BODY_BYTES", "1234")
    monkeypatch.setenv("SLIMSERVE_LOG_LEVEL", "WARNING")
    settings = Settings()
    assert settings.repository == tmp_path
    assert settings.port == 9123
    assert settings.startup_models == ["a", "b"]
    assert settings.cors_origins == ["http://x.example"]
    assert settings.log_level == "warning"
    limits = settings.protocol_limits()
    assert limits.max_body_bytes == 1234
    assert limits.max_inputs == settings.max_inputs


def test_explicit_arguments_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSERVE_PORT", "9123")
    assert Settings(port=9000).port == 9000


def test_jobs_dir_setting(tmp_path: Path) -> None:
    assert Settings(jobs_dir=tmp_path / "jobs").jobs_path == tmp_path / "jobs"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_control_mode", "sometimes", "model_control_mode"),
        ("port", 70000, "port"),
        ("max_body_bytes", 0, "max_body_bytes"),
        ("poll_interval_s", -1, "poll_interval_s"),
    ],
)
def test_invalid_values_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_startup_models_need_explicit_mode() -> None:
    with pytest.raises(ValidationError, match="only applies to model_control_mode 'explicit'"):
        Settings(startup_models=["a"], model_control_mode="poll")
    assert Settings(startup_models=["a"], model_control_mode="explicit").startup_models == ["a"]


def test_cli_rejects_inconsistent_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    def flat(text: str) -> str:  # rich wraps errors in a box
        return "".join(ch for ch in text if ch not in "│╭╮╰╯─ \n")

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--repository", str(tmp_path), "--load-model", "m"])
    assert result.exit_code == 2
    assert flat("only applies to model_control_mode 'explicit'") in flat(result.output)
    result = runner.invoke(app, ["serve", "--model-control-mode", "sometimes"])
    assert result.exit_code == 2
    assert "model_control_mode" in flat(result.output)
    help_text = runner.invoke(app, ["serve", "--help"]).output
    assert "--model-control-mode" in help_text
