"""The HTTP edge `clip-pyfunc serve` and the app put in front of their routes, as one pure ASGI middleware.

- **Body limit.** A request whose `Content-Length` is over `max_body_bytes` is answered 413 at
  once, without reading its body; a chunked one is counted as it arrives and answered 413 as
  soon as it passes the limit. A compressed body (`Content-Encoding: gzip` or `deflate`) is
  inflated as it arrives and counted as it inflates, so a gzip bomb is a 413 too. The
  application behind never sees the rest, and the server closes the connection.
- **Scoring requests** (`Scoring`, `clip-pyfunc serve`'s `/invocations`): what MLflow's parser
  would get wrong is answered here, in MLflow's JSON error shape: no Content-Type is JSON, media
  types and their parameters are read case-insensitively and unquoted (serving.payload), params
  the model does not declare are a 400 (MLflow drops them), and so is a number, boolean or
  object where a text model takes a string (MLflow turns it into one).
- **Health.** While `Health` says the model is failing, or the server is draining after SIGTERM
  (`Lifecycle`), the health paths answer 503 with the reason; otherwise they pass through.
- **Requests nobody waits for.** Each request to a model path runs with a
  runtime.batching.RequestState: when its client disconnects, or it was answered 504, the model
  drops its work that has not started. Past `max_requests` model requests at once the answer is
  429 at once, and every 429 carries `Retry-After`.
- **Metrics.** `GET /metrics` answers Prometheus' text format (serving.metrics); every request
  is counted by path and status, and timed.

Everything else passes through byte for byte: `clip-pyfunc serve` keeps MLflow's scoring
protocol exactly. Pure ASGI, not starlette's BaseHTTPMiddleware, which runs each request in a
task of its own and cost about 1 ms a request here (docs/SEARCH.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from clip_pyfunc.runtime.batching import RequestState, current_request
from clip_pyfunc.serving.metrics import Health, Metrics
from clip_pyfunc.serving.payload import (RequestRefused, Inflater, canonical_content_type, check_text_cells,
                                         content_codings, scoring_cells, unknown_params)

# MLflow's error codes for the edge's answers (mlflow.protos.databricks_pb2; MLflow has none for 415).
_MLFLOW_CODES = {400: "INVALID_PARAMETER_VALUE", 413: "REQUEST_LIMIT_EXCEEDED", 415: "BAD_REQUEST",
                 429: "RESOURCE_EXHAUSTED", 503: "TEMPORARILY_UNAVAILABLE"}


def mlflow_error(status: int, message: str) -> bytes:
    """MLflow's JSON error body for an answer of the edge, with the error code MLflow has for its status."""
    return json.dumps({"error_code": _MLFLOW_CODES.get(status, "BAD_REQUEST"), "message": message}).encode()


@dataclass(frozen=True)
class Scoring:
    """What the edge checks in an MLflow scoring request before MLflow parses it.

    Attributes:
        paths: The scoring paths (`/invocations`).
        params: The param names the model's signature declares; others are refused.
        text_column: The column whose cells the model embeds as text (`input` for a text model, `text`
            for the combined model): they must be JSON strings (or null). None: no text column.
    """

    paths: tuple[str, ...]
    params: frozenset[str]
    text_column: str | None = None


class Lifecycle:
    """Whether the server is draining (SIGTERM received): readiness then answers 503."""

    def __init__(self):
        self.draining = False

    def drain_on_sigterm(self) -> None:
        """From SIGTERM on, say the server is draining, then hand the signal to the handler installed before
        (uvicorn's: it stops accepting, lets accepted requests finish within timeout_graceful_shutdown,
        serve.drain_seconds, and exits). Call it once uvicorn's handler is in place (its app factory or
        lifespan); outside the main thread, or with no handler to wrap, it does nothing."""
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            return

        def handle(sig, frame):
            self.draining = True
            logging.getLogger(__name__).warning("SIGTERM: draining; readiness answers 503")
            previous(sig, frame)

        signal.signal(signal.SIGTERM, handle)


class Edge:
    """Body limit, scoring checks, health gate, abandoned requests and metrics around an ASGI app (see the
    module docstring).

    Args:
        app: The ASGI application behind (MLflow's scoring app, or the app's FastAPI).
        max_body_bytes: Most bytes of a request body, inflated (serve.max_body_bytes).
        body_limits: Lower limits by path prefix, longest first: {prefix: (bytes, the settings that set it)}
            (the app's forms and OpenAI's API take max_fields x max_upload_bytes). The one place a body's
            size is checked; max_body_bytes still caps each.
        metrics: The process's Metrics, or None to serve without /metrics and request metrics.
        health: The models' Health, or None (health paths always pass through).
        health_paths: Paths that answer 503 while unhealthy or draining.
        paths: Paths counted under their own name; any other is counted as "other" (bounded labels).
        error_body: (status, message) -> body bytes for the edge's own answers, in the protocol of the app
            behind; per path prefix, longest first, so /v1/ answers in OpenAI's shape (default: MLflow's).
        scoring: The scoring requests' checks (`clip-pyfunc serve`), or None.
        model_paths: Paths whose requests run a model: they get a RequestState and count against
            `max_requests`.
        max_requests: Most model requests at once (serve.request_threads); None: no bound.
        lifecycle: Says when the server drains; None: never.
        admission: Asked once a model request's body is read, before the app parses it: the
            errors.Unavailable the request would be refused with (Overloaded: 429 with
            Retry-After, ForwardStalled: 503), or None. A refusal then costs no parse.
    """

    def __init__(self, app, *, max_body_bytes: int, metrics: Metrics | None, health: Health | None,
                 health_paths: tuple[str, ...] = ("/ping", "/health"), paths: tuple[str, ...] = (),
                 error_body: dict[str, Callable[[int, str], bytes]] | None = None, scoring: Scoring | None = None,
                 model_paths: tuple[str, ...] = (), max_requests: int | None = None,
                 lifecycle: Lifecycle | None = None, admission: Callable[[], Exception | None] | None = None,
                 body_limits: dict[str, tuple[int, str]] | None = None):
        self.app, self.max_body_bytes = app, max_body_bytes
        limits = {"": (max_body_bytes, "serve.max_body_bytes")}
        for prefix, (size, setting) in (body_limits or {}).items():
            limits[prefix] = (size, setting) if size < max_body_bytes else (max_body_bytes, "serve.max_body_bytes")
        self.body_limits = sorted(limits.items(), key=lambda kv: -len(kv[0]))
        self.metrics, self.health, self.health_paths = metrics, health, health_paths
        self.paths = frozenset(paths) | frozenset(health_paths) | {"/metrics"}
        self.error_body = sorted((error_body or {"": mlflow_error}).items(), key=lambda kv: -len(kv[0]))
        self.scoring = scoring
        self.model_paths = frozenset(model_paths) | frozenset(scoring.paths if scoring else ())
        self.max_requests, self.lifecycle, self.admission = max_requests, lifecycle, admission
        self.running = 0  # model requests in the app now

    def _limit(self, path: str) -> tuple[int, str]:
        """(most body bytes, the settings that set them) for a path."""
        return next(limit for prefix, limit in self.body_limits if path.startswith(prefix))

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
            if self.health is not None:
                self.health.refresh()
            body, content_type = self.metrics.render()
            await _respond(send, 200, body, content_type)
            return
        if path in self.health_paths:
            why = ("the server is shutting down (SIGTERM); send requests to another replica"
                   if self.lifecycle is not None and self.lifecycle.draining else
                   None if self.health is None or self.health.ok else self.health.reason())
            if why:
                await _respond(send, 503, self._body_for(path, 503, why), "application/json")
                return
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", ()):  # a repeated header is one list (RFC 9110 5.3)
            headers[name] = headers[name] + b", " + value if name in headers else value
        length = _content_length(headers.get(b"content-length"))
        if length is not None and length > self._limit(path)[0]:
            await _respond(send, 413, self._body_for(path, 413, self._too_large(path, length)), "application/json",
                           close=True)
            return
        if path not in self.model_paths or method != "POST":
            await self._pass(scope, receive, send, path, headers, length)
            return
        if self.max_requests is not None and self.running >= self.max_requests:
            await _respond(send, 429, self._body_for(path, 429, f"the server is running {self.running} requests, its "
                                                     "limit (serve.request_threads); retry after 1 s"),
                           "application/json", extra=[(b"retry-after", b"1")])
            return
        self.running += 1
        state = RequestState()
        token = current_request.set(state)  # the app's tasks and threads copy the context from here
        try:
            await self._model_request(scope, receive, send, path, headers, length, state)
        finally:
            current_request.reset(token)
            self.running -= 1

    async def _pass(self, scope, receive, send, path, headers, length):
        """A request that runs no model: inflated when coded, else limited as it streams."""
        if b"content-encoding" in headers:
            try:
                body = await self._read_body(receive, path, headers, length)
            except RequestRefused as e:
                await self._refuse(send, path, e)
                return
            replay = _Replay(receive, body, None)
            try:
                await self.app(_with_body(scope, body, None), replay, send)
            finally:
                replay.close()
        elif length is not None:  # declared and within the limit: h11/httptools stop at Content-Length
            await self.app(scope, receive, send)
        else:
            await self._chunked(scope, receive, send, path)

    async def _model_request(self, scope, receive, send, path, headers, length, state: RequestState):
        """Read the body (inflated, checked for scoring), then run the app; the client's disconnect or a 504
        marks `state` abandoned."""
        scoring = self.scoring if self.scoring is not None and path in self.scoring.paths else None
        if scoring is None and b"content-encoding" not in headers:
            replay = _Replay(receive, None, state)
        else:
            try:
                body = await self._read_body(receive, path, headers, length)
                content_type = None
                if scoring is not None:
                    raw = headers.get(b"content-type")
                    content_type = canonical_content_type(None if raw is None else raw.decode("latin-1"))
                    if content_type.startswith("application/json"):
                        _check_scoring_json(body, scoring)
            except RequestRefused as e:
                await self._refuse(send, path, e)
                return
            if self.admission is not None and (unavailable := self.admission()) is not None:
                status, retry = unavailable.http_status, getattr(unavailable, "retry_after", None)
                await _respond(send, status, self._body_for(path, status, str(unavailable)), "application/json",
                               extra=[] if retry is None else [(b"retry-after", str(retry).encode())])
                return
            scope = _with_body(scope, body, content_type)
            replay = _Replay(receive, body, state)
        refused = [False]

        async def watched_send(message):
            if message["type"] == "http.response.start":
                if message["status"] == 504:  # the server's own timeout answered: nobody waits for the rows
                    state.cancel("answered 504 (the server's request timeout)")
                if message["status"] == 429 and not any(k.lower() == b"retry-after" for k, _ in message["headers"]):
                    message = {**message, "headers": [*message["headers"],
                                                      (b"retry-after", str(state.retry_after or 1).encode())]}
            if not refused[0]:
                await send(message)

        try:
            if replay.body is None and length is None:  # streamed without a length: limited as it comes
                await self._chunked(scope, replay, watched_send, path, refused)
            else:
                await self.app(scope, replay, watched_send)
        finally:
            replay.close()

    async def _read_body(self, receive, path, headers, length) -> bytes:
        """The whole body, inflated when coded, within the limit.

        Raises:
            RequestRefused: 413 past the limit (counted inflated), 415 for a coding not inflated, 400 for a
                body that is not in its coding.
        """
        inflater = None
        if b"content-encoding" in headers:
            codings = content_codings(headers[b"content-encoding"].decode("latin-1"))
            inflater = Inflater(codings, self._limit(path)[0]) if codings else None
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRefused(499, "the client disconnected before sending the whole body")
            data = message.get("body", b"")
            received += len(data)
            if received > self._limit(path)[0]:  # the coded bytes count too
                raise RequestRefused(413, self._too_large(path, length))
            chunks.append(inflater.feed(data) if inflater else data)
            if not message.get("more_body", False):
                break
        if inflater:
            chunks.append(inflater.finish())
        return b"".join(chunks)

    async def _refuse(self, send, path, e: RequestRefused):
        await _respond(send, e.status, self._body_for(path, e.status, e.message), "application/json",
                       close=e.status == 413)

    async def _chunked(self, scope, receive, send, path, refused=None):
        """A body without Content-Length (chunked): count it, and answer 413 once it passes the limit."""
        received, refused = 0, refused if refused is not None else [False]

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request" and not refused[0]:
                received += len(message.get("body", b""))
                if received > self._limit(path)[0]:
                    refused[0] = True
                    await _respond(send, 413, self._body_for(path, 413, self._too_large(path, None)),
                                   "application/json", close=True)
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

    def _too_large(self, path: str, length: int | None) -> str:
        size = f"is {length} bytes, over" if length is not None else "passed"
        limit, setting = self._limit(path)
        return (f"request body {size} the limit of {limit} bytes ({setting}); "
                "send fewer or smaller rows per request")


class _Replay:
    """The receive channel the app behind gets: the body read already (or the client's, as it streams),
    then a wait for the client's disconnect, which one watcher task reads and tells `state` of."""

    def __init__(self, receive, body: bytes | None, state: RequestState | None):
        self.receive, self.body, self.state = receive, body, state
        self._sent = False
        self._gone = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        if body is not None:
            self._watch()

    async def __call__(self):
        if self.body is not None:
            if not self._sent:
                self._sent = True
                return {"type": "http.request", "body": self.body, "more_body": False}
        elif self._watcher is None:  # streaming: pass the body through, then watch
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self._disconnected()
            elif not message.get("more_body", False):
                self._watch()
            return message
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def _watch(self):
        if self.state is not None or self.body is not None:
            self._watcher = asyncio.ensure_future(self._wait_for_disconnect())

    async def _wait_for_disconnect(self):
        while (await self.receive())["type"] != "http.disconnect":
            pass  # nothing else comes after the body; keep reading until the disconnect
        self._disconnected()

    def _disconnected(self):
        self._gone.set()
        if self.state is not None:
            self.state.cancel("the client disconnected")

    def close(self):
        """The app has answered: stop watching."""
        if self._watcher is not None:
            self._watcher.cancel()


# More brackets than any request of max_rows rows holds: parse it here, where a JSON nested too deep for
# Python's parser (RecursionError) is a 400; MLflow's app would answer it 500 with a traceback.
_MANY_BRACKETS = 5000


def _check_scoring_json(body: bytes, scoring: Scoring) -> None:
    """The params and, for a text model, the cells' JSON types of a scoring body (serving.payload)."""
    nested = body.count(b"[") + body.count(b"{") > _MANY_BRACKETS  # C-speed counts, no parse
    if not (scoring.text_column or nested or b'"params"' in body):
        return  # an image request without params: nothing to check, and no second parse of its base64
    try:
        payload = json.loads(body)
    except ValueError:
        return  # MLflow answers invalid JSON itself
    except RecursionError as e:  # json's C parser recurses per nesting level
        raise RequestRefused(400, "the JSON body nests too deep") from e
    unknown_params(payload, scoring.params)
    if scoring.text_column and (cells := scoring_cells(payload, scoring.text_column)) is not None:
        check_text_cells(cells)


def _with_body(scope, body: bytes, content_type: str | None):
    """The scope with the headers of the body handed on: its length, no coding, the canonical media type."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-encoding")
               and not (content_type is not None and k == b"content-type")]
    headers.append((b"content-length", str(len(body)).encode()))
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    return {**scope, "headers": headers}


def _content_length(value: bytes | None) -> int | None:
    """The declared body length; a malformed one counts as over any limit (the server refuses it anyway)."""
    if value is None:
        return None
    return int(value) if value.isdigit() else 1 << 62


async def _respond(send, status: int, body: bytes, content_type: str, close: bool = False, extra=()) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})
