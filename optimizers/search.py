"""The candidate search: evaluate a tree of pass chains, measure each node, pick the winner.

Every node of the tree (a chain prefix) is a candidate: its passes run on its parent's
artifact, then it is measured (latency on the target at the requested shapes; fidelity to
the original on held-out data). A candidate is dropped, with the reason recorded, when a
pass fails or does not apply, changes nothing, is slower than its parent (median beyond
``SearchSettings.slower_tolerance``, 3% by default, to absorb measurement noise), or falls
outside the fidelity bound. The winner is the fastest kept candidate (the original is the fallback).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optimizers.chains import Step, chain_label
from optimizers.fidelity import compare, run_batches, within_bound
from optimizers.measure import MeasureSettings, onnx_latency
from optimizers.onnxutil import input_shapes, make_session
from optimizers.passes.base import Artifact, Cancelled, PassContext, PassNotApplicable
from optimizers.registry import get_pass

KEPT, DROPPED = "kept", "dropped"


@dataclass
class Candidate:
    """One measured (or dropped) chain prefix."""

    id: str
    steps: list[Step]
    parent: str | None
    artifact: Artifact | None = None
    status: str = DROPPED
    reason: str = ""
    latency: dict[str, Any] | None = None
    fidelity: dict[str, float] | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    pass_reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def latency_ms(self) -> float | None:
        return None if self.latency is None else self.latency["median_ms"]

    @property
    def latency_spread(self) -> float | None:
        """Interquartile range over the median of the timed runs (how noisy the number is)."""
        if not self.latency or not self.latency.get("median_ms") or "iqr_ms" not in self.latency:
            return None
        return self.latency["iqr_ms"] / self.latency["median_ms"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "passes": [name for name, _ in self.steps],
            "label": chain_label(self.steps),
            "pass_configs": [dict(overrides) for _, overrides in self.steps],
            "parent": self.parent,
            "latency_ms": self.latency_ms,
            "latency": self.latency,
            "latency_spread": self.latency_spread,
            "fidelity": self.fidelity,
            "size_bytes": self.size_bytes,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "pass_reports": self.pass_reports,
        }


@dataclass
class SearchSettings:
    """Knobs for one search: bound, measurement effort, slower-than-parent tolerance."""

    bound: dict[str, float]
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    slower_tolerance: float = 0.03
    """A candidate is dropped as slower only when its median latency exceeds its parent's by
    more than this fraction: on a noisy machine two equal graphs differ by a few percent, and a
    zero tolerance would drop a candidate as good as its parent. Each candidate's measured
    spread (``latency.iqr_ms``, ``latency_spread`` = IQR / median) is in the report."""
    pass_defaults: dict[str, Any] = field(default_factory=dict)
    """Values for pass config fields the chain does not set (e.g. ``target_cosine``)."""
    required: tuple[str, ...] = ()
    """Passes the winner must contain; a candidate whose last step is one of them is not
    dropped for timing slower than its parent (its benefit may not show on the timing batch)."""
    static_shape: bool = False
    """Time OpenVINO candidates on a compile for exactly the timing feeds' shapes (fidelity
    still comes from the dynamic-shape compile, which takes every evaluation batch)."""


def _spreads(candidate: Candidate, parent: Candidate) -> str:
    """`` (IQR x ms vs y ms)`` when both latencies carry their spread."""
    mine, theirs = (c.latency.get("iqr_ms") if c.latency else None for c in (candidate, parent))
    if mine is None or theirs is None:
        return ""
    return f" (IQR {mine:.3f} ms vs parent {theirs:.3f} ms)"


def _key(steps: list[Step]) -> str:
    return json.dumps([[n, o] for n, o in steps], sort_keys=True, default=str)


class Search:
    """Runs the candidate tree for one job; ``candidates`` is filled in evaluation order."""

    def __init__(
        self,
        baseline: Artifact,
        ctx: PassContext,
        settings: SearchSettings,
        timing_feeds: dict[str, np.ndarray],
        on_candidate: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.timing_feeds = timing_feeds
        self.on_candidate = on_candidate
        self.eval_batches = ctx.calibration.get("eval") or []
        self.eval_labels = ctx.calibration.get("eval_labels")
        self.reference = run_batches(make_session(baseline.onnx_path, "cpu"), self.eval_batches)
        self.candidates: list[Candidate] = []
        self._by_key: dict[str, Candidate] = {}
        self.baseline = Candidate("c0", [], None, artifact=baseline)
        self._measure(self.baseline)
        self.baseline.status, self.baseline.reason = KEPT, "original (baseline)"
        ok, why = within_bound(self.baseline.fidelity or {}, settings.bound)
        if not ok and "unmeasurable" in why:
            self.baseline.reason += f"; {why}"
        self._add(self.baseline, [])

    # -- tree --------------------------------------------------------------------------
    def run(self, chains: list[list[Step]]) -> None:
        """Evaluate every prefix of every chain once; stops cleanly when the budget runs out."""
        total = len({_key(chain[: i + 1]) for chain in chains for i in range(len(chain))})
        done = 0
        for chain in chains:
            for depth in range(1, len(chain) + 1):
                steps = chain[:depth]
                if _key(steps) in self._by_key:
                    continue
                done += 1
                if self.on_candidate is not None:
                    self.on_candidate(chain_label(steps), done, total)
                parent = self._by_key[_key(steps[:-1])]
                candidate = Candidate(f"c{len(self.candidates)}", steps, parent.id)
                self._add(candidate, steps)
                try:
                    self._evaluate(candidate, parent)
                except Cancelled as exc:
                    candidate.reason = f"skipped: {exc}"
                    if self.ctx.cancel_event is not None and self.ctx.cancel_event.is_set():
                        raise
                    self._skip_rest(chains, str(exc))
                    return

    def _add(self, candidate: Candidate, steps: list[Step]) -> None:
        self.candidates.append(candidate)
        self._by_key[_key(steps)] = candidate

    def _skip_rest(self, chains: list[list[Step]], why: str) -> None:
        for chain in chains:
            for depth in range(1, len(chain) + 1):
                steps = chain[:depth]
                if _key(steps) not in self._by_key:
                    parent = self._by_key.get(_key(steps[:-1]))
                    skipped = Candidate(
                        f"c{len(self.candidates)}", steps, parent.id if parent else None
                    )
                    skipped.reason = f"skipped: {why}"
                    self._add(skipped, steps)

    def _evaluate(self, candidate: Candidate, parent: Candidate) -> None:
        if parent.artifact is None:
            candidate.reason = f"parent {parent.id} ({chain_label(parent.steps)}) was dropped"
            return
        if (
            parent.fidelity is not None
            and not within_bound(parent.fidelity, self.settings.bound)[0]
        ):
            candidate.reason = f"parent {parent.id} is outside the fidelity bound"
            return
        name, overrides = candidate.steps[-1]
        start = time.perf_counter()
        try:
            config = self._config(name, overrides)
            pass_ = get_pass(name, **config)
            before = [n for n, _ in candidate.steps[:-1]]
            result = pass_.run(parent.artifact, self._pass_ctx(candidate), before)
        except Cancelled:
            raise
        except PassNotApplicable as exc:
            candidate.seconds = time.perf_counter() - start
            candidate.reason = f"not applicable: {exc}"
            return
        except Exception as exc:
            candidate.seconds = time.perf_counter() - start
            candidate.reason = f"failed: {exc}"
            return
        candidate.pass_reports.append(
            {
                "pass": name,
                "config": pass_.describe()["config"],
                "seconds": round(result.seconds, 3),
                "modified": result.modified,
                **result.report,
            }
        )
        if not result.modified:
            candidate.seconds = time.perf_counter() - start
            candidate.reason = f"{name} changed nothing"
            candidate.artifact = None
            return
        candidate.artifact = result.artifact
        try:
            self._measure(candidate)
        except Cancelled:
            raise
        except Exception as exc:
            candidate.seconds = time.perf_counter() - start
            candidate.reason = f"measurement failed: {type(exc).__name__}: {exc}"
            candidate.artifact = None
            return
        candidate.seconds = time.perf_counter() - start
        ok, why = within_bound(candidate.fidelity or {}, self.settings.bound)
        parent_ms = parent.latency_ms
        if not ok:
            candidate.reason = f"outside the fidelity bound: {why}"
        elif (
            parent_ms is not None
            and candidate.latency_ms is not None
            and candidate.latency_ms > parent_ms * (1.0 + self.settings.slower_tolerance)
            and name not in self.settings.required
        ):
            candidate.reason = (
                f"slower than its parent {parent.id}: median {candidate.latency_ms:.3f} ms "
                f"> {parent_ms:.3f} ms + {self.settings.slower_tolerance:.0%} tolerance"
                f"{_spreads(candidate, parent)}"
            )
        else:
            candidate.status, candidate.reason = KEPT, why
            ms = candidate.latency_ms
            if parent_ms is not None and ms is not None and ms >= parent_ms:
                candidate.reason += (
                    f"; not faster than its parent {parent.id} ({ms:.3f} vs {parent_ms:.3f} ms)"
                    f" but within the {self.settings.slower_tolerance:.0%} noise tolerance"
                    f"{_spreads(candidate, parent)}"
                )

    def _config(self, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        from dataclasses import fields

        from optimizers.registry import available_passes

        config = dict(overrides)
        known = {f.name for f in fields(available_passes()[name].Config)}
        for key, value in self.settings.pass_defaults.items():
            if key in known and key not in config and value is not None:
                config[key] = value
        return config

    def _pass_ctx(self, candidate: Candidate) -> PassContext:
        ctx = self.ctx
        return PassContext(
            workdir=ctx.workdir / candidate.id,
            target=ctx.target,
            calibration=ctx.calibration,
            batch_size=ctx.batch_size,
            seq_len=ctx.seq_len,
            deadline=ctx.deadline,
            cancel_event=ctx.cancel_event,
            progress=ctx.progress,
        )

    def _measure(self, candidate: Candidate) -> None:
        self.ctx.check_cancelled()
        artifact = candidate.artifact
        accelerator = artifact.meta.get("cpu_accelerator")  # e.g. openvino_int8's candidates
        session = make_session(artifact.onnx_path, self.ctx.target, accelerator=accelerator)
        timing_session = session
        if accelerator == "openvino" and self.settings.static_shape:
            timing_session = make_session(
                artifact.onnx_path,
                self.ctx.target,
                accelerator=accelerator,
                static_shape=input_shapes(artifact.onnx_path, self.timing_feeds),
            )
        candidate.latency = onnx_latency(
            artifact.onnx_path,
            self.timing_feeds,
            self.ctx.target,
            self.settings.measure,
            timing_session,
        )
        outputs = (
            self.reference
            if candidate is getattr(self, "baseline", None)
            else run_batches(session, self.eval_batches)
        )
        candidate.fidelity = compare(
            self.reference,
            outputs,
            self.eval_batches,
            family=artifact.family,
            labels=self.eval_labels,
        )
        candidate.size_bytes = artifact.size_bytes()

    # -- outcome -----------------------------------------------------------------------
    def winner(self) -> Candidate:
        """The fastest kept candidate (the original when nothing beat it); with required
        passes, the fastest kept candidate holding all of them (else the original)."""
        kept = [c for c in self.candidates if c.status == KEPT and c.latency_ms is not None]
        if self.settings.required:
            holding = [c for c in kept if self.holds_required(c)]
            kept = holding or [self.baseline]
        return min(kept, key=lambda c: c.latency_ms)

    def holds_required(self, candidate: Candidate) -> bool:
        """Whether every required pass is a step of ``candidate``."""
        names = {name for name, _ in candidate.steps}
        return all(name in names for name in self.settings.required)
