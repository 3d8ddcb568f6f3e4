"""The training loop's thread heuristic: idle CPU from /proc/stat, the load-average fallback, and
the thread count restored after the block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from optimizers.distill import trainer
from optimizers.distill.trainer import (
    _cpu_jiffies,
    free_cores,
    idle_fraction,
    torch_threads,
    usable_cores,
)

STAT = """cpu  100 5 50 800 20 3 2 10 7 0
cpu0 50 2 25 400 10 1 1 5 3 0
intr 12345
"""


def test_cpu_line_counts_iowait_as_idle_and_steal_as_busy():
    idle, total = _cpu_jiffies(STAT)
    assert idle == 800 + 20
    assert total == 100 + 5 + 50 + 800 + 20 + 3 + 2 + 10  # guest (7) is already in user
    with pytest.raises(ValueError, match="no aggregate cpu line"):
        _cpu_jiffies("intr 1 2 3\n")


def test_idle_fraction_samples_the_real_machine(tmp_path: Path):
    assert idle_fraction(0.01, stat=tmp_path / "missing") is None
    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat on this platform")
    fraction = idle_fraction(0.2)
    assert fraction is not None
    assert 0.0 <= fraction <= 1.0
    assert 1 <= free_cores(0.2) <= usable_cores()


def test_free_cores_follows_the_idle_share(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(trainer, "usable_cores", lambda: 2)
    for idle, expected in [(0.97, 2), (0.8, 2), (0.5, 1), (0.3, 1), (0.0, 1)]:
        monkeypatch.setattr(trainer, "idle_fraction", lambda _s, idle=idle: idle)
        assert free_cores() == expected, idle
    # without /proc/stat the 1-minute load average decides
    monkeypatch.setattr(trainer, "idle_fraction", lambda _s: None)
    monkeypatch.setattr(trainer.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert free_cores() == 2
    monkeypatch.setattr(trainer.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert free_cores() == 1


def test_torch_threads_restores_the_previous_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before
