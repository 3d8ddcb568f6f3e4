"""Fixtures for the optimizer framework tests (tiny real models, built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.optimizers.tiny import tiny_bert_checkpoint, tiny_cnn, tiny_mlp


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_checkpoint(tmp_path_factory.mktemp("tiny_bert") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_cnn_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cnn(tmp_path_factory.mktemp("tiny_cnn") / "cnn.onnx")


@pytest.fixture(scope="session")
def tiny_mlp_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp(tmp_path_factory.mktemp("tiny_mlp") / "mlp.onnx")
