"""Fixtures for the distillation tests: the demo digits CNN (teacher) and its data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from optimizers.distill.trainer import torch_threads

ROOT = Path(__file__).resolve().parents[3]
DIGITS_ONNX = ROOT / "model_repository" / "digits_cnn" / "1" / "model.onnx"


@pytest.fixture(scope="session")
def digits_onnx() -> Path:
    if not DIGITS_ONNX.is_file():
        pytest.skip("model_repository/digits_cnn is missing: run bench/train_demo_models.py")
    return DIGITS_ONNX


@pytest.fixture(scope="session")
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same stratified split the demo model was trained with (train images are unlabeled
    distillation data; the test split measures accuracy)."""
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return x_train, x_test, y_train, y_test


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Train with one thread, as the pass does by default (a shared CPU stalls two)."""
    with torch_threads(1):
        yield
