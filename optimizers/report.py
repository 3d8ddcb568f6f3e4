"""The optimization report: ``report.json``, a rich table, and ``report.png``.

``report.png`` plots latency against fidelity for every measured candidate, the winner
marked and the fidelity bound drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REQUIRED_KEYS = (
    "source",
    "target",
    "shapes",
    "fidelity_bound",
    "baseline",
    "candidates",
    "winner",
)
CANDIDATE_KEYS = ("passes", "latency_ms", "fidelity", "size_bytes", "status", "reason")


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Write the report (sorted keys, NaN-free) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2, sort_keys=True, allow_nan=False))
    return path


def _clean(value: Any) -> Any:
    import math

    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def read_report(path: Path) -> dict[str, Any]:
    """Load ``report.json`` from a file or a version folder."""
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report.json at {path}")
    return json.loads(path.read_text())


def validate(report: dict[str, Any]) -> list[str]:
    """Problems with the report's shape (empty when it has every required field)."""
    problems = [f"missing '{key}'" for key in REQUIRED_KEYS if key not in report]
    for index, candidate in enumerate(report.get("candidates", [])):
        for key in CANDIDATE_KEYS:
            if key not in candidate:
                problems.append(f"candidate {index}: missing '{key}'")
        if candidate.get("status") not in ("kept", "dropped"):
            problems.append(f"candidate {index}: status must be kept or dropped")
    return problems


def primary_metric(report: dict[str, Any]) -> str:
    """The fidelity metric to plot: cosine unless only an accuracy bound was given."""
    bound = report.get("fidelity_bound", {})
    return (
        "accuracy_drop" if "min_cosine" not in bound and "max_accuracy_drop" in bound else "cosine"
    )


def render_table(report: dict[str, Any]) -> Any:
    """A ``rich.table.Table`` with one row per candidate."""
    from rich.table import Table

    winner = (report.get("winner") or {}).get("id")
    eager = (report.get("baseline") or {}).get("pytorch_eager") or {}
    eager_ms = eager.get("latency_ms")
    shapes = report.get("shapes", {})
    title = (
        f"{report.get('name', '')} on {report.get('target')} - batch {shapes.get('batch_size')}"
        f", seq {shapes.get('seq_len')} - bound {report.get('fidelity_bound')}"
    )
    table = Table(title=title)
    for column in (
        "id",
        "passes",
        "latency ms",
        "vs original",
        "vs eager",
        "cosine",
        "max abs err",
        "top-1",
        "size MB",
        "status",
        "reason",
    ):
        table.add_column(column, overflow="fold")
    base_ms = (report.get("baseline") or {}).get("latency_ms")
    for c in report.get("candidates", []):
        fid = c.get("fidelity") or {}
        ms = c.get("latency_ms")
        mark = " *" if c.get("id") == winner else ""
        table.add_row(
            f"{c.get('id')}{mark}",
            c.get("label") or " -> ".join(c.get("passes") or []) or "original",
            _fmt(ms, "{:.2f}"),
            _ratio(base_ms, ms),
            _ratio(eager_ms, ms),
            _fmt(fid.get("cosine"), "{:.4f}"),
            _fmt(fid.get("max_abs_error"), "{:.3g}"),
            _fmt(fid.get("top1_agreement"), "{:.3f}"),
            _fmt(c["size_bytes"] / 1e6 if c.get("size_bytes") else None, "{:.1f}"),
            c.get("status", ""),
            c.get("reason", ""),
        )
    return table


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _ratio(reference: float | None, value: float | None) -> str:
    if not reference or not value:
        return "-"
    return f"{reference / value:.2f}x"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency (x) vs fidelity (y) for every measured candidate; winner starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = primary_metric(report)
    winner = (report.get("winner") or {}).get("id")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for c in report.get("candidates", []):
        ms, fid = c.get("latency_ms"), (c.get("fidelity") or {}).get(metric)
        if ms is None or fid is None:
            continue
        kept = c.get("status") == "kept"
        if c.get("id") == winner:
            ax.scatter([ms], [fid], marker="*", s=260, color="tab:red", zorder=3, label="winner")
        else:
            ax.scatter(
                [ms],
                [fid],
                marker="o" if kept else "x",
                s=50,
                color="tab:blue" if kept else "tab:gray",
                zorder=2,
            )
        ax.annotate(
            c.get("id", ""), (ms, fid), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    bound = report.get("fidelity_bound", {})
    if metric == "cosine" and "min_cosine" in bound:
        ax.axhline(
            bound["min_cosine"],
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"min_cosine {bound['min_cosine']}",
        )
    if metric == "accuracy_drop" and "max_accuracy_drop" in bound:
        ax.axhline(
            bound["max_accuracy_drop"],
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"max_accuracy_drop {bound['max_accuracy_drop']}",
        )
    eager = ((report.get("baseline") or {}).get("pytorch_eager") or {}).get("latency_ms")
    if eager:
        ax.axvline(eager, color="tab:orange", linestyle=":", linewidth=1, label="PyTorch eager")
    shapes = report.get("shapes", {})
    ax.set_xlabel(
        f"latency ms (median, batch {shapes.get('batch_size')}, "
        f"seq {shapes.get('seq_len')}, {report.get('target')})"
    )
    ax.set_ylabel(
        metric + (" (synthetic data)" if report.get("calibration", {}).get("synthetic") else "")
    )
    ax.set_title(f"{report.get('name', '')}: candidates (o kept, x dropped)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def pass_plots(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Copy the PNGs passes drew (the distill pass's fidelity curve) into ``folder``, beside
    ``report.json``; each pass report's ``plot_file`` and the report's ``plots`` name them.

    Returns ``{file name: path}`` for the files to publish with the engine.
    """
    import shutil

    files: dict[str, Path] = {}
    plots: dict[str, str] = {}
    for candidate in report.get("candidates", []):
        for entry in candidate.get("pass_reports") or []:
            source = Path(entry["plot"]) if entry.get("plot") else None
            if source is None or not source.is_file():
                continue
            name = f"{entry.get('pass', 'pass')}_curve.png"
            if name in files:
                name = f"{entry.get('pass', 'pass')}_curve_{candidate.get('id', len(files))}.png"
            folder.mkdir(parents=True, exist_ok=True)
            files[name] = Path(shutil.copyfile(source, folder / name))
            entry["plot_file"] = name
            plots[name] = f"{candidate.get('label', candidate.get('id', ''))}: {entry['pass']}"
    if plots:
        report["plots"] = plots
    return files
