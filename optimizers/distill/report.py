"""What the distillation report shows: the held-out fidelity curve (PNG) and speed vs. teacher."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from optimizers.measure import MeasureSettings, onnx_latency


def plot_curve(
    curve: Sequence[tuple[int, float]],
    losses: Sequence[float],
    path: Path,
    *,
    metric: str,
    title: str,
) -> Path:
    """Held-out fidelity over training steps (and the training loss) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, left = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = [s for s, _ in curve]
    left.plot(steps, [f for _, f in curve], "o-", color="tab:blue", label=f"held-out {metric}")
    left.set_xlabel("training step")
    left.set_ylabel(f"held-out {metric}", color="tab:blue")
    if losses:
        right = left.twinx()
        right.plot(np.arange(1, len(losses) + 1), losses, color="tab:orange", alpha=0.5, lw=0.8)
        right.set_ylabel("training loss", color="tab:orange")
    left.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def speed_vs_teacher(
    teacher: Path,
    student: Path,
    feeds: dict[str, np.ndarray],
    target: str = "cpu",
    settings: MeasureSettings | None = None,
) -> dict[str, float]:
    """Median ONNX Runtime latency of teacher and student on one batch, measured alternately."""
    settings = settings or MeasureSettings(warmup=1, min_repeats=5, max_repeats=30, max_seconds=1.0)
    rounds = {"teacher": [], "student": []}
    for _ in range(2):  # alternate so background load hits both alike
        rounds["teacher"].append(onnx_latency(teacher, feeds, target, settings)["median_ms"])
        rounds["student"].append(onnx_latency(student, feeds, target, settings)["median_ms"])
    teacher_ms = float(np.median(rounds["teacher"]))
    student_ms = float(np.median(rounds["student"]))
    return {
        "teacher_ms": teacher_ms,
        "student_ms": student_ms,
        "speedup": teacher_ms / student_ms if student_ms > 0 else float("nan"),
        "batch": int(next(iter(feeds.values())).shape[0]),
    }
