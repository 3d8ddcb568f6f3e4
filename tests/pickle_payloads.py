"""Shared pieces of the pickle-safety tests: an armed pickle payload and a genuine .pt2."""

from __future__ import annotations

from pathlib import Path

import torch


class Armed:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class TinyNet(torch.nn.Module):
    """A two-parameter network, enough for ``torch.export`` to write a real .pt2."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def export_tiny_pt2(folder: Path) -> Path:
    """A genuine ``torch.export`` archive of ``TinyNet`` at ``folder/tiny.pt2``."""
    path = folder / "tiny.pt2"
    torch.export.save(torch.export.export(TinyNet(), (torch.randn(2, 4),)), str(path))
    return path
