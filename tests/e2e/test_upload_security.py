"""Hostile and mistaken uploads against a real server: 4xx with a reason, nothing changes."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.helpers import infer_input
from tests.e2e.server import RemoteServer
from tests.models import basic_repository, scaled_model, tar_with_link, zip_bytes
from tests.pickle_payloads import Armed

LIMIT = 300_000


def armed_pt2(tmp_path: Path, payload: bytes) -> bytes:
    """A genuine torch.export archive whose sample inputs were replaced by ``payload``."""
    import torch

    path = tmp_path / "genuine.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)), str(path))
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buffer, "w") as out:
        for name in src.namelist():
            data = payload if "sample_inputs" in name else src.read(name)
            out.writestr(name, data)
    return buffer.getvalue()


def tree_digest(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def server_and_repo(
    tmp_path: Path, start_server: Callable[..., RemoteServer]
) -> tuple[RemoteServer, Path]:
    repo = basic_repository(tmp_path / "repository")
    env = {"SLIMSERVE_JOBS_DIR": str(tmp_path / "jobs"), "SLIMSERVE_MAX_UPLOAD_BYTES": str(LIMIT)}
    return start_server(repo, env=env), repo


def test_hostile_uploads_are_refused(tmp_path: Path, server_and_repo) -> None:
    server, repo = server_and_repo
    marker = tmp_path / "PWNED"
    armed = pickle.dumps(Armed(marker))
    before = tree_digest(repo)
    onnx_bytes = scaled_model(2.0)
    request = {"name": "victim"}
    cases = [
        (
            "zip slip",
            ("m.zip", zip_bytes({"../../evil.onnx": onnx_bytes})),
            request,
            400,
            "outside",
        ),
        (
            "absolute",
            ("m.zip", zip_bytes({"/tmp/evil.onnx": onnx_bytes})),
            request,
            400,
            "absolute",
        ),
        ("symlink out", ("m.tar.gz", tar_with_link("/etc/passwd")), request, 400, "link"),
        (
            "pickle in archive",
            ("hf.zip", zip_bytes({"config.json": b"{}", "pytorch_model.bin": armed})),
            request,
            400,
            "pickle",
        ),
        ("pickle file", ("model.pt", armed), request, 400, "pickle"),
        ("pickle in .pt2", ("m.pt2", armed_pt2(tmp_path, armed)), request, 400, "Path.touch"),
        ("pt2 not a zip", ("m.pt2", armed), request, 400, "not a torch.export archive"),
        ("oversized", ("big.onnx", bytes(2 * LIMIT)), request, 413, f"limit of {LIMIT} bytes"),
        ("bad name", ("m.onnx", onnx_bytes), {"name": "../../etc"}, 400, "name"),
        ("bad option", ("m.onnx", onnx_bytes), {"name": "x", "seq_len": -1}, 400, "seq_len"),
        ("unknown option", ("m.onnx", onnx_bytes), {"name": "x", "turbo": True}, 400, "turbo"),
        ("not onnx", ("m.onnx", b"\x08garbage"), request, 400, "not a valid ONNX"),
        ("unknown kind", ("m.h5", b"HDF"), request, 400, "cannot tell"),
    ]
    for label, model, body, status, message in cases:
        response = httpx.post(
            f"{server.url}/v2/optimize",
            files={"model": model},
            data={"request": json.dumps(body)},
            timeout=30,
        )
        assert response.status_code == status, (label, response.text)
        assert message in response.json()["error"], (label, response.text)
    missing = httpx.post(f"{server.url}/v2/optimize", files={"model": ("m.onnx", onnx_bytes)})
    assert missing.status_code == 400
    assert "'request'" in missing.json()["error"]
    not_form = httpx.post(f"{server.url}/v2/optimize", json={"name": "x"})
    assert not_form.status_code == 400
    assert "multipart/form-data" in not_form.json()["error"]

    assert not marker.exists(), "no upload was ever unpickled"
    assert not list(tmp_path.rglob("evil.onnx"))
    assert tree_digest(repo) == before
    assert httpx.get(f"{server.url}/v2/optimize/jobs").json() == {"jobs": []}
    assert list((tmp_path / "jobs").iterdir()) == [], "refused uploads leave no files"
    client = server.client()
    a = np.ones((1, 16), np.float32)
    result = client.infer("add_sub", [infer_input("INPUT0", a), infer_input("INPUT1", a)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 0 * a)


def test_unknown_job_is_404(server_and_repo) -> None:
    server, _ = server_and_repo
    for path in ("/v2/optimize/jobs/0123456789abcdef", "/v2/optimize/jobs/..%2F..%2Fetc"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 404
        assert "error" in response.json()
    response = httpx.delete(f"{server.url}/v2/optimize/jobs/0123456789abcdef")
    assert response.status_code == 404
