"""The pass infrastructure: a pass is ``requires -> call -> ensures`` over an ``Artifact``.

Modelled on onnx-ir's pass infra and torch.fx's PassManager: every pass has a typed, frozen
config, returns a ``PassResult`` (new artifact, whether it changed anything, a report), and a
failure is wrapped in a ``PassError`` naming the pass and the passes before it.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

ArtifactKind = Literal["torch", "onnx"]
ModelFamily = Literal["transformer", "cnn", "generic"]
Target = Literal["cpu", "cuda", "tensorrt"]


@dataclass
class Artifact:
    """A model at some stage of the pipeline.

    ``kind == "onnx"``: ``onnx_path`` is an ONNX file on disk (external data beside it).
    ``kind == "torch"``: ``torch_model`` is an ``nn.Module`` in eval mode (exported later).
    ``meta`` carries facts later passes need (input names, tokenizer folder, hidden size,
    number of heads, opset ...); passes copy it forward and add to it.
    """

    kind: ArtifactKind
    family: ModelFamily
    onnx_path: Path | None = None
    torch_model: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def with_onnx(self, path: Path, **meta: Any) -> Artifact:
        """A new ONNX artifact of the same family, meta carried over and updated."""
        return Artifact("onnx", self.family, onnx_path=path, meta={**self.meta, **meta})

    def size_bytes(self) -> int | None:
        """Bytes on disk of the ONNX file and its external data (None for torch)."""
        if self.onnx_path is None:
            return None
        folder = self.onnx_path.parent
        stem_files = [self.onnx_path, *folder.glob(self.onnx_path.name + ".data")]
        return sum(p.stat().st_size for p in stem_files if p.exists())


class Cancelled(Exception):
    """The job was cancelled or ran out of its time budget."""


@dataclass
class PassContext:
    """What every pass may use: a scratch folder, calibration data, the target, progress."""

    workdir: Path
    target: Target = "cpu"
    calibration: dict[str, Any] = field(default_factory=dict)
    """Calibration data: ``{"inputs": list[dict[str, np.ndarray]], "texts": list[str] | None,
    "labels": np.ndarray | None, "synthetic": bool}``."""
    batch_size: int = 1
    seq_len: int = 128
    deadline: float | None = None
    cancel_event: threading.Event | None = None
    progress: Callable[[str, float | None], None] | None = None

    def check_cancelled(self) -> None:
        """Raise ``Cancelled`` when the job was cancelled or its time budget is spent."""
        if self.cancel_event is not None and self.cancel_event.is_set():
            raise Cancelled("cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Cancelled("time budget exhausted")

    def report_progress(self, message: str, fraction: float | None = None) -> None:
        if self.progress is not None:
            self.progress(message, fraction)

    def scratch(self, name: str) -> Path:
        """A fresh sub-folder of the work dir for one pass's outputs."""
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class PassNotApplicable(Exception):
    """``requires`` found that the pass does not apply; the reason is reported, not fatal."""


class PassError(Exception):
    """A pass failed; names the pass and the chain before it."""

    def __init__(self, pass_name: str, before: Sequence[str], cause: BaseException) -> None:
        chain = " -> ".join([*before, pass_name])
        super().__init__(
            f"pass '{pass_name}' failed (chain: {chain}): {type(cause).__name__}: {cause}"
        )
        self.pass_name = pass_name
        self.cause_text = f"{type(cause).__name__}: {cause}"

    def __reduce__(self):  # pickles across the worker-process boundary
        return (_rebuild_pass_error, (self.pass_name, str(self)))


def _rebuild_pass_error(pass_name: str, text: str) -> PassError:
    error = PassError.__new__(PassError)
    Exception.__init__(error, text)
    error.pass_name = pass_name
    error.cause_text = text
    return error


@dataclass
class PassResult:
    """The output of one pass: the new artifact, whether it changed, and what it did."""

    artifact: Artifact
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Pass(ABC):
    """One compression or conversion step.

    Subclasses set ``name``, ``applies_to`` (model families, or ``{"generic"}`` for any
    graph), ``helps`` (targets it can make faster), ``input_kind`` (``"torch"``/``"onnx"``)
    and hold a frozen dataclass ``config``; ``opt_in = True`` keeps a pass out of the search
    unless the request's ``allow`` names it.
    """

    name: ClassVar[str]
    applies_to: ClassVar[frozenset[str]] = frozenset({"generic"})
    helps: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda", "tensorrt"})
    input_kind: ClassVar[ArtifactKind] = "onnx"
    opt_in: ClassVar[bool] = False
    """Costly or data-hungry passes set this: chains containing them run only when the
    request's ``allow`` names the pass (``optimizers.chains.build_chains``)."""

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def requires(self, artifact: Artifact, ctx: PassContext) -> None:
        """Raise ``PassNotApplicable`` with a reason when the pass cannot run on ``artifact``."""
        if artifact.kind != self.input_kind:
            raise PassNotApplicable(
                f"{self.name} needs a {self.input_kind} model, got {artifact.kind}"
            )
        if "generic" not in self.applies_to and artifact.family not in self.applies_to:
            raise PassNotApplicable(
                f"{self.name} applies to {sorted(self.applies_to)}, not {artifact.family}"
            )

    @abstractmethod
    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:
        """Do the work."""

    def ensures(self, result: PassResult, ctx: PassContext) -> None:
        """Check the output (e.g. the ONNX file passes ``onnx.checker``). Raise on violation."""
        if result.artifact.kind == "onnx" and result.artifact.onnx_path is not None:
            import onnx

            onnx.checker.check_model(str(result.artifact.onnx_path))

    def run(self, artifact: Artifact, ctx: PassContext, before: Sequence[str] = ()) -> PassResult:
        """``requires -> call -> ensures``, timed; failures become ``PassError``."""
        self.requires(artifact, ctx)
        ctx.check_cancelled()
        start = time.perf_counter()
        try:
            result = self.call(artifact, ctx)
            self.ensures(result, ctx)
        except (PassNotApplicable, Cancelled):
            raise
        except Exception as exc:
            raise PassError(self.name, before, exc) from exc
        result.seconds = time.perf_counter() - start
        return result

    def describe(self) -> dict[str, Any]:
        """Name and config, for reports."""
        from dataclasses import asdict, is_dataclass

        config = asdict(self.config) if is_dataclass(self.config) else self.config
        return {"name": self.name, "config": config}
