"""Opt-in passes (``Pass.opt_in``): their chains run only when ``allow`` names them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from optimizers import registry
from optimizers.chains import build_chains, is_opt_in
from optimizers.passes.base import Artifact, Pass, PassContext, PassResult


class _Costly(Pass):
    name = "test_costly"
    opt_in = True

    @dataclass(frozen=True)
    class Config:
        pass

    def call(self, artifact: Artifact, ctx: PassContext) -> PassResult:  # pragma: no cover
        return PassResult(artifact, False)


@pytest.fixture
def costly(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.available_passes()
    monkeypatch.setitem(registry._PASSES, _Costly.name, _Costly)
    monkeypatch.setitem(
        registry._CHAINS,
        "generic",
        [[("test_costly", {})], [("test_costly", {}), ("quantize_dynamic", {})]],
    )


def test_default_is_not_opt_in_and_distill_opts_in() -> None:
    passes = registry.available_passes()
    assert Pass.opt_in is False
    assert not is_opt_in("quantize_dynamic", passes)
    if "distill" in passes:  # the distill package registers it
        assert passes["distill"].opt_in is True
        assert is_opt_in("distill", passes)


def test_opt_in_chains_skipped_unless_allowed(costly: None) -> None:
    chains, skipped = build_chains("generic", "cpu")
    assert not any("test_costly" in [n for n, _ in c] for c in chains)
    reasons = [s["reason"] for s in skipped if "test_costly" in s["passes"]]
    assert len(reasons) == 2
    assert all("opt-in pass(es) ['test_costly'] not named in allow" in r for r in reasons)
    assert [("quantize_dynamic", {})] in chains  # ordinary chains unaffected

    chains, skipped = build_chains("generic", "cpu", ("test_costly", "quantize_dynamic"))
    assert [("test_costly", {})] in chains
    assert [("test_costly", {}), ("quantize_dynamic", {})] in chains
    assert not any("opt-in" in s["reason"] for s in skipped)


def test_allowing_only_the_opt_in_pass_shortens_the_chain(costly: None) -> None:
    chains, skipped = build_chains("generic", "cpu", ("test_costly",))
    assert chains == [[("test_costly", {})]]
    assert any("runs as test_costly" in s["reason"] for s in skipped)
