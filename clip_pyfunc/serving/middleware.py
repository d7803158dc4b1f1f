"""The app's middleware: each request's id and API key check (RequestContext), its log format, and the
error bodies the edge (serving.edge) answers in for the app's paths.

Each response carries `request_id`, the client's `X-Request-ID` (or `request_id`) header or a new
UUID, and so does every log line written while answering it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import uuid

_REQUEST_ID = contextvars.ContextVar("request_id", default="-")
_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_HEADERS = ("x-request-id", "request_id")  # clip_syte's clients send `request_id`
_OPEN_PATHS = ("/", "/health")  # the page itself asks for the key; health checks need none
_KEY_QUERY_NAMES = ("key", "api_key", "apikey", "api-key", "token", "access_token")  # refused in a URL
log = logging.getLogger("clip_pyfunc.serving.app")


class _RequestIdFilter(logging.Filter):
    def filter(self, record):
        record.request_id = _REQUEST_ID.get()
        return True


class RequestContext:
    """Each request's id (the client's `X-Request-ID` / `request_id`, else a new UUID), the API key check
    (`X-API-Key` or `Authorization: Bearer`; a key in the URL is refused, since proxies and access logs keep
    URLs) and the access log line, as a pure ASGI middleware.

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs the app in a task of its own
    and streams the response through it, which cost 1.0 ms a request on the 2-core machine
    (docs/SEARCH.md); Starlette's docs name pure ASGI middleware as the way around it.
    """

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import Headers, MutableHeaders, QueryParams
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        sent = (headers.get(name, "") for name in _ID_HEADERS)
        rid = next((value for value in sent if _ID_PATTERN.match(value)), None) or str(uuid.uuid4())
        token = _REQUEST_ID.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        method, path = scope["method"], scope["path"]
        try:
            if self.api_key and path not in _OPEN_PATHS:
                bearer = headers.get("authorization", "")  # what OpenAI's clients send
                bearer = bearer[7:].strip() if bearer[:7].lower() == "bearer " else ""
                key = headers.get("x-api-key") or bearer or ""
                in_url = any(name.lower() in _KEY_QUERY_NAMES
                             for name in QueryParams(scope.get("query_string", b"")).keys())
                if in_url or not secrets.compare_digest(key.encode(), self.api_key.encode()):
                    why = ("an API key in the URL is refused (proxies and access logs keep URLs); send it in the "
                           "X-API-Key header" if in_url else "missing or wrong API key; send it as X-API-Key")
                    log.warning("%s %s refused: %s", method, path, "key in the URL" if in_url else
                                "missing or wrong API key")
                    body = {"error": {"message": why}, "request_id": rid}
                    if path.startswith("/v1/"):  # the OpenAI API answers in OpenAI's error shape
                        message = (why.replace("X-API-Key header", "Authorization: Bearer <key> header") if in_url
                                   else "missing or wrong API key; send it as Authorization: Bearer <key>")
                        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                          "code": "invalid_api_key"}}
                    refused = JSONResponse(body, status_code=401, headers={"X-Request-ID": rid})
                    await refused(scope, receive, send)
                    return
            status = []

            async def send_with_id(message):
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message)["X-Request-ID"] = rid
                    status.append(message["status"])
                await send(message)

            await self.app(scope, receive, send_with_id)
            log.info("%s %s -> %s", method, path, status[0] if status else "-")
        finally:
            _REQUEST_ID.reset(token)


def app_error(status: int, message: str) -> bytes:
    """The app's error body for the edge's 413 and 503 (the request id is in the X-Request-ID header)."""
    return json.dumps({"error": {"message": message}, "request_id": _REQUEST_ID.get()}).encode()


def openai_error(status: int, message: str) -> bytes:
    """OpenAI's error body, for /v1/ paths."""
    kind = "invalid_request_error" if status == 413 else "server_error"
    code = "request_too_large" if status == 413 else None
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def configure_logging() -> None:
    """Log lines with the request id, on stderr (once, however often it is called)."""
    if any(isinstance(f, _RequestIdFilter) for h in log.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    handler.addFilter(_RequestIdFilter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
