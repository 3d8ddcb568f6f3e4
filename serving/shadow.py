"""Shadow fidelity: compare a compressed version with its source version on live traffic.

A sampled request is answered by the version it was sent to as usual; afterwards a copy of
its inputs and outputs goes to a bounded queue (dropped, and counted, when full). One worker
task per shadowed version runs the inputs on the source version's batcher at its lowest
priority and compares the two outputs (cosine, max absolute error, top-1 agreement). A
rolling mean of the cosine below the fidelity bound raises an alert and, when configured,
sends unversioned traffic to the source version.

Configured per model with ``config.pbtxt`` parameters (string values, as Triton wants):

- ``shadow_sample_rate``: fraction of requests to shadow, 0 (off, default) to 1.
- ``shadow_source_version``: the version to compare with (default: ``source_version`` of the
  version's ``report.json``, written by the optimization jobs).
- ``shadow_min_cosine``: alert bound (default: ``fidelity_bound.min_cosine`` of the report,
  else 0.99).
- ``shadow_fallback``: ``true`` to serve unversioned requests from the source version while
  alerting (default ``false``).
- ``shadow_window`` (100), ``shadow_min_samples`` (10), ``shadow_queue_size`` (16).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.errors import InvalidInput

if TYPE_CHECKING:
    from serving.manager import LoadedVersion
    from serving.model_config import ModelConfig

log = logging.getLogger(__name__)

SHADOW_LABELS = ("model", "version", "source_version")
COSINE_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
ERROR_BUCKETS = (
    1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0,
)  # fmt: skip
DEFAULT_MIN_COSINE = 0.99
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ShadowSettings:
    """One model version's shadow configuration (validated)."""

    sample_rate: float
    source_version: int
    min_cosine: float = DEFAULT_MIN_COSINE
    fallback: bool = False
    window: int = 100
    min_samples: int = 10
    queue_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise InvalidInput(f"shadow_sample_rate must be in [0, 1], got {self.sample_rate}")
        if self.source_version < 1:
            raise InvalidInput(
                f"shadow_source_version must be a version number >= 1, got {self.source_version}"
            )
        if not -1.0 <= self.min_cosine <= 1.0:
            raise InvalidInput(f"shadow_min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.window < 1 or self.queue_size < 1:
            raise InvalidInput("shadow_window and shadow_queue_size must be at least 1")
        if not 1 <= self.min_samples <= self.window:
            raise InvalidInput(
                f"shadow_min_samples must be in [1, shadow_window={self.window}], "
                f"got {self.min_samples}"
            )


def _parameters(config: ModelConfig) -> dict[str, str]:
    return {key: value.string_value.strip() for key, value in config.parameters.items()}


def read_report(version_dir: Path) -> dict[str, Any]:
    """The version's ``report.json`` ({} when absent or unreadable)."""
    path = version_dir / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def shadow_settings(
    config: ModelConfig, report: Mapping[str, Any] | None = None
) -> ShadowSettings | None:
    """The shadow settings of a version from its config and ``report.json`` (None: off).

    Raises ``InvalidInput`` naming the parameter when a value is malformed.
    """
    params = _parameters(config)
    report = report or {}

    def number(key: str, kind: Callable[[str], Any], default: Any) -> Any:
        text = params.get(key, "")
        if text == "":
            return default
        try:
            return kind(text)
        except ValueError:
            raise InvalidInput(f"parameter {key}: expected a number, got {text!r}") from None

    rate = number("shadow_sample_rate", float, 0.0)
    if rate == 0.0:
        return None
    source = number("shadow_source_version", int, None)
    if source is None:
        source = report.get("source_version")
        if not isinstance(source, int):
            return None  # nothing to compare with: not a compressed version
    bound = (report.get("fidelity_bound") or {}).get("min_cosine")
    default_cosine = float(bound) if isinstance(bound, int | float) else DEFAULT_MIN_COSINE
    fallback = params.get("shadow_fallback", "").lower()
    if fallback not in _TRUE | _FALSE:
        raise InvalidInput(f"parameter shadow_fallback: expected true or false, got {fallback!r}")
    return ShadowSettings(
        sample_rate=rate,
        source_version=source,
        min_cosine=number("shadow_min_cosine", float, default_cosine),
        fallback=fallback in _TRUE,
        window=number("shadow_window", int, 100),
        min_samples=number("shadow_min_samples", int, 10),
        queue_size=number("shadow_queue_size", int, 16),
    )


# ---------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Agreement:
    """How well two output sets agree (worst output wins)."""

    cosine: float
    max_abs_error: float
    top1: float | None  # fraction of rows with the same argmax; None: not classifier-shaped


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64, copy=False).ravel()
    b = b.astype(np.float64, copy=False).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def compare(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, batched: bool
) -> Agreement:
    """Agreement of ``outputs`` with ``reference`` over the numeric outputs both have.

    Cosine is the minimum over outputs (each flattened), max absolute error the maximum;
    top-1 agreement is computed for 2-D batched outputs (``[batch, classes]``, classes > 1).
    """
    cosines, errors, top1 = [], [], []
    for name in sorted(set(outputs) & set(reference)):
        a, b = np.asarray(outputs[name]), np.asarray(reference[name])
        if a.dtype.kind not in "fiub" or a.shape != b.shape:
            continue
        cosines.append(_cosine(a, b))
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        errors.append(float(diff.max()) if diff.size else 0.0)
        if batched and a.ndim == 2 and a.shape[1] > 1 and a.dtype.kind == "f":
            top1.append(float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))))
    if not cosines:
        raise InvalidInput("no numeric output of the same shape to compare")
    return Agreement(min(cosines), max(errors), min(top1) if top1 else None)


# ------------------------------------------------------------------------------- metrics


class ShadowMetrics:
    """The shadow collectors on one registry (created once per registry)."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, ShadowMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        def hist(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, text, SHADOW_LABELS, registry=registry, buckets=buckets)

        def counter(name: str, text: str) -> Counter:
            return Counter(name, text, SHADOW_LABELS, registry=registry)

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, SHADOW_LABELS, registry=registry)

        self.cosine = hist(
            "slimserve_shadow_cosine", "Cosine of a shadowed sample's outputs", COSINE_BUCKETS
        )
        self.max_abs_error = hist(
            "slimserve_shadow_max_abs_error",
            "Max absolute error of a shadowed sample's outputs",
            ERROR_BUCKETS,
        )
        self.samples = counter("slimserve_shadow_samples", "Samples compared with the source")
        self.top1_samples = counter(
            "slimserve_shadow_top1_samples", "Samples with classifier-shaped outputs"
        )
        self.top1_agreement = counter(
            "slimserve_shadow_top1_agreement",
            "Classifier-shaped samples whose top-1 agreed in every row",
        )
        self.alerts = counter(
            "slimserve_shadow_alerts", "Times the rolling cosine fell below the fidelity bound"
        )
        self.dropped = counter(
            "slimserve_shadow_dropped", "Sampled requests dropped (shadow queue full or error)"
        )
        self.rolling_cosine = gauge(
            "slimserve_shadow_rolling_cosine", "Mean cosine over the rolling window"
        )
        self.alerting = gauge("slimserve_shadow_alerting", "1 while the rolling cosine is low")
        self.fallback = gauge(
            "slimserve_shadow_fallback_active", "1 while traffic falls back to the source"
        )
        self.source_bytes = gauge(
            "slimserve_shadow_source_model_bytes",
            "Model file bytes of a source version loaded only for shadowing (0 when it serves)",
        )
        self._all = (
            self.cosine, self.max_abs_error, self.samples, self.top1_samples,
            self.top1_agreement, self.alerts, self.dropped, self.rolling_cosine,
            self.alerting, self.fallback, self.source_bytes,
        )  # fmt: skip

    @classmethod
    def of(cls, registry: CollectorRegistry) -> ShadowMetrics:
        """The registry's shadow metrics (registered on first use)."""
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics

    def forget(self, labels: tuple[str, str, str]) -> None:
        """Drop one shadowed version's label set."""
        for metric in self._all:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)


# ------------------------------------------------------------------------------- monitor


class ShadowMonitor:
    """Shadows one served version against its source version (one worker task)."""

    def __init__(
        self,
        loaded: LoadedVersion,
        source: LoadedVersion,
        settings: ShadowSettings,
        metrics: ShadowMetrics,
        *,
        owns_source: bool,
        rng: random.Random | None = None,
    ) -> None:
        self.loaded = loaded
        self.source = source
        self.settings = settings
        self.owns_source = owns_source
        self._metrics = metrics
        self.labels = (loaded.name, str(loaded.version), str(source.version))
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]]
        self._queue = asyncio.Queue(settings.queue_size)
        self._cosines: deque[float] = deque(maxlen=settings.window)
        self._errors: deque[float] = deque(maxlen=settings.window)
        self._top1: deque[float] = deque(maxlen=settings.window)
        self.samples = 0
        self.dropped = 0
        self.alerts = 0
        self.alerting = False
        self.fallback_active = False
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        source_bytes = source.model_file.stat().st_size if owns_source else 0
        metrics.source_bytes.labels(*self.labels).set(source_bytes)
        for metric in (
            metrics.samples, metrics.dropped, metrics.alerts, metrics.top1_samples,
            metrics.top1_agreement, metrics.alerting, metrics.fallback,
        ):  # fmt: skip
            metric.labels(*self.labels)  # export zeros from the start

    # -- request path (event loop, never awaits) --------------------------------------
    def offer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        output_names: list[str] | None = None,
    ) -> None:
        """Maybe shadow one answered request: sample, enqueue or drop. Never blocks."""
        if self._rng.random() >= self.settings.sample_rate:
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._work(), name=f"shadow-{self.labels[0]}:{self.labels[1]}"
            )
        try:
            self._queue.put_nowait((inputs, outputs, output_names))
        except asyncio.QueueFull:
            self._drop()

    def _drop(self) -> None:
        self.dropped += 1
        self._metrics.dropped.labels(*self.labels).inc()

    # -- worker ----------------------------------------------------------------------
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        batcher = self.source.batcher
        lowest = batcher.priority_levels if batcher.priority_levels > 0 else 0
        batched = self.source.config.max_batch_size > 0
        while True:
            inputs, outputs, names = await self._queue.get()
            try:
                with self.source.use():
                    reference, _ = await batcher.submit(inputs, output_names=names, priority=lowest)
                agreement = await loop.run_in_executor(
                    None, lambda o=outputs, r=reference: compare(o, r, batched=batched)
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the source refused or failed: count, keep going
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._drop()
                continue
            self.record(agreement)

    def record(self, agreement: Agreement) -> None:
        """Account one compared sample; raise or clear the alert."""
        m, labels = self._metrics, self.labels
        self.samples += 1
        self._cosines.append(agreement.cosine)
        self._errors.append(agreement.max_abs_error)
        m.samples.labels(*labels).inc()
        m.cosine.labels(*labels).observe(agreement.cosine)
        m.max_abs_error.labels(*labels).observe(agreement.max_abs_error)
        if agreement.top1 is not None:
            self._top1.append(agreement.top1)
            m.top1_samples.labels(*labels).inc()
            if agreement.top1 == 1.0:
                m.top1_agreement.labels(*labels).inc()
        rolling = self.rolling_cosine
        m.rolling_cosine.labels(*labels).set(rolling)
        if len(self._cosines) < self.settings.min_samples:
            return
        low = rolling < self.settings.min_cosine
        if low and not self.alerting:
            self.alerts += 1
            m.alerts.labels(*labels).inc()
            log.warning(
                "shadow: model '%s' version %s agrees with version %s at rolling cosine %.4f "
                "< %.4f%s",
                *labels,
                rolling,
                self.settings.min_cosine,
                "; falling back to the source version" if self.settings.fallback else "",
            )
            if self.settings.fallback:
                self.fallback_active = True
                m.fallback.labels(*labels).set(1)
        self.alerting = low
        m.alerting.labels(*labels).set(1 if low else 0)

    @property
    def rolling_cosine(self) -> float:
        return float(np.mean(self._cosines)) if self._cosines else float("nan")

    def summary(self) -> dict[str, Any]:
        """The rolling summary for the stats and ready endpoints."""

        def mean(values: deque[float]) -> float | None:
            return round(float(np.mean(values)), 6) if values else None

        return {
            "source_version": str(self.source.version),
            "sample_rate": self.settings.sample_rate,
            "min_cosine": self.settings.min_cosine,
            "window": len(self._cosines),
            "samples": self.samples,
            "dropped": self.dropped,
            "queued": self._queue.qsize(),
            "rolling_cosine": mean(self._cosines),
            "min_cosine_seen": round(min(self._cosines), 6) if self._cosines else None,
            "rolling_max_abs_error": mean(self._errors),
            "rolling_top1_agreement": mean(self._top1),
            "alerting": self.alerting,
            "alerts": self.alerts,
            "fallback": self.settings.fallback,
            "fallback_active": self.fallback_active,
            "last_error": self.last_error,
        }

    async def stop(self) -> None:
        """Stop the worker (queued samples are dropped) and forget the metrics."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._metrics.forget(self.labels)


# ---------------------------------------------------------------------------- controller


class Shadows:
    """Every shadow monitor of a ``ModelManager``: set up after each (re)load, stopped on
    unload; loads a source version that is not served for as long as shadowing needs it."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self._monitors: dict[str, list[ShadowMonitor]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.metrics = ShadowMetrics.of(manager.metrics.registry)

    def monitors(self, name: str) -> list[ShadowMonitor]:
        return list(self._monitors.get(name, ()))

    @staticmethod
    def route(loaded: LoadedVersion) -> LoadedVersion:
        """The version to serve an unversioned request: the source while falling back."""
        monitor = loaded.shadow
        if monitor is not None and monitor.fallback_active:
            from serving.manager import ModelState

            if monitor.source.state is ModelState.READY:
                return monitor.source
        return loaded

    async def refresh(self, record: Any) -> None:
        """Rebuild the monitors of ``record`` (a ``ModelRecord``) from its config."""
        async with self._locks.setdefault(record.name, asyncio.Lock()):
            await self._refresh(record)

    async def _refresh(self, record: Any) -> None:
        await self._stop(record.name)
        config = record.config
        if config is None:
            return
        sources: dict[int, tuple[LoadedVersion, bool]] = {}
        for loaded in record.ready_versions():
            try:
                settings = shadow_settings(config, read_report(loaded.model_file.parent))
            except InvalidInput as exc:
                log.error("shadow: model '%s' version %d: %s", record.name, loaded.version, exc)
                continue
            if settings is None:
                continue
            number = settings.source_version
            if number not in sources:
                try:
                    sources[number] = await self._source(record, number)
                except Exception as exc:
                    log.error(
                        "shadow: model '%s' version %d: source version %d unavailable: %s",
                        record.name, loaded.version, number, exc,
                    )  # fmt: skip
                    continue
            source, owned = sources[number]
            monitor = ShadowMonitor(loaded, source, settings, self.metrics, owns_source=owned)
            loaded.shadow = monitor
            self._monitors.setdefault(record.name, []).append(monitor)
            log.info(
                "shadow: model '%s' version %d compared with version %d at rate %g "
                "(min cosine %g, fallback %s)",
                record.name, loaded.version, number, settings.sample_rate,
                settings.min_cosine, settings.fallback,
            )  # fmt: skip
        for source, owned in sources.values():
            if owned and not any(m.source is source for m in self.monitors(record.name)):
                await self._close_source(source)

    async def _source(self, record: Any, number: int) -> tuple[LoadedVersion, bool]:
        """(source version, loaded only for shadowing?)."""
        from serving.batching import DynamicBatcher
        from serving.manager import LoadedVersion, ModelState
        from serving.repository import ModelVersion, model_filename
        from serving.statistics import ModelStatistics

        status = record.versions.get(number)
        if status is not None and status.loaded is not None and status.state is ModelState.READY:
            return status.loaded, False
        manager = self._manager
        config = record.config
        folder = manager.repository.model_dir(record.name) / str(number)
        model_file = folder / model_filename(config)
        if not model_file.is_file():
            raise InvalidInput(f"no file {model_file.name} in version folder {number}")
        mv = ModelVersion(number, folder, model_file)
        engines = await manager._run(manager._build_engines, mv, config)
        batcher = DynamicBatcher(engines, config, name=f"{record.name}:{number} (shadow source)")
        source = LoadedVersion(
            name=record.name,
            version=number,
            config=config,
            model_file=model_file,
            engines=engines,
            batcher=batcher,
            statistics=ModelStatistics(),
            signature=(),
        )
        log.info("shadow: loaded model '%s' version %d as a shadow source", record.name, number)
        return source, True

    async def _close_source(self, source: LoadedVersion) -> None:
        timeout = self._manager.settings.drain_timeout_s
        await source.wait_idle(timeout)
        with contextlib.suppress(Exception):
            await source.batcher.close(timeout)
        for engine in source.engines:
            with contextlib.suppress(Exception):
                engine.close()
        log.info("shadow: released model '%s' version %d", source.name, source.version)

    async def stop(self, name: str) -> None:
        """Stop shadowing ``name``; release source versions loaded only for it."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            await self._stop(name)

    async def _stop(self, name: str) -> None:
        monitors = self._monitors.pop(name, [])
        owned = {id(m.source): m.source for m in monitors if m.owns_source}
        for monitor in monitors:
            await monitor.stop()
            if monitor.loaded.shadow is monitor:
                monitor.loaded.shadow = None
        for source in owned.values():
            await self._close_source(source)

    async def stop_all(self) -> None:
        for name in list(self._monitors):
            await self.stop(name)
