"""The default candidate chains per model family and target, plus registered ones.

A chain is a list of ``(pass name, config overrides)``; chains sharing a prefix share its
work (the search evaluates a tree). The baseline (the source as ONNX) is always measured.
"""

from __future__ import annotations

from typing import Any

from optimizers.registry import available_passes, normalize_step, registered_chains

Step = tuple[str, dict[str, Any]]

_FUSE = ("ort_transformer_optimize", {})
_GRAPH = ("ort_graph_optimize", {})
_DYN = ("quantize_dynamic", {})
# SkipLayerNorm/BiasGelu back to faster standard ops for ORT's CPU kernels (see cpu_kernels.py)
_UNFUSE = ("cpu_unfuse", {})
_STATIC = ("quantize_static", {})
_STATIC_PCT = ("quantize_static", {"calibrate_method": "percentile"})
_STATIC_ENT = ("quantize_static", {"calibrate_method": "entropy"})
_FP16 = ("fp16", {})
_LOWRANK = ("lowrank", {})
_TRT = ("tensorrt_build", {})

DEFAULT_CHAINS: dict[str, dict[str, list[list[Step]]]] = {
    "transformer": {
        "cpu": [
            [_FUSE],
            [_DYN],
            [_FUSE, _DYN],
            [_FUSE, _UNFUSE, _DYN],
            [_FUSE, _STATIC],
            [_FUSE, _FP16],
            [_LOWRANK],
            [_LOWRANK, _DYN],
        ],
        "cuda": [[_FUSE], [_FUSE, _FP16], [_STATIC], [_LOWRANK, _FUSE, _FP16]],
        # no ORT fusions before a TensorRT build: their contrib ops do not parse in TensorRT
        "tensorrt": [[_FUSE], [_FP16], [_STATIC], [_TRT], [_FP16, _TRT], [_STATIC, _TRT]],
    },
    "cnn": {
        "cpu": [[_GRAPH], [_GRAPH, _STATIC], [_DYN], [_FP16], [_LOWRANK]],
        "cuda": [[_GRAPH], [_FP16], [_STATIC]],
        "tensorrt": [[_FP16], [_STATIC], [_TRT], [_FP16, _TRT], [_STATIC, _TRT]],
    },
    "generic": {
        "cpu": [
            [_GRAPH],
            [_DYN],
            [_GRAPH, _DYN],
            [_STATIC],
            [_STATIC_PCT],
            [_STATIC_ENT],
            [_FP16],
            [_LOWRANK],
            [_LOWRANK, _DYN],
        ],
        "cuda": [[_GRAPH], [_FP16], [_STATIC]],
        "tensorrt": [[_FP16], [_STATIC], [_TRT], [_FP16, _TRT], [_STATIC, _TRT]],
    },
}


def is_opt_in(name: str, passes: dict[str, Any]) -> bool:
    """Whether pass ``name`` declares ``opt_in = True`` (runs only when ``allow`` names it)."""
    cls = passes.get(name)
    return bool(cls is not None and cls.opt_in)


def chain_label(chain: list[Step]) -> str:
    """``a -> b(k=v)`` for reports and progress."""
    if not chain:
        return "original"
    parts = []
    for name, overrides in chain:
        if overrides:
            options = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
            parts.append(f"{name}({options})")
        else:
            parts.append(name)
    return " -> ".join(parts)


def build_chains(
    family: str, target: str, allow: tuple[str, ...] | None = None
) -> tuple[list[list[Step]], list[dict[str, Any]]]:
    """Candidate chains for ``family``/``target`` filtered by ``allow``; also the chains left
    out or shortened, each with the reason (unknown pass, pass not allowed)."""
    passes = available_passes()
    chains = [list(c) for c in DEFAULT_CHAINS.get(family, DEFAULT_CHAINS["generic"])[target]]
    for chain in registered_chains(family):
        helps = all(target in passes[n].helps for n, _ in chain if n in passes)
        if helps:
            chains.append([normalize_step(s) for s in chain])
    if family != "generic":
        for chain in registered_chains("generic"):
            if all(target in passes[n].helps for n, _ in chain if n in passes):
                chains.append([normalize_step(s) for s in chain])
    kept: list[list[Step]] = []
    skipped: list[dict[str, Any]] = []
    for chain in chains:
        names = [name for name, _ in chain]
        unknown = [n for n in names if n not in passes]
        if unknown:
            skipped.append({"passes": names, "reason": f"unknown pass(es): {unknown}"})
            continue
        opt_in = [n for n in names if is_opt_in(n, passes) and (allow is None or n not in allow)]
        if opt_in:
            skipped.append(
                {"passes": names, "reason": f"opt-in pass(es) {opt_in} not named in allow"}
            )
            continue
        if allow is not None and any(n not in allow for n in names):
            not_allowed = [n for n in names if n not in allow]
            chain = [step for step in chain if step[0] in allow]
            reason = f"not allowed by request: {not_allowed}"
            if chain:
                reason += f"; runs as {chain_label(chain)}"
            skipped.append({"passes": names, "reason": reason})
        if chain and chain not in kept:
            kept.append(chain)
    return kept, skipped
