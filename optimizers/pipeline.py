"""Orchestrates one optimization job: load -> export -> calibrate -> search -> report.

Called through ``optimizers.api.run_optimization``; writes everything under ``workdir``
(``source/``, ``passes/``, ``original/model.onnx``, ``result/model.onnx`` + report files).

TensorRT (``target="tensorrt"``): a winner carrying a plan (``meta["tensorrt_plan"]``, from the
``tensorrt_build`` pass) is published as ``result/model.plan`` + ``model.plan.json`` with
platform ``tensorrt_plan``; plan-carrying candidates are preferred over plain ONNX ones (their
latency and fidelity are those of the ONNX graph the plan was built from, measured in ONNX
Runtime). When no plan could be built (no TensorRT or GPU: the pass is not applicable), the
job falls back to the best ONNX candidate for ``onnxruntime_onnx`` and ``report["tensorrt"]``
says why.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from optimizers.api import OptimizationRequest, OptimizationResult, ProgressCallback
from optimizers.calibration import load_calibration, synthetic_feeds
from optimizers.chains import build_chains, chain_label
from optimizers.loaders import LoadedSource, load_source, transformer_example
from optimizers.measure import MeasureSettings, torch_latency
from optimizers.onnxutil import graph_io, input_shapes, load_model, model_files, save_model
from optimizers.passes.base import Artifact, Cancelled, PassContext
from optimizers.registry import LOAD_ERRORS, get_pass
from optimizers.report import pass_plots, plot, write_json
from optimizers.search import Search, SearchSettings
from serving.backends.openvino import reshape_input
from serving.errors import InvalidInput

PLATFORM = "onnxruntime_onnx"
PLAN_PLATFORM = "tensorrt_plan"
PLAN_PASS = "tensorrt_build"


class _Progress:
    """Turns pass/search callbacks into ``{"stage","message","fraction","candidate"}`` events."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.stage = "load"
        self.candidate: str | None = None
        self.base = 0.0  # overall fraction where the current step starts ...
        self.span = 0.0  # ... and the share of the whole job it covers

    def emit(self, stage: str, message: str, fraction: float | None = None) -> None:
        self.stage = stage
        if self.callback is not None:
            self.callback(
                {
                    "stage": stage,
                    "message": message,
                    "fraction": fraction,
                    "candidate": self.candidate,
                }
            )

    def from_pass(self, message: str, fraction: float | None) -> None:
        """A pass's own progress (0..1 of its work) mapped into the job's overall fraction."""
        overall = None
        if fraction is not None and self.span > 0:
            overall = self.base + self.span * min(max(float(fraction), 0.0), 1.0)
        self.emit(self.stage, message, overall)


def optimize(
    source: Path,
    request: OptimizationRequest,
    workdir: Path,
    *,
    calibration: Path | None = None,
    progress: ProgressCallback | None = None,
    cancel_event: threading.Event | None = None,
    measure: MeasureSettings | None = None,
) -> OptimizationResult:
    """See ``optimizers.api.run_optimization``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    events = _Progress(progress)
    measure = measure or MeasureSettings()
    deadline = started + request.time_budget_s if request.time_budget_s else None
    ctx = PassContext(
        workdir=workdir / "passes",
        target=request.target,  # type: ignore[arg-type]
        batch_size=request.batch_size,
        seq_len=request.seq_len,
        deadline=deadline,
        cancel_event=cancel_event,
        progress=events.from_pass,
    )

    events.emit("load", f"loading {source.name}")
    loaded = load_source(source, workdir)
    ctx.check_cancelled()

    eager: dict[str, Any] | None = None
    export_report: dict[str, Any] | None = None
    artifact = loaded.artifact
    torch_model = artifact.torch_model if artifact.kind == "torch" else None
    if artifact.kind == "torch":
        events.emit("export", "exporting to ONNX (parity checked)")
        result = get_pass("export").run(artifact, ctx)
        export_report = {"seconds": round(result.seconds, 3), **result.report}
        artifact = result.artifact
    ctx.check_cancelled()

    original = save_model(load_model(artifact.onnx_path), workdir / "original" / "model.onnx")
    artifact = Artifact("onnx", artifact.family, onnx_path=original, meta=dict(artifact.meta))
    specs, _outputs = graph_io(original)

    events.emit("calibrate", "preparing calibration and held-out data")
    ctx.calibration = load_calibration(
        calibration,
        specs,
        family=artifact.family,
        meta=artifact.meta,
        tokenizer_dir=loaded.tokenizer_dir,
        batch_size=request.batch_size,
        seq_len=request.seq_len,
    )
    timing = timing_feeds(artifact, specs, request)
    if torch_model is not None:
        events.emit("baseline", "measuring PyTorch eager")
        eager = _eager_latency(torch_model, artifact, timing, measure, request.target)

    events.emit("baseline", "measuring the original in ONNX Runtime")
    settings = SearchSettings(
        bound=request.fidelity_bound(),
        measure=measure,
        pass_defaults={"target_cosine": request.min_cosine},
        required=tuple(request.require or ()),
        static_shape=request.static_shape,
    )

    def on_candidate(label: str, done: int, total: int) -> None:
        events.candidate = label
        events.base, events.span = (done - 1) / max(total, 1), 1 / max(total, 1)
        events.emit("search", f"candidate {done}/{total}: {label}", events.base)

    search = Search(artifact, ctx, settings, timing, on_candidate)
    chains, skipped_chains = build_chains(artifact.family, request.target, request.allow)
    chains = required_chains(chains, skipped_chains, request, artifact.family)
    search.run(chains)
    events.candidate = None
    events.span = 0.0
    winner = pick_winner(search, request.target)

    events.emit("report", f"winner: {winner.id}", 1.0)
    result_dir = workdir / "result"
    engine, platform, files = save_engine(winner.artifact, result_dir)
    report = build_report(
        request,
        loaded,
        search,
        winner,
        eager,
        export_report,
        timing,
        skipped_chains,
        time.monotonic() - started,
    )
    report["engine"] = {"platform": platform, "file": engine.name}
    measured_on = (winner.latency or {}).get("providers") or []
    if platform == PLATFORM and measured_on[:1] == ["CUDAExecutionProvider"]:
        report["engine"]["device"] = "gpu"  # timed on CUDA: served on a GPU instance group
    accelerator = winner.artifact.meta.get("cpu_accelerator")
    if accelerator and platform == PLATFORM:  # measured on it: serve on it (config.pbtxt)
        report["engine"]["cpu_execution_accelerator"] = accelerator
        if accelerator == "openvino" and request.static_shape:  # timed compiled for it
            report["engine"]["static_shapes"] = reshape_input(input_shapes(engine, timing))
    if request.require:
        met = search.holds_required(winner)
        report["require"] = {
            "passes": list(request.require),
            "met": met,
            "reason": "the winner holds every required pass"
            if met
            else "no candidate holding the required passes was within the fidelity bound; "
            "the original is served",
        }
    if request.target == "tensorrt":
        report["tensorrt"] = tensorrt_summary(search, winner, platform)
    files.update(pass_plots(report, result_dir))  # e.g. distill_curve.png
    files["report.json"] = write_json(report, result_dir / "report.json")
    try:
        files["report.png"] = plot(report, result_dir / "report.png")
    except Exception as exc:  # a plotting problem must not lose the engine
        report["plot_error"] = f"{type(exc).__name__}: {exc}"
        write_json(report, result_dir / "report.json")
    original_files = {n: p for n, p in model_files(original).items() if n != original.name}
    events.emit("done", f"done: {winner.id} {winner.latency_ms:.2f} ms", 1.0)
    return OptimizationResult(
        engine_file=engine,
        platform=platform,
        files=files,
        report=report,
        original_file=original,
        original_files=original_files,
    )


def required_chains(
    chains: list[list[Any]],
    skipped: list[dict[str, Any]],
    request: OptimizationRequest,
    family: str,
) -> list[list[Any]]:
    """The chains holding every pass of ``request.require`` (others go to ``skipped``)."""
    if not request.require:
        return chains
    kept = []
    for chain in chains:
        names = [name for name, _ in chain]
        missing = [n for n in request.require if n not in names]
        if missing:
            skipped.append({"passes": names, "reason": f"lacks required pass(es) {missing}"})
        else:
            kept.append(chain)
    if not kept:
        raise InvalidInput(
            f"require: no candidate chain for a {family} model on target {request.target!r} "
            f"holds {list(request.require)} (check the names and that they are allowed)"
        )
    return kept


def pick_winner(search: Search, target: str) -> Any:
    """The fastest kept candidate; for ``tensorrt``, the fastest one carrying a plan if any."""
    if target == "tensorrt":
        planned = [
            c
            for c in search.candidates
            if c.status == "kept"
            and c.latency_ms is not None
            and c.artifact is not None
            and c.artifact.meta.get("tensorrt_plan")
        ]
        if planned:
            return min(planned, key=lambda c: c.latency_ms)
    return search.winner()


def save_engine(artifact: Artifact, result_dir: Path) -> tuple[Path, str, dict[str, Path]]:
    """Write the winner's engine into ``result_dir``: (engine file, platform, extra files).

    A TensorRT plan becomes ``model.plan`` + ``model.plan.json`` (``tensorrt_plan``);
    otherwise the ONNX graph becomes ``model.onnx`` (+ external data, ``onnxruntime_onnx``).
    """
    plan = artifact.meta.get("tensorrt_plan")
    if plan:
        from serving.backends.tensorrt import metadata_path

        result_dir.mkdir(parents=True, exist_ok=True)
        engine = result_dir / "model.plan"
        shutil.copyfile(plan, engine)
        sidecar = shutil.copyfile(metadata_path(Path(plan)), metadata_path(engine))
        return engine, PLAN_PLATFORM, {sidecar.name: sidecar}
    engine = save_model(load_model(artifact.onnx_path), result_dir / "model.onnx")
    files = {name: path for name, path in model_files(engine).items() if name != engine.name}
    return engine, PLATFORM, files


def tensorrt_summary(search: Search, winner: Any, platform: str) -> dict[str, Any]:
    """For ``target="tensorrt"``: whether a plan was published, and why not if not."""
    builds = [c for c in search.candidates if c.steps and c.steps[-1][0] == PLAN_PASS]
    summary: dict[str, Any] = {
        "plan_published": platform == PLAN_PLATFORM,
        "build_attempts": [
            {"id": c.id, "label": chain_label(c.steps), "status": c.status, "reason": c.reason}
            for c in builds
        ],
    }
    if platform != PLAN_PLATFORM:
        reasons = sorted({c.reason for c in builds}) or [f"no chain ran {PLAN_PASS}"]
        summary["note"] = (
            f"no TensorRT plan was built ({'; '.join(reasons)}); published the best ONNX "
            f"candidate ({winner.id}) for {PLATFORM} instead"
        )
    else:
        summary["note"] = (
            "latency and fidelity are those of the ONNX graph the plan was built from, "
            "measured in ONNX Runtime"
        )
    return summary


def timing_feeds(
    artifact: Artifact, specs: list, request: OptimizationRequest
) -> dict[str, np.ndarray]:
    """One batch at exactly the requested batch size and sequence length (no padding)."""
    if artifact.family == "transformer" and "input_names" in artifact.meta:
        names = [s.name for s in specs]
        meta = {**artifact.meta, "input_names": names}
        return transformer_example(meta, request.batch_size, request.seq_len, seed=7)
    return synthetic_feeds(
        specs,
        request.batch_size,
        request.seq_len,
        artifact.family,
        artifact.meta,
        seed=7,
        full_mask=True,
    )


def _eager_latency(
    model: Any,
    artifact: Artifact,
    feeds: dict[str, np.ndarray],
    measure: MeasureSettings,
    target: str = "cpu",
) -> dict[str, Any] | None:
    """PyTorch eager FP32 latency: on the GPU for GPU targets when torch sees one (so
    ``speedup_vs_eager`` compares like with like), else on the CPU."""
    import torch

    on_gpu = target in ("cuda", "tensorrt") and torch.cuda.is_available()
    if on_gpu and isinstance(model, torch.nn.Module):
        model.to("cuda")
        try:
            result = torch_latency(model, feeds, measure, device="cuda")
        finally:
            model.to("cpu")  # later passes (pruning, distillation) work on the CPU copy
            torch.cuda.empty_cache()
        result["latency_ms"] = result["median_ms"]
        return result
    if isinstance(model, torch.export.ExportedProgram):
        module = model.module()
        names = list(artifact.meta["input_names"])
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]

        def call(**_: Any) -> Any:
            return module(*tensors)

        result = torch_latency(call, {}, measure)
    else:
        result = torch_latency(model, feeds, measure)
    result["latency_ms"] = result["median_ms"]
    return result


def _relative(artifact: Artifact | None, root: Path) -> str | None:
    """The candidate's ONNX file relative to the job folder (None when it was dropped)."""
    if artifact is None or artifact.onnx_path is None:
        return None
    try:
        return str(artifact.onnx_path.resolve().relative_to(root.resolve()))
    except ValueError:
        return None


def build_report(
    request: OptimizationRequest,
    loaded: LoadedSource,
    search: Search,
    winner: Any,
    eager: dict[str, Any] | None,
    export_report: dict[str, Any] | None,
    timing: dict[str, np.ndarray],
    skipped_chains: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """The ``report.json`` document."""
    calibration = search.ctx.calibration
    base = search.baseline
    eager_ms = eager["latency_ms"] if eager else None
    candidates = []
    for candidate in search.candidates:
        entry = candidate.to_dict()
        ms = candidate.latency_ms
        entry["speedup_vs_original"] = (base.latency_ms / ms) if ms else None
        entry["speedup_vs_eager"] = (eager_ms / ms) if (ms and eager_ms) else None
        entry["file"] = _relative(candidate.artifact, search.ctx.workdir.parent)
        candidates.append(entry)
    winner_entry = next(c for c in candidates if c["id"] == winner.id)
    providers = (base.latency or {}).get("providers", [])
    report: dict[str, Any] = {
        "schema_version": 1,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "name": request.name,
        "request": request.to_dict(),
        "source": loaded.description,
        "family": base.artifact.family,
        "target": request.target,
        "providers": providers,
        "shapes": {
            "batch_size": request.batch_size,
            "seq_len": request.seq_len,
            "inputs": {name: list(array.shape) for name, array in timing.items()},
        },
        "fidelity_bound": request.fidelity_bound(),
        "calibration": {
            "source": calibration.get("source"),
            "synthetic": bool(calibration.get("synthetic")),
            "examples": calibration.get("examples"),
            "labels": calibration.get("labels") is not None,
        },
        "baseline": {
            "latency_ms": base.latency_ms,
            "onnx_fp32": base.latency,
            "pytorch_eager": eager,
        },
        "export": export_report,
        "candidates": candidates,
        "skipped_chains": skipped_chains,
        "search": {
            "slower_tolerance": search.settings.slower_tolerance,
            "note": (
                "a candidate is dropped as slower only when its median latency exceeds its "
                "parent's by more than slower_tolerance; latency.iqr_ms and latency_spread "
                "(IQR / median) show how noisy each measurement was"
            ),
        },
        "winner": {
            "id": winner.id,
            "passes": winner_entry["passes"],
            "label": winner_entry["label"],
            "latency_ms": winner.latency_ms,
            "fidelity": winner.fidelity,
            "size_bytes": winner.size_bytes,
            "speedup_vs_original": winner_entry["speedup_vs_original"],
            "speedup_vs_eager": winner_entry["speedup_vs_eager"],
        },
        "seconds": round(seconds, 2),
    }
    if calibration.get("synthetic"):
        report["fidelity_note"] = (
            f"fidelity was measured on synthetic data ({calibration.get('source')}), "
            "not on user-supplied calibration data"
        )
    if (base.latency or {}).get("note"):
        report["measurement_note"] = base.latency["note"]
    if LOAD_ERRORS:
        report["technique_package_errors"] = dict(LOAD_ERRORS)
    return report


__all__ = ["Cancelled", "optimize"]
