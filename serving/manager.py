"""Loaded models: load, unload, hot reload, poll, warm-up, and their states.

One ``ModelManager`` owns every loaded version. A version is an engine per instance (loaded
off the event loop), a ``DynamicBatcher`` over them and a ``ModelStatistics``. A model that
fails to load is kept with its reason (repository index, ready, metadata) and never stops
the others. Reloads are hot swaps: new versions become ready before old ones are dropped, and
an old version is closed only after the requests holding it have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.backends import Engine, TensorSpec, load_engine
from serving.batching import DynamicBatcher, MultiObserver
from serving.datatypes import numpy_dtype
from serving.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    RepositoryError,
    SlimServeError,
)
from serving.fileutil import confined, validate_model_name
from serving.model_config import ModelConfig, v2_of
from serving.ragged import RaggedSpec
from serving.repository import ModelRepository, ModelVersion
from serving.statistics import ModelStatistics

if TYPE_CHECKING:
    from serving.metrics import ServerMetrics
    from serving.settings import Settings
    from serving.shadow import ShadowMonitor

log = logging.getLogger(__name__)

# Triton answers load/unload outside EXPLICIT mode with UNAVAILABLE (HTTP 503) and "explicit
# model load / unload is not allowed if polling is enabled" (model_repository_manager.cc). A 503
# invites clients to retry something that can never succeed, so this server answers 403
# Forbidden with a message naming the mode and the fix; tritonclient raises either way.
NOT_ALLOWED = (
    "explicit model load / unload is not allowed in model control mode '{mode}'; "
    "start the server with --model-control-mode explicit"
)


class ModelState(StrEnum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"


@dataclass(eq=False)
class LoadedVersion:
    """One servable model version: engines, batcher, statistics, and who is using it."""

    name: str
    version: int
    config: ModelConfig
    model_file: Path
    engines: list[Engine]
    batcher: DynamicBatcher
    statistics: ModelStatistics
    signature: tuple[Any, ...]
    state: ModelState = ModelState.READY
    active: int = 0
    shadow: ShadowMonitor | None = None  # set while shadowed against its source version
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.engines[0].inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.engines[0].outputs

    @contextlib.contextmanager
    def use(self) -> Iterator[LoadedVersion]:
        """Hold the version while a request runs; an unload waits for every holder."""
        self.active += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request holds the version (at most ``timeout_s``)."""
        if self.active == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass
class VersionStatus:
    """What the index reports for one version; ``loaded`` is set when it serves."""

    state: ModelState
    reason: str = ""
    loaded: LoadedVersion | None = None


@dataclass
class ModelRecord:
    """A model the manager knows about: its versions, or why none could be loaded."""

    name: str
    versions: dict[int, VersionStatus] = field(default_factory=dict)
    error: str = ""
    config: ModelConfig | None = None
    signature: tuple[Any, ...] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def ready_versions(self) -> list[LoadedVersion]:
        return [
            s.loaded
            for _, s in sorted(self.versions.items())
            if s.loaded is not None and s.state is ModelState.READY
        ]


def _names(specs: list[Any]) -> list[str]:
    return [spec.name for spec in specs]


def instance_count(config: ModelConfig) -> int:
    """Engines to create: the sum of ``instance_group.count`` (at least 1)."""
    return max(1, sum(max(group.count, 1) for group in config.instance_group))


def _file_signature(path: Path) -> tuple[Any, ...]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_mtime_ns, st.st_size)


def folder_signature(model_dir: Path) -> tuple[Any, ...]:
    """A cheap fingerprint of a model folder: config.pbtxt and every version folder's files."""
    parts: list[Any] = [_file_signature(model_dir / "config.pbtxt")]
    try:
        children = sorted(os.scandir(model_dir), key=lambda e: e.name)
    except OSError:
        return ("missing",)
    for child in children:
        if child.is_dir() and child.name.isdigit():
            with os.scandir(child.path) as files:
                for item in sorted(files, key=lambda e: e.name):
                    if item.is_file():
                        st = item.stat()
                        parts.append((child.name, item.name, st.st_mtime_ns, st.st_size))
    return tuple(parts)


def warmup_requests(
    config: ModelConfig, specs: list[TensorSpec], model_dir: Path
) -> list[tuple[str, dict[str, np.ndarray], int]]:
    """(name, inputs, count) to run before a version is ready.

    ``model_warmup`` entries of the config (zero, random or file data, like Triton; files are
    read from ``<model>/warmup/``), or else one batch-1 zero-data request from the specs, with
    ``attention_mask`` inputs all ones: an all-padding sequence is no request a model serves,
    and graphs that remove padding (ORT's packing mode) have no tokens left to run on.
    """
    batched = config.max_batch_size > 0
    requests = []
    for warm in config.model_warmup:
        arrays = {}
        batch = max(warm.batch_size, 1)
        for input_name, spec in warm.inputs.items():
            datatype = v2_of(spec.data_type)
            dims = [int(d) for d in spec.dims]
            shape = ([batch] if batched else []) + dims
            kind = spec.WhichOneof("input_data_type")
            if kind == "input_data_file":
                path = confined(model_dir / "warmup", spec.input_data_file)
                if datatype == "BYTES":
                    raise RepositoryError("BYTES warm-up data from files is not supported")
                data = np.frombuffer(path.read_bytes(), dtype=numpy_dtype(datatype))
                arrays[input_name] = np.resize(data, shape)
            else:
                arrays[input_name] = _fill(datatype, shape, random=kind == "random_data")
        requests.append((warm.name or "warmup", arrays, max(warm.count, 1)))
    if requests:
        return requests
    default = {}
    for spec in specs:
        shape = [1 if d < 0 else d for d in spec.shape]
        default[spec.name] = _fill(spec.datatype, shape, random=False)
        if spec.name == "attention_mask" and spec.datatype != "BYTES":
            default[spec.name] += 1
    return [("default zero-data batch 1", default, 1)]


def _fill(datatype: str, shape: list[int], *, random: bool) -> np.ndarray:
    if datatype == "BYTES":
        return np.full(shape, b"", dtype=object)
    dtype = numpy_dtype(datatype)
    if not random:
        return np.zeros(shape, dtype=dtype)
    rng = np.random.default_rng(0)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 8, shape).astype(dtype)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    the server's RSS returns to where it was after a model is unloaded."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


class ModelManager:
    """Every model the server serves, keyed by name, with per-version state."""

    def __init__(
        self, repository: ModelRepository, metrics: ServerMetrics, settings: Settings
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.settings = settings
        self.mode = settings.model_control_mode
        self._records: dict[str, ModelRecord] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=settings.load_workers, thread_name_prefix="slimserve-load"
        )
        self._poll_task: asyncio.Task[None] | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._poll_lock = asyncio.Lock()
        self.ready = False
        self.closing = False
        from serving.shadow import Shadows

        self.shadows = Shadows(self)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Clean stale temp folders and start loading (in the background)."""
        removed = await self._run(self.repository.clean_stale_temp)
        for path in removed:
            log.warning("removed a half-published version folder %s", path)
        self._start_task = asyncio.create_task(self._initial_load(), name="slimserve-start")

    async def wait_started(self) -> None:
        """Wait for the initial load (tests and the CLI use it)."""
        if self._start_task is not None:
            await asyncio.shield(self._start_task)

    async def _initial_load(self) -> None:
        try:
            if self.mode == "explicit":
                names = list(self.settings.startup_models)
                if "*" in names:
                    names = await self._run(self.repository.model_names)
            else:
                names = await self._run(self.repository.model_names)
            await asyncio.gather(*(self._load_safely(name) for name in names))
        finally:
            self.ready = not self.closing
        if self.mode == "poll" and not self.closing:
            self._poll_task = asyncio.create_task(self._poll_loop(), name="slimserve-poll")

    async def _load_safely(self, name: str) -> None:
        try:
            await self._load_model(name)
        except SlimServeError as exc:
            log.error("model '%s' did not load: %s", name, exc)
        except Exception:
            log.exception("model '%s' did not load", name)

    async def _poll_loop(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")

    async def close(self, drain_timeout_s: float | None = None) -> None:
        """Stop polling, finish queued and running requests (bounded), release every engine."""
        self.closing = True
        self.ready = False
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        for task in (self._poll_task, self._start_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.shadows.stop_all()
        versions = [
            status.loaded
            for record in self._records.values()
            for status in record.versions.values()
            if status.loaded is not None
        ]
        await asyncio.gather(*(self._drop(v, timeout) for v in versions))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- client API --------------------------------------------------------------------
    def _check_control_allowed(self) -> None:
        if self.mode != "explicit":
            raise Forbidden(NOT_ALLOWED.format(mode=self.mode))

    async def load(
        self,
        name: str,
        *,
        config: ModelConfig | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        """Load (or hot-reload) ``name``, optionally overriding its config and adding versions.

        ``files`` maps ``<version>/<path>`` (Triton's ``file:`` parameters without the prefix)
        to contents; each version lands in a new version folder, atomically. Raises with the
        reason when no version of the model becomes ready.
        """
        self._check_control_allowed()
        validate_model_name(name)
        if config is not None and config.name and config.name != name:
            raise InvalidInput(
                f"the config parameter names model '{config.name}' but the request loads '{name}'"
            )
        published: list[int] = []
        if files:
            published = await self._publish_files(name, files, config)
        elif config is not None:
            await self._run(self.repository.write_model_config, name, config)
        elif not self.repository.model_dir(name).is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository")
        record = await self._load_model(name)
        failure = self._load_failure(record)
        if failure:
            if published:  # refuse the upload: take its version folders back out
                model_dir = self.repository.model_dir(name)
                for number in published:
                    await self._run(shutil.rmtree, confined(model_dir, str(number)), True)
                await self._load_model(name)
            raise RepositoryError(f"failed to load '{name}': {failure}")

    @staticmethod
    def _load_failure(record: ModelRecord) -> str:
        """Why the last load of ``record`` failed ("" when every version is ready)."""
        if record.error:
            return record.error
        reasons = [
            f"version {n}: {s.reason}"
            for n, s in sorted(record.versions.items())
            if s.state is ModelState.UNAVAILABLE or (s.reason and s.loaded is not None)
        ]
        if reasons:
            return "; ".join(reasons)
        return "" if record.ready_versions() else "no version became ready"

    async def _publish_files(
        self, name: str, files: dict[str, bytes], config: ModelConfig | None
    ) -> list[int]:
        by_version: dict[int, dict[str, bytes]] = {}
        for key, content in files.items():
            head, _, relative = key.partition("/")
            if not head.isdigit() or head.startswith("0") or not relative:
                raise InvalidInput(
                    f"file parameter 'file:{key}' must be 'file:<version>/<path>' with a "
                    "positive version number, e.g. 'file:1/model.onnx'"
                )
            parts = relative.split("/")
            if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
                raise InvalidInput(
                    f"file parameter 'file:{key}': the path escapes the version folder; "
                    "use plain relative names like 'file:1/model.onnx'"
                )
            by_version.setdefault(int(head), {})[relative] = content
        model_dir = self.repository.model_dir(name)
        existing = set(self.repository.version_numbers(name)) if model_dir.is_dir() else set()
        taken = sorted(existing & set(by_version))
        if taken:
            nxt = self.repository.next_version(name)
            raise Conflict(
                f"model '{name}' already has version(s) {taken}; versions are immutable, "
                f"upload the new files as 'file:{nxt}/...'"
            )
        for number, version_files in sorted(by_version.items()):
            await self._run(
                lambda n=number, f=version_files: self.repository.publish_version(
                    name, f, version=n, config=config
                )
            )
        return sorted(by_version)

    async def unload(self, name: str) -> None:
        """Unload every version of ``name`` (requests already running finish first)."""
        self._check_control_allowed()
        validate_model_name(name)
        record = self._records.get(name)
        if record is None:
            if self.repository.model_dir(name).is_dir():
                return  # not loaded: nothing to do, as in Triton
            raise ModelNotFound(f"model '{name}' is not in the repository")
        await self._unload_record(record, reason="unloaded")

    async def reload(self, name: str) -> None:
        """Hot swap: rescan ``name`` and load what changed before dropping what is gone."""
        record = await self._load_model(name)
        failure = self._load_failure(record)
        if failure:
            raise RepositoryError(f"failed to reload '{name}': {failure}")

    async def poll_once(self) -> None:
        """Rescan the repository: load new or changed models, unload removed ones."""
        async with self._poll_lock:
            names = set(await self._run(self.repository.model_names))
            for name in sorted(names):
                record = self._records.get(name)
                signature = await self._run(folder_signature, self.repository.root / name)
                if record is None or record.signature != signature:
                    await self._load_safely(name)
            for name in sorted(set(self._records) - names):
                await self._unload_record(self._records[name], reason="removed from repository")
                self._records.pop(name, None)

    # -- lookups -----------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> LoadedVersion:
        """The version serving ``name`` (the newest ready one when ``version`` is None)."""
        record = self._records.get(name)
        if record is not None:
            if version is None:
                ready = record.ready_versions()
                if ready:
                    return self.shadows.route(ready[-1])
            else:
                status = record.versions.get(version)
                if status is not None and status.loaded is not None:
                    if status.state is ModelState.READY:
                        return status.loaded
                    raise ModelNotReady(
                        f"model '{name}' version {version} is {status.state.value.lower()}"
                    )
                if status is None and record.versions:
                    raise ModelNotFound(
                        f"model '{name}' has no version {version} "
                        f"(versions: {sorted(record.versions)})"
                    )
            raise ModelNotReady(f"model '{name}' is not ready: {self._reason(record, version)}")
        validate_model_name(name)
        if self.repository.model_dir(name).is_dir():
            hint = (
                f"; load it with POST /v2/repository/models/{name}/load"
                if self.mode == "explicit"
                else ""
            )
            raise ModelNotReady(f"model '{name}' is in the repository but not loaded{hint}")
        raise ModelNotFound(f"model '{name}' is not in the repository")

    def record(self, name: str) -> ModelRecord | None:
        return self._records.get(name)

    def loaded_versions(self) -> list[LoadedVersion]:
        """Every ready version of every model, by name then version."""
        return [v for n in sorted(self._records) for v in self._records[n].ready_versions()]

    def is_ready(self, name: str, version: int | None = None) -> tuple[bool, str]:
        """(ready, reason when not) for the model-ready endpoint."""
        try:
            self.get(name, version)
        except (ModelNotReady, ModelNotFound) as exc:
            return False, str(exc)
        return True, ""

    def index(self, *, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: one row per version (name, version, state, reason)."""
        rows: list[dict[str, str]] = []
        names = set(self._records)
        with contextlib.suppress(OSError):
            names |= set(self.repository.model_names())
        for name in sorted(names):
            record = self._records.get(name)
            if record is None or (not record.versions):
                reason = record.error if record is not None and record.error else "not loaded"
                if record is not None and not record.error:
                    reason = "unloaded"
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason})
                continue
            for number, status in sorted(record.versions.items()):
                rows.append(
                    {
                        "name": name,
                        "version": str(number),
                        "state": status.state.value,
                        "reason": status.reason,
                    }
                )
        if ready_only:
            rows = [r for r in rows if r["state"] == "READY"]
        return rows

    def config_of(self, name: str) -> ModelConfig:
        """The config a model serves with (or was last read with, when it failed to load)."""
        record = self._records.get(name)
        if record is not None and record.config is not None:
            return record.config
        self.get(name)  # raises the right 404 / 503
        raise ModelNotReady(f"model '{name}' has no config")  # pragma: no cover

    @staticmethod
    def _reason(record: ModelRecord, version: int | None = None) -> str:
        if record.error:
            return record.error
        statuses = (
            [record.versions[version]]
            if version is not None and version in record.versions
            else list(record.versions.values())
        )
        reasons = [s.reason for s in statuses if s.reason]
        if reasons:
            return "; ".join(reasons)
        if not record.versions:
            return "unloaded"
        return ", ".join(s.state.value.lower() for s in statuses)

    # -- loading -----------------------------------------------------------------------
    async def _load_model(self, name: str) -> ModelRecord:
        """(Re)load ``name`` from the repository; never raises for a broken model."""
        if self.closing:
            raise ModelNotReady("the server is shutting down")
        record = self._records.setdefault(name, ModelRecord(name))
        async with record.lock:
            signature = await self._run(folder_signature, self.repository.root / name)
            try:
                entry = await self._run(self.repository.entry, name)
            except ModelNotFound:
                if not record.versions:
                    self._records.pop(name, None)
                raise
            except InvalidInput as exc:  # a folder name that is not a valid model name
                record.error, record.signature = str(exc), signature
                return record
            record.signature = signature
            if not entry.ok:
                record.error = entry.error or "unknown error"
                log.error("model '%s' is broken: %s", name, record.error)
                # keep serving what already runs (a broken edit must not take a model down)
                for status in record.versions.values():
                    if status.loaded is None:
                        status.state, status.reason = ModelState.UNAVAILABLE, record.error
                return record
            config = entry.config
            assert config is not None
            config_changed = (
                record.config is None
                or record.config.SerializeToString() != config.SerializeToString()
            )
            record.error = ""
            record.config = config
            wanted = {v.version: v for v in entry.versions}
            old: list[LoadedVersion] = []
            tasks = []
            for number, mv in wanted.items():
                status = record.versions.get(number)
                fresh = (
                    status is not None
                    and status.loaded is not None
                    and (
                        not config_changed
                        and status.loaded.signature == _file_signature(mv.model_file)
                    )
                )
                if fresh:
                    continue
                if status is None:
                    record.versions[number] = VersionStatus(ModelState.LOADING)
                elif status.loaded is None:
                    status.state, status.reason = ModelState.LOADING, ""
                tasks.append(self._load_version(record, mv, config))
            results = await asyncio.gather(*tasks)
            for loaded in results:
                if loaded is None:
                    continue
                status = record.versions[loaded.version]
                if status.loaded is not None:
                    old.append(status.loaded)
                status.loaded, status.state, status.reason = loaded, ModelState.READY, ""
            for number in [n for n in record.versions if n not in wanted]:
                status = record.versions.pop(number)
                if status.loaded is not None:
                    old.append(status.loaded)
        # new versions serve now; drop the replaced ones after their requests finish
        await asyncio.gather(*(self._drop(v, self.settings.drain_timeout_s) for v in old))
        try:
            await self.shadows.refresh(record)
        except Exception:
            log.exception("shadow set-up of '%s' failed", name)
        return record

    async def _load_version(
        self, record: ModelRecord, mv: ModelVersion, config: ModelConfig
    ) -> LoadedVersion | None:
        name = record.name
        started = time.perf_counter()
        try:
            engines = await self._run(self._build_engines, mv, config)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, SlimServeError) else f"{type(exc).__name__}: {exc}"
            status = record.versions[mv.version]
            if status.loaded is None:
                status.state = ModelState.UNAVAILABLE
            status.reason = reason
            log.error("model '%s' version %d failed to load: %s", name, mv.version, reason)
            return None
        statistics = ModelStatistics()
        batcher = DynamicBatcher(
            engines,
            config,
            observer=MultiObserver([self.metrics.observer(name, str(mv.version)), statistics]),
            name=f"{name}:{mv.version}",
            isolate_failures=True,  # one bad request does not fail its batch neighbours
        )
        loaded = LoadedVersion(
            name=name,
            version=mv.version,
            config=config,
            model_file=mv.model_file,
            engines=engines,
            batcher=batcher,
            statistics=statistics,
            signature=_file_signature(mv.model_file),
        )
        self.metrics.track_pending(name, str(mv.version), lambda: batcher.queue_depth)
        log.info(
            "model '%s' version %d ready (%d instance(s), %.2fs)",
            name,
            mv.version,
            len(engines),
            time.perf_counter() - started,
        )
        return loaded

    def _build_engines(self, mv: ModelVersion, config: ModelConfig) -> list[Engine]:
        """Load one engine per instance and warm each up (runs in a worker thread)."""
        engines: list[Engine] = []
        try:
            for index in range(instance_count(config)):
                engines.append(load_engine(mv.model_file, config, instance_index=index))
            # a bad variable-length config fails the load here, naming the parameter
            RaggedSpec.from_config(config, _names(engines[0].inputs), _names(engines[0].outputs))
            requests = warmup_requests(config, engines[0].inputs, mv.path.parent)
            for engine in engines:
                for label, arrays, count in requests:
                    for _ in range(count):
                        try:
                            engine.infer(arrays)
                        except Exception as exc:
                            raise RepositoryError(f"warm-up '{label}' failed: {exc}") from None
        except BaseException:
            for engine in engines:
                with contextlib.suppress(Exception):
                    engine.close()
            raise
        return engines

    # -- unloading ---------------------------------------------------------------------
    async def _unload_record(self, record: ModelRecord, *, reason: str) -> None:
        await self.shadows.stop(record.name)
        async with record.lock:
            dropping = []
            for status in record.versions.values():
                if status.loaded is not None:
                    status.state = ModelState.UNLOADING
                    dropping.append(status.loaded)
            await asyncio.gather(*(self._drop(v, self.settings.drain_timeout_s) for v in dropping))
            record.versions.clear()
            record.error = ""
            record.signature = None
        await self._run(release_memory)
        log.info("model '%s' %s", record.name, reason)

    async def _drop(self, loaded: LoadedVersion, timeout_s: float) -> None:
        """Wait for the version's requests (bounded), close its batcher, release engines."""
        loaded.state = ModelState.UNLOADING
        if not await loaded.wait_idle(timeout_s):
            log.warning(
                "model '%s' version %d: %d request(s) still running after %.1fs",
                loaded.name,
                loaded.version,
                loaded.active,
                timeout_s,
            )
        try:
            await loaded.batcher.close(timeout_s)
        except Exception:
            log.exception("closing the batcher of '%s' version %d", loaded.name, loaded.version)
        for engine in loaded.engines:
            with contextlib.suppress(Exception):
                engine.close()
        # only forget metrics when no other loaded object serves the same version
        record = self._records.get(loaded.name)
        status = record.versions.get(loaded.version) if record else None
        if status is None or status.loaded is None or status.loaded is loaded:
            self.metrics.forget(loaded.name, str(loaded.version))
