"""The pass registry: passes register by name, technique packages add candidate chains.

``register_pass`` is a class decorator keyed by ``cls.name``; a pass declares ``Config``, a
frozen dataclass, and ``get_pass(name, **overrides)`` builds ``cls(cls.Config(**overrides))``.
``register_chains(family, chains)`` adds candidate chains the search runs for that family.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from optimizers.passes.base import Pass

ChainStep = str | tuple[str, dict[str, Any]]
Chain = list[ChainStep]

_PASSES: dict[str, type[Pass]] = {}
_CHAINS: dict[str, list[Chain]] = {}
_LOADED = False
LOAD_ERRORS: dict[str, str] = {}
"""Optional technique packages that failed to import: package -> error (reported, not fatal)."""

# Packages whose modules register passes on import (optional ones may not exist yet); any
# other ``optimizers.<technique>.passes`` package is discovered too.
PASS_PACKAGES = ("optimizers.passes", "optimizers.transformer.passes", "optimizers.cnn.passes")


def _pass_packages() -> list[str]:
    import optimizers

    names = list(PASS_PACKAGES)
    for info in pkgutil.iter_modules(optimizers.__path__, "optimizers."):
        candidate = f"{info.name}.passes"
        if info.ispkg and candidate not in names:
            folder = Path(optimizers.__path__[0]) / info.name.rsplit(".", 1)[-1]
            if (folder / "passes").is_dir() or (folder / "passes.py").is_file():
                names.append(candidate)
    return names


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available as ``get_pass(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty class attribute 'name'")
    config = getattr(cls, "Config", None)
    if config is None or not is_dataclass(config):
        raise TypeError(f"pass {name!r} needs a 'Config' frozen dataclass")
    if not config.__dataclass_params__.frozen:
        raise TypeError(f"pass {name!r}: Config must be a frozen dataclass")
    existing = _PASSES.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name {name!r} already registered by {existing.__qualname__}")
    _PASSES[name] = cls
    return cls


def register_chains(family: str, chains: list[Chain]) -> None:
    """Add candidate chains (pass names or ``(name, config overrides)``) for ``family``."""
    if family not in {"transformer", "cnn", "generic"}:
        raise ValueError(f"unknown model family {family!r}: use transformer, cnn or generic")
    bucket = _CHAINS.setdefault(family, [])
    for chain in chains:
        normalized = [normalize_step(step) for step in chain]
        if normalized not in bucket:
            bucket.append(normalized)


def normalize_step(step: ChainStep) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``("name", {...})`` -> ``("name", {...})``."""
    if isinstance(step, str):
        return (step, {})
    if isinstance(step, tuple | list) and len(step) == 2 and isinstance(step[0], str):
        return (step[0], dict(step[1] or {}))
    raise ValueError(f"chain step must be a pass name or (name, overrides), got {step!r}")


def registered_chains(family: str) -> list[list[tuple[str, dict[str, Any]]]]:
    """Chains registered for ``family`` by technique packages (after loading them)."""
    _load_pass_modules()
    return [list(chain) for chain in _CHAINS.get(family, [])]


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass, after importing all pass packages that exist."""
    _load_pass_modules()
    return dict(_PASSES)


def get_pass(name: str, **overrides: Any) -> Pass:
    """An instance of pass ``name`` with its config built from defaults plus ``overrides``."""
    passes = available_passes()
    if name not in passes:
        raise KeyError(f"unknown pass {name!r}; available: {', '.join(sorted(passes))}")
    cls = passes[name]
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"pass {name!r} has no option(s) {', '.join(unknown)}; "
            f"options: {', '.join(sorted(known))}"
        )
    return cls(cls.Config(**overrides))


def _load_pass_modules() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for package_name in _pass_packages():
        optional = package_name != "optimizers.passes"
        try:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(getattr(package, "__path__", []), package_name + "."):
                if info.name.rsplit(".", 1)[-1] != "base":
                    importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if optional and exc.name is not None and package_name.startswith(exc.name):
                continue  # optional technique package not present
            if not optional:
                raise
            LOAD_ERRORS[package_name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            if not optional:
                raise
            LOAD_ERRORS[package_name] = f"{type(exc).__name__}: {exc}"
