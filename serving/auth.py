"""Optional API keys with scopes: ``infer``, ``admin`` and ``metrics``.

Keys come from ``SLIMSERVE_{INFER,ADMIN,METRICS}_API_KEY`` or from files named by
``SLIMSERVE_*_API_KEY_FILE`` (mounted secrets) and are sent as ``Authorization: Bearer <key>``.
A scope with no key configured is open. The admin key also opens the infer and metrics
scopes. No key: 401 with ``WWW-Authenticate: Bearer``; a key that is valid only for another
scope: 403. Keys are compared in constant time (``hmac.compare_digest``), never logged and
never echoed in an error.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import Request

from serving.errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from serving.settings import Settings

Scope = Literal["infer", "admin", "metrics"]
SCOPES: tuple[Scope, ...] = ("infer", "admin", "metrics")
# which configured keys open a scope (admin is a superset of the others)
GRANTS: dict[Scope, tuple[Scope, ...]] = {
    "infer": ("infer", "admin"),
    "admin": ("admin",),
    "metrics": ("metrics", "admin"),
}


def read_key_file(path: Path, setting: str) -> bytes:
    """The key stored in ``path`` (surrounding whitespace stripped); a clear error if unusable."""
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read the key file {path}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"{setting}: the key file {path} is empty")
    return key


@dataclass(frozen=True, repr=False)
class ApiKeys:
    """The configured key of each scope (None = that scope is open)."""

    infer: bytes | None = None
    admin: bytes | None = None
    metrics: bytes | None = None

    def __repr__(self) -> str:  # never show the keys
        configured = [s for s in SCOPES if getattr(self, s) is not None]
        return f"ApiKeys(configured={configured})"

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """Keys from the settings; a ``*_api_key_file`` wins over the plain variable."""
        keys: dict[str, bytes | None] = {}
        for scope in SCOPES:
            path = getattr(settings, f"{scope}_api_key_file")
            secret = getattr(settings, f"{scope}_api_key")
            if path is not None:
                keys[scope] = read_key_file(Path(path), f"SLIMSERVE_{scope.upper()}_API_KEY_FILE")
            elif secret is not None and secret.get_secret_value():
                keys[scope] = secret.get_secret_value().encode()
            else:
                keys[scope] = None
        return cls(**keys)

    @property
    def enabled(self) -> bool:
        return any(getattr(self, s) is not None for s in SCOPES)

    def is_open(self, scope: Scope) -> bool:
        return getattr(self, scope) is None

    def matching_scopes(self, token: bytes) -> set[Scope]:
        """Every scope whose key equals ``token`` (each key compared in constant time)."""
        found: set[Scope] = set()
        for scope in SCOPES:
            key = getattr(self, scope)
            # compare against every key (no early exit) so timing reveals nothing
            if key is not None and hmac.compare_digest(key, token):
                found.add(scope)
        return found

    def check(self, scope: Scope, authorization: str | None) -> None:
        """Raise 401/403 unless ``authorization`` opens ``scope``."""
        if self.is_open(scope):
            return
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized(
                f"the {scope} API requires an API key: send 'Authorization: Bearer <key>'"
            )
        matched = self.matching_scopes(token)
        if matched & set(GRANTS[scope]):
            return
        if not matched:
            raise Unauthorized("the API key is not valid")
        raise Forbidden(f"the API key is not allowed to use the {scope} API")


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (None when absent/other)."""
    if not authorization:
        return None
    kind, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if kind.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", "surrogateescape")


def api_keys(request: Request) -> ApiKeys:
    keys = getattr(request.app.state, "api_keys", None)
    return keys if keys is not None else ApiKeys()


def authorize(request: Request, scope: Scope) -> None:
    """Raise unless the request may use ``scope`` (for code paths outside FastAPI routing)."""
    api_keys(request).check(scope, request.headers.get("authorization"))


def require(scope: Scope):
    """A FastAPI dependency admitting only requests that may use ``scope``."""

    async def dependency(request: Request) -> None:
        authorize(request, scope)

    dependency.__name__ = f"require_{scope}"
    return dependency
