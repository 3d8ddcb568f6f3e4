"""``GET /metrics``: Prometheus text format, on the main port or (``SLIMSERVE_METRICS_PORT``)
on a port of its own, behind the metrics API key when one is set."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

from serving.auth import ApiKeys
from serving.errors import SlimServeError
from serving.metrics import ServerMetrics
from serving.routers.deps import MetricsDep
from serving.routers.responses import error_headers

log = logging.getLogger(__name__)
router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    """Every server and model metric."""
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)


def _handler(metrics: ServerMetrics, keys: ApiKeys) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self._send(404, b'{"error": "only /metrics is served on this port"}')
                return
            try:
                keys.check("metrics", self.headers.get("Authorization"))
            except SlimServeError as exc:
                body = json.dumps({"error": exc.message}).encode()
                self._send(exc.status_code, body, error_headers(exc) or {})
                return
            body, content_type = metrics.render()
            self._send(200, body, {"Content-Type": content_type})

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            headers = {"Content-Type": "application/json", **(headers or {})}
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet (no access log)
            return

    return MetricsHandler


@contextlib.asynccontextmanager
async def metrics_port(app: FastAPI) -> AsyncIterator[None]:
    """Serve ``/metrics`` on ``settings.metrics_port`` (a thread) while the app runs."""
    settings = app.state.settings
    handler = _handler(app.state.metrics, app.state.api_keys)
    server = ThreadingHTTPServer((settings.host, settings.metrics_port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info("metrics on http://%s:%s/metrics", host, port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
