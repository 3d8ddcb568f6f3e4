"""Small helpers shared by the e2e tests: tritonclient inputs and direct ONNX Runtime runs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient

from serving.datatypes import v2_datatype


def infer_input(name: str, array: np.ndarray, *, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), v2_datatype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def run_direct(model_file: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs computed by onnxruntime in this process (the reference)."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def folder_tar_gz(folder: Path) -> bytes:
    """``folder`` as a ``.tar.gz`` upload (one top-level directory named like the folder)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    return buffer.getvalue()
