"""The HTTP edge `clip-pyfunc serve` and the app put in front of their routes, as one pure ASGI middleware.

- **Body limit.** A request whose `Content-Length` is over `max_body_bytes` is answered 413 at
  once, without reading its body; a chunked one is counted as it arrives and answered 413 as
  soon as it passes the limit. The application behind never sees the rest, and the server
  closes the connection, so a 400 MB body costs the server what it read up to the limit.
- **Health.** While `Health` says the model is failing, the health paths answer 503 with the
  reason; otherwise they pass through unchanged.
- **Metrics.** `GET /metrics` answers Prometheus' text format (serving.metrics); every request
  is counted by path and status, and timed.

Everything else passes through byte for byte: `clip-pyfunc serve` keeps MLflow's scoring
protocol exactly. Pure ASGI, not starlette's BaseHTTPMiddleware, which runs each request in a
task of its own and cost about 1 ms a request here (docs/SEARCH.md).
"""

from __future__ import annotations

import json
import time
from typing import Callable

from clip_pyfunc.serving.metrics import Health, Metrics


# MLflow's error codes for the edge's answers (mlflow.protos.databricks_pb2).
_MLFLOW_CODES = {413: "REQUEST_LIMIT_EXCEEDED", 503: "TEMPORARILY_UNAVAILABLE"}


def mlflow_error(status: int, message: str) -> bytes:
    """MLflow's JSON error body for a 413 or a 503, with the error code MLflow has for each."""
    return json.dumps({"error_code": _MLFLOW_CODES[status], "message": message}).encode()


class Edge:
    """Body limit, health gate and metrics around an ASGI app (see the module docstring).

    Args:
        app: The ASGI application behind (MLflow's scoring app, or the app's FastAPI).
        max_body_bytes: Most bytes of a request body (serve.max_body_bytes).
        metrics: The process's Metrics, or None to serve without /metrics and request metrics.
        health: The models' Health, or None (health paths always pass through).
        health_paths: Paths that answer 503 while unhealthy.
        paths: Paths counted under their own name; any other is counted as "other" (bounded labels).
        error_body: (status, message) -> body bytes for a 413 or a 503, in the protocol of the app behind;
            per path prefix, longest first, so /v1/ answers in OpenAI's shape (default: MLflow's).
    """

    def __init__(self, app, *, max_body_bytes: int, metrics: Metrics | None, health: Health | None,
                 health_paths: tuple[str, ...] = ("/ping", "/health"), paths: tuple[str, ...] = (),
                 error_body: dict[str, Callable[[int, str], bytes]] | None = None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.metrics, self.health, self.health_paths = metrics, health, health_paths
        self.paths = frozenset(paths) | frozenset(health_paths) | {"/metrics"}
        self.error_body = sorted((error_body or {"": mlflow_error}).items(), key=lambda kv: -len(kv[0]))

    def _body_for(self, path: str, status: int, message: str) -> bytes:
        return next(make(status, message) for prefix, make in self.error_body if path.startswith(prefix))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        status = [0]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counted_send, path)
        finally:
            if self.metrics is not None:
                label = path if path in self.paths else "other"
                self.metrics.requests.labels(label, str(status[0])).inc()
                self.metrics.request_seconds.labels(label).observe(time.perf_counter() - started)

    async def _handle(self, scope, receive, send, path):
        method = scope["method"]
        if path == "/metrics" and method == "GET" and self.metrics is not None:
            body, content_type = self.metrics.render()
            await _respond(send, 200, body, content_type)
            return
        if path in self.health_paths and self.health is not None and not self.health.ok:
            await _respond(send, 503, self._body_for(path, 503, self.health.reason()), "application/json")
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await _respond(send, 413, self._body_for(path, 413, self._too_large(length)), "application/json", close=True)
            return
        if length is not None:  # declared and within the limit: h11/httptools stop at Content-Length
            await self.app(scope, receive, send)
            return
        await self._chunked(scope, receive, send, path)

    async def _chunked(self, scope, receive, send, path):
        """A body without Content-Length (chunked): count it, and answer 413 once it passes the limit."""
        received, refused = 0, [False]

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request" and not refused[0]:
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused[0] = True
                    await _respond(send, 413, self._body_for(path, 413, self._too_large(None)), "application/json",
                                   close=True)
                    return {"type": "http.disconnect"}  # the app behind stops reading, as for a client gone
            return message

        async def guarded_send(message):
            if not refused[0]:  # after our 413, whatever the app answers is dropped
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused[0]:
                raise
            # The app behind raised on the disconnect we told it of (starlette's ClientDisconnect): the
            # 413 is the answer, and there is nothing to log.

    def _too_large(self, length: int | None) -> str:
        size = f"is {length} bytes, over" if length is not None else "passed"
        return (f"request body {size} the limit of {self.max_body_bytes} bytes (serve.max_body_bytes); "
                "send fewer or smaller rows per request")


def _content_length(scope) -> int | None:
    """The declared body length; a malformed one counts as over any limit (the server refuses it anyway)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else 1 << 62
    return None


async def _respond(send, status: int, body: bytes, content_type: str, close: bool = False) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})
