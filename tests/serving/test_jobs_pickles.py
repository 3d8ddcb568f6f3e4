"""The static pickle check of .pt2 uploads, and the worker's weights-only torch.load."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from serving.errors import InvalidInput
from serving.jobs.pickles import check_pickle_stream, check_pt2, check_torch_file
from tests.pickle_payloads import Armed, export_tiny_pt2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_pt2(tmp_path_factory.mktemp("pt2"))


def rewrite(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy a zip, replacing the members whose names end with a key of ``replace``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            for suffix, new in replace.items():
                if name.endswith(suffix):
                    data = new
            out.writestr(name, data)
    return target


def test_a_real_torch_export_archive_passes(pt2: Path) -> None:
    assert check_pt2(pt2) >= 1


def test_plain_tensor_pickles_pass() -> None:
    tensors = {"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}
    for zip_format in (True, False):
        buffer = io.BytesIO()
        torch.save(tensors, buffer, _use_new_zipfile_serialization=zip_format)
        check_torch_file(buffer.getvalue(), "tensors.pt")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_armed_pickles_are_refused_unread(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "PWNED"
    with pytest.raises(InvalidInput, match=r"would call .*(touch|getattr)"):
        check_pickle_stream(pickle.dumps(Armed(marker), protocol=protocol), "x.pkl")
    assert not marker.exists()


def test_sample_inputs_with_a_payload_are_refused(pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = rewrite(
        pt2, tmp_path / "evil.pt2", {"sample_inputs/model.pt": pickle.dumps(Armed(marker))}
    )
    with pytest.raises(InvalidInput, match="sample_inputs"):
        check_pt2(evil)
    assert not marker.exists()


def test_pickled_weights_and_custom_objects_are_checked(pt2: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(pt2) as src:
        config_name = next(n for n in src.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(src.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    armed = pickle.dumps(Armed(tmp_path / "PWNED"))
    evil = rewrite(
        pt2,
        tmp_path / "weights.pt2",
        {config_name: json.dumps(config).encode(), f"weights/{first['path_name']}": armed},
    )
    with pytest.raises(InvalidInput, match=first["path_name"]):
        check_pt2(evil)
    constants = {"config": {"obj": {"path_name": "custom_obj_0", "use_pickle": False}}}
    custom = rewrite(
        pt2, tmp_path / "custom.pt2", {"_constants_config.json": json.dumps(constants).encode()}
    )
    with pytest.raises(InvalidInput, match="custom or opaque object"):
        check_pt2(custom)


@pytest.mark.slow
def test_worker_torch_load_is_weights_only(pt2: Path, tmp_path: Path) -> None:
    """Defence in depth: even a .pt2 that got past the check cannot run code in the worker."""
    marker = tmp_path / "PWNED"
    evil = rewrite(
        pt2, tmp_path / "evil.pt2", {"sample_inputs/model.pt": pickle.dumps(Armed(marker))}
    )
    script = (
        "import sys, torch\n"
        "from serving.jobs.worker import harden_torch_load\n"
        "harden_torch_load()\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        torch.export.load(path)\n"
        "        print('loaded')\n"
        "    except Exception as exc:\n"
        "        print('refused', type(exc).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(evil), str(pt2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stdout.split("\n")
    assert lines[0].startswith("refused"), out.stdout + out.stderr
    assert lines[1] == "loaded", "a genuine archive still loads"
    assert not marker.exists()
