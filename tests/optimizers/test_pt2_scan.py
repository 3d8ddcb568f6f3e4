"""``.pt2`` archives are scanned before ``torch.export.load`` on the offline path too."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimizers.cli import app
from optimizers.loaders import load_pt2, load_source
from serving.errors import InvalidInput
from tests.pickle_payloads import Armed, export_tiny_pt2


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_pt2(tmp_path_factory.mktemp("pt2"))


def armed_copy(source: Path, target: Path, marker: Path) -> Path:
    """``source`` with its sample inputs replaced by a pickle that creates ``marker``."""
    replaced = 0
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("sample_inputs/model.pt"):
                data = pickle.dumps(Armed(marker))
                replaced += 1
            out.writestr(name, data)
    assert replaced == 1, "the archive layout changed: no sample_inputs/model.pt"
    return target


def test_genuine_pt2_still_loads(pt2: Path) -> None:
    loaded = load_pt2(pt2)
    assert loaded.artifact.kind == "torch"
    assert loaded.artifact.meta["example_inputs"]["x"].shape == (2, 4)


def test_crafted_pt2_refused_by_load_pt2(pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = armed_copy(pt2, tmp_path / "evil.pt2", marker)
    with pytest.raises(InvalidInput, match=r"sample_inputs.*would call"):
        load_pt2(evil)
    folder = tmp_path / "upload"
    folder.mkdir()
    armed_copy(pt2, folder / "model.pt2", marker)
    with pytest.raises(InvalidInput, match="refused"):
        load_source(folder, tmp_path / "work")
    assert not marker.exists()


def test_crafted_pt2_refused_by_cli_optimize(pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = armed_copy(pt2, tmp_path / "evil.pt2", marker)
    result = CliRunner().invoke(
        app,
        [
            "optimize",
            str(evil),
            "--repository",
            str(tmp_path / "repo"),
            "--name",
            "evil",
            "--output",
            str(tmp_path / "work"),
        ],
    )
    assert result.exit_code != 0
    assert "refused" in result.output, result.output
    assert not marker.exists()
    assert not (tmp_path / "repo" / "evil").exists()
