"""The demo web app and JSON API: a FastAPI edge over the registered models and, when there is one, the index.

The models are loaded in-process once, at start; every endpoint chains the same functions the
pyfunc models, the CLI and Spark use (`embed_rows`, the classifier's `predict`, `search.query.Searcher`).
Each endpoint needs only what it uses: /embeddings the text and image models, /classify the
classifier, /search and thumbnails the index; without one of them, that endpoint answers a JSON
error saying how to make it. Each response carries `request_id`, the client's `X-Request-ID` (or
`request_id`) header or a new UUID, and so does every log line written while answering it.
"""


import contextlib
import contextvars
import io
import json
import logging
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from clip_pyfunc.artifacts.checkpoint import weights_caveat
from clip_pyfunc.errors import ForwardStalled, InvalidInput, Overloaded, RequestCancelled, Unavailable
from clip_pyfunc.serving.payload import RequestRefused, parse_content_type
from clip_pyfunc.settings import AppConfig, IndexConfig, ServeConfig

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
_REQUEST_ID = contextvars.ContextVar("request_id", default="-")
_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_HEADERS = ("x-request-id", "request_id")  # clip_syte's clients send `request_id`
_OPEN_PATHS = ("/", "/health")  # the page itself asks for the key; health checks need none
_KEY_QUERY_NAMES = ("key", "api_key", "apikey", "api-key", "token", "access_token")  # refused in a URL
MAX_K = 1000  # results per query
log = logging.getLogger("clip_pyfunc.serving.app")


class _RequestIdFilter(logging.Filter):
    def filter(self, record):
        record.request_id = _REQUEST_ID.get()
        return True


@dataclass
class Loaded:
    """What the app serves, loaded once: the text and image models, and the classifier and index when present."""

    text: Any
    image: Any
    classifier: Any  # None: /classify answers 503 with `no_classifier`
    searcher: Any  # search.query.Searcher, or None: /search answers 404 with `no_index`
    warning: str | None = None  # toy or random weights: said on the page and in /health
    uris: dict[str, str | None] = field(default_factory=dict)  # {"text", "image", "classifier"}
    no_index: str | None = None  # why there is no index, and how to make one
    no_classifier: str | None = None  # why there is no classifier, and how to register one


def load(text_uri: str, image_uri: str, classifier_uri: str | None = None, *, classifier_required: bool = True,
         index: IndexConfig | None = None) -> Loaded:
    """Load the text and image models, the classifier and the index (each once), for `create_app`.

    Args:
        text_uri: The text model (e.g. models:/clip_text_embedding@champion).
        image_uri: The image model of the same embedding space (the same checkpoint).
        classifier_uri: The zero-shot classifier; None runs without /classify.
        classifier_required: False: a classifier the registry does not hold is left out (a warning)
            instead of stopping the app.
        index: Where the index is; None, no store folder, or no such collection runs without
            /search. A collection is opened only when its embedding space is the models'.

    Raises:
        ModelLoadError: A model cannot be found or loaded, or the text and image models are of different
            embedding spaces.
        IndexRefused: The collection holds another embedding space, or the index is locked by
            another process or its server cannot be reached.
    """
    from clip_pyfunc.registry.lookup import load_model, model_info, require_same_space
    from clip_pyfunc.search.query import Searcher

    store, no_index = _open_index(index)  # first: a locked store or an unreachable server fails at once
    try:
        infos = {"text": model_info(text_uri, "text model"), "image": model_info(image_uri, "image model")}
        require_same_space(infos["text"], infos["image"], text_uri, image_uri)
        found, no_classifier = _find_classifier(classifier_uri, classifier_required)
        if store is not None and (no_index := _check_collection(store, infos)):
            store.close()  # no collection: leave the folder free for `clip-pyfunc index`
            store = None
        text = load_model(text_uri, "text model")  # every URI and the index checked before any model loads
        image = load_model(image_uri, "image model")
        classifier = load_model(found, "classifier") if found else None
        searcher = None if store is None else Searcher(store, text_model=text, image_model=image)
    except BaseException:
        if store is not None:
            store.close()
        raise
    # Said once the app will start, not before an error that stops it.
    for asked, missing, why in ((index, searcher is None, no_index),
                                (classifier_uri, classifier is None, no_classifier)):
        if asked and missing:
            log.warning("%s", why)
    metadata = image.metadata.metadata or {}
    caveat = weights_caveat(random_init=metadata.get("random_init"), toy=metadata.get("toy_checkpoint"))
    warning = f"{caveat[0].capitalize()}: {caveat[1]}." if caveat else None
    return Loaded(text=text, image=image, classifier=classifier, searcher=searcher, warning=warning,
                  uris={"text": text_uri, "image": image_uri, "classifier": found},
                  no_index=no_index, no_classifier=no_classifier)


def _open_index(index: IndexConfig | None) -> tuple[Any, str | None]:
    """(the index's store, or None; why there is none).

    Raises:
        IndexRefused: The embedded store is in use by another process, or the server cannot be reached.
    """
    from clip_pyfunc.search.store import NoIndex, open_store

    if index is None:
        return None, "no index: the app was started with --no-index; restart it without"
    try:
        return open_store(index, must_exist=True), None
    except NoIndex as e:
        return None, f"{e}, then restart the app"


def _check_collection(store, infos: dict) -> str | None:
    """None when the collection holds the models' embedding space; why there is no index when it does not exist.

    Raises:
        IndexRefused: The collection holds another embedding space.
    """
    from clip_pyfunc.search.index import require_space
    from clip_pyfunc.search.store import IndexRefused, NoIndex

    try:
        space = store.space()
    except NoIndex as e:
        return f"{e}, then restart the app"
    for kind, info in infos.items():
        try:
            require_space(space, store.collection, kind, info)
        except IndexRefused as e:
            raise IndexRefused(f"{e}; or start the app with --text-name/--image-name/--alias naming the "
                               "collection's models, or with --no-index") from e
    return None


def _find_classifier(uri: str | None, required: bool) -> tuple[str | None, str | None]:
    """(the classifier's URI or None, why there is none); one the registry lacks is left out unless `required`."""
    from mlflow.exceptions import ErrorCode, MlflowException

    from clip_pyfunc.errors import ModelLoadError
    from clip_pyfunc.registry.lookup import model_info

    if not uri:
        return None, "no classifier: the app was started with --no-classifier"
    try:
        model_info(uri, "classifier")
        return uri, None
    except ModelLoadError as e:
        cause = e.__cause__
        missing = isinstance(cause, MlflowException) and cause.error_code == ErrorCode.Name(
            ErrorCode.RESOURCE_DOES_NOT_EXIST)
        if required or not missing:
            raise
    return None, (f"no classifier {uri} in the registry: register one with `clip-pyfunc register-classifier`, or "
                  "start the app with --classifier URI")


class _Refused(Exception):
    """A request error for the edge to answer as JSON: status, field and message."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class _RequestContext:
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


def create_app(loaded: Loaded, config: AppConfig, serve: ServeConfig | None = None):
    """The FastAPI app: the page, /health, /embeddings, /classify, /search and item thumbnails, and
    /metrics, the body limit and health failures of serving.edge (the `serve` settings)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from mlflow.exceptions import MlflowException
    from starlette.concurrency import run_in_threadpool  # model calls block: keep them off the event loop

    from clip_pyfunc.serving.edge import Edge, Lifecycle
    from clip_pyfunc.serving.metrics import Health, Metrics, watch
    from clip_pyfunc.serving.serve import serving_limits, warm_up

    from clip_pyfunc.serving.service import EmbeddingService

    serve = serve or ServeConfig()
    service = EmbeddingService(loaded)  # the routes ask it, never a model
    lifecycle = Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        """From SIGTERM on, /health answers 503 (uvicorn's own handler is installed by now)."""
        lifecycle.drain_on_sigterm()
        yield

    app = FastAPI(title="clip-pyfunc", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    metrics = Metrics() if serve.metrics else None
    health = Health(serve.unhealthy_after, metrics)
    for kind in ("text", "image", "classifier"):
        if getattr(loaded, kind) is not None:
            if serve.warmup:
                warm_up(getattr(loaded, kind))  # before metrics watch it: its forwards are not requests
            watch(getattr(loaded, kind).unwrap_python_model(), metrics, health, kind, serving_limits(serve))
    # Inside the request context: /metrics needs the API key when there is one, and a 413 carries the request id.
    app.add_middleware(Edge, max_body_bytes=serve.max_body_bytes, metrics=metrics, health=health,
                       health_paths=("/health",), paths=_METRIC_PATHS,
                       error_body={"": _app_error, "/v1/": _openai_error}, model_paths=_MODEL_PATHS,
                       max_requests=serve.request_threads, lifecycle=lifecycle)
    app.add_middleware(_RequestContext, api_key=config.api_key)

    @app.exception_handler(_Refused)
    async def refused(request: Request, e: _Refused):
        body = {"error": {"message": e.message, **({"field": e.field} if e.field else {})},
                "request_id": request.state.request_id}
        log.info("refused %s: %s", e.field or "-", e.message)
        return JSONResponse(body, status_code=e.status)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, e: Unavailable):
        """The engine's guards (runtime.batching): 429 with Retry-After, 503 for a stuck forward, 499 for a
        request whose client is gone."""
        status = e.http_status
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, Overloaded) else {}
        body = (json.loads(_openai_error(status, str(e))) if request.url.path.startswith("/v1/") else
                {"error": {"message": str(e)}, "request_id": request.state.request_id})
        log.info("unavailable (%s): %s", status, e)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health(request: Request):
        """Status, the loaded models and what runs them (engine, precision, a fallback note), and the index
        (null with `no_index` saying how to make one)."""
        searcher = loaded.searcher
        index = None if searcher is None else {
            "collection": searcher.collection,
            "points": await run_in_threadpool(searcher.store.count, exact=False),  # a server store asks over HTTP
            "space": searcher.space.models}
        return {"status": "ok", "request_id": request.state.request_id, "warning": loaded.warning,
                "api_key_required": bool(config.api_key),  # the page then shows its key field
                "models": loaded.uris, "index": index, "no_index": loaded.no_index,
                "runtime": service.runtime(), "no_classifier": loaded.no_classifier}

    @app.post("/embeddings")
    async def embeddings(request: Request):
        """Any mix of image files and text fields; vectors keyed by field name."""
        fields = await _form(request, config)
        if not fields:
            raise _Refused(400, "send at least one form field: image files and/or text fields")
        for name, value in fields.items():
            if not isinstance(value, (str, bytes)):
                raise _Refused(400, f"send one text or one file per field, got {type(value).__name__}", name)
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        images = {k: v for k, v in fields.items() if isinstance(v, bytes)}
        out = {}
        for group, kind in ((texts, "text"), (images, "image")):
            if group:
                vectors, errors = await run_in_threadpool(service.embed, kind, list(group.values()))
                names = list(group)
                if errors:
                    raise _Refused(400, errors[0].reason, names[errors[0].row])
                out.update({name: vectors[i].tolist() for i, name in enumerate(names)})
        return {"embeddings": {name: out[name] for name in fields}, "request_id": request.state.request_id}

    @app.post("/classify")
    async def classify(request: Request):
        """One image file (field `image`) -> its top categories from the registered classifier."""
        if loaded.classifier is None:
            raise _Refused(503, loaded.no_classifier or "no classifier loaded; start the app with --classifier URI")
        fields = await _form(request, config)
        image = _one_image(fields)  # a missing image is named first, as the thing to send
        _known_fields(fields, ("image", "top_k"))
        top_k = _int_field(fields, "top_k", 3)
        try:
            labels, scores = await run_in_threadpool(service.classify, image, top_k)
        except MlflowException as e:
            raise _refusal(e, "image") from e
        top = [{"label": label, "score": score} for label, score in zip(labels, scores)]
        return {"top_categories": top, "request_id": request.state.request_id}

    @app.post("/search")
    async def search(request: Request):
        """Fields `text`, an image file `image`, or `like` (an item id); `k`, repeated `filter` key=value."""
        if loaded.searcher is None:
            raise _Refused(404, loaded.no_index or "no index")
        fields = await _form(request, config)
        _known_fields(fields, ("text", "image", "like", "k", "filter"))
        query = {name: fields[name] for name in ("text", "image", "like") if name in fields}
        if len(query) != 1:
            raise _Refused(400, f"send exactly one of the fields text, image or like; got {sorted(query) or 'none'}")
        k = _int_field(fields, "k", 12)
        if k > MAX_K:
            raise _Refused(400, f"at most {MAX_K} results per query, got {k}", "k")
        filters = fields.get("filter")
        filters = [filters] if isinstance(filters, str) else filters
        if filters is not None and not (isinstance(filters, list) and all(isinstance(f, str) for f in filters)):
            raise _Refused(400, "filters are key=value strings", "filter")
        try:
            hits = await run_in_threadpool(service.search, **query, k=k, filters=filters)
        except (InvalidInput, MlflowException) as e:
            raise _refusal(e, next(iter(query))) from e
        for hit in hits:
            hit["thumbnail"] = _thumbnail_url(hit)
        return {"results": hits, "request_id": request.state.request_id}

    @app.get("/items/{item_id:path}/thumbnail")
    async def thumbnail(item_id: str):
        """A small JPEG of an indexed item whose payload has a local `path` (only paths the index holds)."""
        from clip_pyfunc.search.store import ID_KEY

        if loaded.searcher is None:
            raise _Refused(404, loaded.no_index or "no index", ID_KEY)
        data = await run_in_threadpool(_thumbnail, loaded.searcher, item_id, service.image_limits)
        return Response(data, media_type="image/jpeg")

    from clip_pyfunc.serving.openai_api import add_routes
    add_routes(app, service, loaded.uris, config)
    return app


_METRIC_PATHS = ("/", "/health", "/embeddings", "/classify", "/search", "/v1/embeddings", "/v1/models")
_MODEL_PATHS = ("/embeddings", "/classify", "/search", "/v1/embeddings")  # requests that run a model
_GUARD_STATUSES = frozenset(kind.http_status for kind in (Overloaded, ForwardStalled, RequestCancelled))


def _refusal(e: Exception, field: str) -> "_Refused":
    """A model's refusal as the app's: MLflow's 429, 503 and 499 (the engine's guards) keep their status,
    the rest (the caller's input) is a 400."""
    status = e.get_http_status_code() if hasattr(e, "get_http_status_code") else 400
    return _Refused(status if status in _GUARD_STATUSES else 400, _reason(e), field)


def _known_fields(fields: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse a field the endpoint does not read (a misspelt `topk` would otherwise be ignored)."""
    if unknown := sorted(set(fields) - set(allowed)):
        raise _Refused(400, f"unknown fields {unknown}; this endpoint reads: {', '.join(allowed)}", unknown[0])


def _app_error(status: int, message: str) -> bytes:
    """The app's error body for the edge's 413 and 503 (the request id is in the X-Request-ID header)."""
    import json

    return json.dumps({"error": {"message": message}, "request_id": _REQUEST_ID.get()}).encode()


def _openai_error(status: int, message: str) -> bytes:
    """OpenAI's error body, for /v1/ paths."""
    import json

    kind = "invalid_request_error" if status == 413 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


def _thumbnail(searcher, item_id: str, limits) -> bytes:
    """Decode an indexed item's file with the image model's own decoder and `limits`; a 160 px JPEG."""
    from clip_pyfunc.stages.decode import open_image
    from clip_pyfunc.search.store import ID_KEY

    found = searcher.store.retrieve([item_id])
    path = (found[0].payload or {}).get("path") if found else None
    if not isinstance(path, str):
        raise _Refused(404, f"no indexed item {item_id!r} with a local path", ID_KEY)
    try:
        with open(path.removeprefix("file:"), "rb") as f:
            data = f.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise InvalidInput(f"over {limits.max_bytes} bytes")
        img = open_image(data, limits, draft_edge=320)
    except (OSError, InvalidInput) as e:
        raise _Refused(404, f"item {item_id!r}: its image cannot be shown ({e})", ID_KEY) from e
    img.thumbnail((160, 160))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


async def _body(request, limit: int) -> None:
    """Read the body, at most `limit` bytes whatever the headers say (chunked uploads included)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(413, f"request is over {limit} bytes (max_fields x max_upload_bytes)")
        chunks.append(chunk)
    request._body = b"".join(chunks)  # starlette's form and json parsers read this cached body


async def _form(request, config: AppConfig) -> dict[str, Any]:
    """Read a multipart (or url-encoded, or JSON) body: {field: str, bytes or [str, ...]} within the limits."""
    length = request.headers.get("content-length", "")
    limit = config.max_upload_bytes * config.max_fields + 64 * 1024  # + multipart headers
    if length.isdigit() and int(length) > limit:
        raise _Refused(413, f"request is {length} bytes, over {config.max_fields} fields x "
                            f"{config.max_upload_bytes} bytes (max_fields, max_upload_bytes)")
    await _body(request, limit)
    try:
        media = parse_content_type(request.headers.get("content-type") or "application/x-www-form-urlencoded")[0]
    except RequestRefused as e:
        raise _Refused(e.status, e.message) from e
    if media == "application/json":
        try:
            body = await request.json()
        except ValueError as e:
            raise _Refused(400, f"body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise _Refused(400, "a JSON body must be an object of fields")
        return _limited(body, config)
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=config.max_fields, max_fields=config.max_fields,
                                  max_part_size=config.max_upload_bytes)
    except (MultiPartException, HTTPException) as e:  # starlette wraps its parser's errors in a 400
        message = getattr(e, "detail", None) or str(e)
        too_many = "exceed" in message.lower() or "too many" in message.lower()
        raise _Refused(413 if too_many else 400,
                       f"bad form: {message} (limits: {config.max_fields} fields, {config.max_upload_bytes} bytes "
                       "per field; max_fields, max_upload_bytes)") from e
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read(config.max_upload_bytes + 1)
            if len(data) > config.max_upload_bytes:
                raise _Refused(413, f"file is over {config.max_upload_bytes} bytes (max_upload_bytes)", name)
            value = data
        if name in fields:  # a repeated field (filter=a=1&filter=b=2) becomes a list
            fields[name] = (fields[name] if isinstance(fields[name], list) else [fields[name]]) + [value]
        else:
            fields[name] = value
    return _limited(fields, config)


def _limited(fields: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    if len(fields) > config.max_fields:
        raise _Refused(413, f"{len(fields)} fields, over the limit of {config.max_fields} (max_fields)")
    for name, value in fields.items():
        if isinstance(value, (str, bytes)) and len(value) > config.max_upload_bytes:
            raise _Refused(413, f"field is over {config.max_upload_bytes} bytes (max_upload_bytes)", name)
    return fields


def _one_image(fields: dict[str, Any]) -> bytes | str:
    image = fields.get("image")
    if image is None:
        raise _Refused(400, f"send the image as a file field 'image'; got fields {sorted(fields)}", "image")
    if not isinstance(image, (bytes, str)):
        raise _Refused(400, "send one image", "image")
    return image


def _int_field(fields: dict[str, Any], name: str, default: int) -> int:
    value = fields.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool):
        raise _Refused(400, f"must be a whole number >= 1, got {str(value)[:40]!r}", name)
    return number


def _reason(e: Exception) -> str:
    return getattr(e, "message", None) or str(e)


def _thumbnail_url(hit: dict) -> str | None:
    from urllib.parse import quote

    url = hit["payload"].get("url")
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return url
    if isinstance(hit["payload"].get("path"), str):
        return f"/items/{quote(str(hit['id']), safe='')}/thumbnail"
    return None


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


def run(loaded: Loaded, config: AppConfig, serve: ServeConfig | None = None) -> None:
    """Serve the app with uvicorn on config.host:port (a warning when that is not loopback)."""
    import ipaddress

    import uvicorn

    configure_logging()
    try:
        loopback = config.host == "localhost" or ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning("binding %s: the app is reachable from the network%s", config.host,
                    "" if config.api_key else " and has no API key (--api-key)")
    serve = serve or ServeConfig()
    from clip_pyfunc.serving.metrics import clear_multiprocess_dir

    clear_multiprocess_dir()  # what an earlier run left there is not this run's
    uvicorn.run(create_app(loaded, config, serve), host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=serve.drain_seconds)
