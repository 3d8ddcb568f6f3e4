"""The training loop's thread heuristic: idle CPU from /proc/stat, the load-average fallback, and
the thread count restored after the block."""

from __future__ import annotations

import time
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


class _SlowEvalTask:
    """A linear student fitting y = 2x whose held-out evaluation costs 20 ms."""

    def __init__(self) -> None:
        self.student = torch.nn.Linear(1, 1)
        self.x = torch.linspace(-1, 1, 64).unsqueeze(1)
        self.evaluations = 0

    def epoch(self, rng):
        for _ in range(1000):
            yield rng.integers(0, 64, 16)

    def loss(self, batch):
        index = torch.from_numpy(batch)
        return (self.student(self.x[index]) - 2 * self.x[index]).pow(2).mean()

    def evaluate(self) -> float:
        self.evaluations += 1
        time.sleep(0.02)
        with torch.no_grad():
            return float(-(self.student(self.x) - 2 * self.x).pow(2).mean())


def _train(task: _SlowEvalTask, **kwargs) -> trainer.TrainingLog:
    return trainer.train(
        task,
        lr=0.05,
        weight_decay=0.0,
        warmup_steps=0,
        eval_every=1,
        patience=10_000,
        budget_s=60,
        max_steps=100,
        **kwargs,
    )


def test_evaluations_follow_eval_every_without_a_time_share():
    task = _SlowEvalTask()
    log = _train(task)
    assert log.steps == 100
    assert task.evaluations == 101  # the untrained student, then every step
    assert log.best_fidelity > log.initial_fidelity


def test_max_eval_share_defers_evaluations_to_training_steps():
    task = _SlowEvalTask()
    log = _train(task, max_eval_share=0.2)
    assert log.steps == 100
    # a step takes well under 20 ms, so most evaluations must wait; the last step is evaluated
    assert 2 <= task.evaluations < 60
    assert log.curve[-1][0] == 100
    assert [step for step, _ in log.curve] == sorted({step for step, _ in log.curve})
    assert log.best_fidelity > log.initial_fidelity


def test_adamw_uses_the_fused_kernel_where_available():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = trainer.adamw([weight], lr=0.1, weight_decay=0.0)
    assert optimizer.defaults.get("fused") is True
    weight.grad = torch.ones(3)
    optimizer.step()
    assert torch.all(weight < 1)
