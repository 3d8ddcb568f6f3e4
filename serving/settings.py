"""Server settings: one pydantic-settings class, read from ``SLIMSERVE_*`` environment variables.

List-valued settings (``SLIMSERVE_STARTUP_MODELS``, ``SLIMSERVE_CORS_ORIGINS``) accept either a
JSON list or a comma-separated string.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from serving.protocol import ProtocolLimits

MiB = 1024 * 1024
ModelControlMode = Literal["none", "explicit", "poll"]


def _split_list(value: object) -> object:
    """Accept ``"a,b"`` and ``'["a","b"]'`` as well as real lists."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the server can be configured with (CLI flags override the environment)."""

    model_config = SettingsConfigDict(
        env_prefix="SLIMSERVE_", protected_namespaces=(), extra="ignore", frozen=True
    )

    repository: Path = Field(Path("./model_repository"), description="model repository folder")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_control_mode: ModelControlMode = Field(
        "none",
        description="none: load everything at start, no load/unload API; explicit: load "
        "startup_models and what clients ask for; poll: rescan every poll_interval_s",
    )
    poll_interval_s: float = Field(5.0, gt=0)
    startup_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models to load at start in explicit mode ('*' = all)"
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown bound")
    # protocol limits (client mistakes beyond these are 413/400 with the limit named)
    max_body_bytes: int = Field(64 * MiB, gt=0)
    max_decompressed_bytes: int = Field(256 * MiB, gt=0)
    max_elements: int = Field(64 * MiB, gt=0)
    max_inputs: int = Field(64, gt=0)
    max_string_bytes: int = Field(16 * MiB, gt=0)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    access_log: bool = False
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    jobs_dir: Path | None = Field(
        None, description="upload/optimization job folder; default <repository>/../.slimserve-jobs"
    )
    max_concurrent_jobs: int = Field(1, ge=1)
    max_upload_bytes: int = Field(2048 * MiB, gt=0)
    load_workers: int = Field(2, ge=1, description="threads loading and warming up models")
    # access control (serving/auth.py): a scope without a key is open; *_file wins
    infer_api_key: SecretStr | None = Field(None, description="key for inference + metadata")
    infer_api_key_file: Path | None = Field(None, description="file holding the infer key")
    admin_api_key: SecretStr | None = Field(
        None, description="key for load/unload, index, uploads and jobs (also opens infer)"
    )
    admin_api_key_file: Path | None = Field(None, description="file holding the admin key")
    metrics_api_key: SecretStr | None = Field(None, description="key for GET /metrics")
    metrics_api_key_file: Path | None = Field(None, description="file holding the metrics key")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port only (not the main one)"
    )

    @field_validator("startup_models", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_mode(self) -> Settings:
        if self.startup_models and self.model_control_mode != "explicit":
            raise ValueError(
                "startup_models (--load-model) only applies to model_control_mode 'explicit'; "
                f"mode '{self.model_control_mode}' loads every model in the repository"
            )
        return self

    @property
    def jobs_path(self) -> Path:
        """Where upload jobs keep their files."""
        if self.jobs_dir is not None:
            return self.jobs_dir
        return self.repository.resolve().parent / ".slimserve-jobs"

    def protocol_limits(self) -> ProtocolLimits:
        """The request-size limits for ``serving.protocol``."""
        from serving.protocol import ProtocolLimits

        return ProtocolLimits(
            max_body_bytes=self.max_body_bytes,
            max_decompressed_bytes=self.max_decompressed_bytes,
            max_elements=self.max_elements,
            max_inputs=self.max_inputs,
            max_string_bytes=self.max_string_bytes,
        )
