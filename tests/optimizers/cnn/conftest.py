"""Shared fixtures: the real digits demo model and its data splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizers.cnn import data

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "model_repository" / "digits_cnn" / "1" / "model.onnx"


@pytest.fixture(scope="session")
def digits_model() -> Path:
    if not DEMO.exists():
        pytest.skip(f"demo model missing: run bench/train_demo_models.py to create {DEMO}")
    return DEMO


@pytest.fixture(scope="session")
def digits_splits() -> data.DigitsSplits:
    return data.digits_splits()


def accuracy(session, x: np.ndarray, y: np.ndarray) -> float:
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())
