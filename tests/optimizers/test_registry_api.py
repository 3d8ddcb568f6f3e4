"""Registry contracts and the request validation of the public entry point."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from optimizers import registry
from optimizers.api import OptimizationRequest
from optimizers.chains import build_chains
from optimizers.passes.base import Pass
from serving.errors import InvalidInput


def test_generic_passes_registered() -> None:
    passes = registry.available_passes()
    for name in (
        "export",
        "ort_transformer_optimize",
        "ort_graph_optimize",
        "quantize_dynamic",
        "quantize_static",
        "fp16",
        "lowrank",
    ):
        assert name in passes
        assert passes[name].name == name


def test_get_pass_builds_frozen_config_with_overrides() -> None:
    quant = registry.get_pass("quantize_dynamic", per_channel=False)
    assert quant.config.per_channel is False
    with pytest.raises(AttributeError):
        quant.config.per_channel = True  # frozen
    with pytest.raises(ValueError, match="no option"):
        registry.get_pass("quantize_dynamic", per_chanel=True)
    with pytest.raises(KeyError, match="unknown pass"):
        registry.get_pass("does_not_exist")


def test_register_pass_requires_frozen_config() -> None:
    class NoConfig(Pass):
        name = "test_no_config"

        def call(self, artifact, ctx):  # pragma: no cover - never run
            raise NotImplementedError

    with pytest.raises(TypeError, match="Config"):
        registry.register_pass(NoConfig)

    class Mutable(NoConfig):
        name = "test_mutable"

        @dataclass
        class Config:
            x: int = 1

    with pytest.raises(TypeError, match="frozen"):
        registry.register_pass(Mutable)


def test_register_chains_normalizes_and_build_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.available_passes()
    monkeypatch.setitem(registry._CHAINS, "generic", [])
    registry.register_chains(
        "generic", [["quantize_dynamic"], [("lowrank", {"energy": 0.9}), "quantize_dynamic"]]
    )
    assert registry.registered_chains("generic")[1] == [
        ("lowrank", {"energy": 0.9}),
        ("quantize_dynamic", {}),
    ]
    registry.register_chains("generic", [["no_such_pass"]])
    chains, skipped = build_chains("generic", "cpu")
    assert [("lowrank", {"energy": 0.9}), ("quantize_dynamic", {})] in chains
    assert any("unknown pass" in s["reason"] for s in skipped)
    with pytest.raises(ValueError, match="family"):
        registry.register_chains("rnn", [["fp16"]])


def test_fp16_in_gpu_chains_and_measured_on_cpu() -> None:
    cpu, _ = build_chains("transformer", "cpu")
    cuda, _ = build_chains("transformer", "cuda")
    assert any(name == "fp16" for chain in cuda for name, _ in chain)
    assert any(name == "fp16" for chain in cpu for name, _ in chain)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target": "tpu"}, "target"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"seq_len": -3}, "seq_len"),
        ({"min_cosine": 2.0}, "min_cosine"),
        ({"max_accuracy_drop": -0.1}, "max_accuracy_drop"),
        ({"min_cosine": None, "max_accuracy_drop": None}, "min_cosine"),
        ({"time_budget_s": 0}, "time_budget_s"),
        ({"allow": "fp16"}, "allow"),
        ({"name": ""}, "name"),
        ({"static_shape": "yes"}, "static_shape"),
    ],
)
def test_request_validation_names_the_field(kwargs: dict, field: str) -> None:
    values = {"name": "m", **kwargs}
    with pytest.raises(InvalidInput, match=field):
        OptimizationRequest(**values)


def test_request_from_dict() -> None:
    request = OptimizationRequest.from_dict(
        {"name": "m", "target": "cuda", "allow": ["fp16"], "max_accuracy_drop": 0.01}
    )
    assert request.allow == ("fp16",)
    assert request.fidelity_bound() == {"min_cosine": 0.99, "max_accuracy_drop": 0.01}
    assert OptimizationRequest.from_dict(request.to_dict()) == request
    with pytest.raises(InvalidInput, match="unknown optimization option"):
        OptimizationRequest.from_dict({"name": "m", "bogus": 1})
    with pytest.raises(InvalidInput, match="JSON object"):
        OptimizationRequest.from_dict(["m"])  # type: ignore[arg-type]
