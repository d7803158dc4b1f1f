"""The demo web app and JSON API: a FastAPI app over the registered models and, when there is one, the index.

The models are loaded in-process once, at start (serving.loading); every route asks the one
embedding service (serving.service.EmbeddingService), which chains the same functions the pyfunc
models, the CLI and Spark use. Each endpoint needs only what it uses: /embeddings the text and image
models, /classify the classifier, /search and thumbnails the index; without one of them, that
endpoint answers a JSON error saying how to make it. Around the routes: serving.middleware (request
ids, the API key, the log format), serving.forms (fields within the limits, refusals) and
serving.edge (the body limit, health, /metrics).
"""


import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from clip_pyfunc.errors import InvalidInput, Overloaded, Unavailable
from clip_pyfunc.serving.forms import Refused, body_limits, int_field, known_fields, one_image, read_form, refusal
from clip_pyfunc.serving.loading import Loaded, load
from clip_pyfunc.serving.middleware import RequestContext, app_error, configure_logging, openai_error
from clip_pyfunc.settings import AppConfig, ServeConfig

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
MAX_K = 1000  # results per query
log = logging.getLogger("clip_pyfunc.serving.app")

__all__ = ["Follow", "Loaded", "configure_logging", "create_app", "load", "run"]


@dataclass(frozen=True)
class Follow:
    """How the app follows its alias (serving.follow): what the alias names now, and how to load that.

    Attributes:
        resolve: Returns promotion.Live for the app's alias (registry reads only).
        load: Loads a `Loaded` for a promotion.Live (its pinned models and collection), given the `Loaded`
            serving now, whose open store it reuses when the collection is the same (an embedded store
            opens once per process).
        serving: The promotion.Live the first `Loaded` was loaded from.
        seconds: Seconds between looks (app.follow_seconds); 0: only on POST /admin/reload.
    """

    resolve: Callable[[], Any]
    load: Callable[[Any, Loaded], Loaded]
    serving: Any
    seconds: float = 0.0


def create_app(loaded: Loaded, config: AppConfig, serve: ServeConfig | None = None, follow: Follow | None = None):
    """The FastAPI app: the page, /health, /embeddings, /classify, /search and item thumbnails, and
    /metrics, the body limit and health failures of serving.edge (the `serve` settings). With `follow`,
    it also loads what its alias names after a promotion and swaps it in (serving.follow), on a timer
    and on POST /admin/reload."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from mlflow.exceptions import MlflowException
    from starlette.concurrency import run_in_threadpool  # model calls block: keep them off the event loop

    from clip_pyfunc.serving.edge import Edge, Lifecycle
    from clip_pyfunc.serving.metrics import Health, Metrics, watch
    from clip_pyfunc.serving.serve import serving_limits, warm_up

    from clip_pyfunc.serving.service import EmbeddingService

    from clip_pyfunc.serving.follow import Current, Follower

    serve = serve or ServeConfig()
    lifecycle = Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        """From SIGTERM on, /health answers 503 (uvicorn's own handler is installed by now); the follower
        looks at the registry while the app runs."""
        lifecycle.drain_on_sigterm()
        if follower is not None:
            follower.start()
        yield
        if follower is not None:
            follower.stop()

    app = FastAPI(title="clip-pyfunc", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    metrics = Metrics() if serve.metrics else None
    health = Health(serve.unhealthy_after, metrics)

    def prepare(loaded: Loaded) -> EmbeddingService:
        """Warm up and watch the loaded models; the service the routes ask (never a model)."""
        for kind in ("text", "image", "classifier"):
            if getattr(loaded, kind) is not None:
                if serve.warmup:
                    warm_up(getattr(loaded, kind))  # before metrics watch it: its forwards are not requests
                watch(getattr(loaded, kind).unwrap_python_model(), metrics, health, kind, serving_limits(serve))
        return EmbeddingService(loaded)

    def store_of(loaded: Loaded):
        return None if loaded.searcher is None else loaded.searcher.store

    def retire(service: EmbeddingService) -> None:
        """A swapped-out pair whose last request is done: its engines leave health, its store closes unless the
        pair serving now shares it (a promotion that kept the collection)."""
        for engine in service.engines():
            if engine in health.engines:
                health.engines.remove(engine)
        store = store_of(service.loaded)
        if store is not None and all(store is not store_of(s.loaded) for s in current.services()):
            store.close()  # no service that serves or still finishes requests shares it

    def build(live) -> EmbeddingService:
        """Load what the alias names beside what serves (reusing its store for the same collection), warm it up."""
        keep = current.service.loaded
        new = follow.load(live, keep)
        try:
            return prepare(new)
        except BaseException:
            # As a swapped-out pair: prepare() may have watched some of its engines, and an embedded store's
            # lock must be free for the next try unless what serves shares the store.
            retire(EmbeddingService(new))
            raise

    current = Current(prepare(loaded), on_retire=retire)
    follower = None if follow is None else Follower(current, follow.resolve, build, follow.seconds,
                                                    serving=follow.serving)
    # Inside the request context: /metrics needs the API key when there is one, and a 413 carries the request id.
    app.add_middleware(Edge, max_body_bytes=serve.max_body_bytes, body_limits=body_limits(config), metrics=metrics,
                       health=health, health_paths=("/health",), paths=_METRIC_PATHS,
                       error_body={"": app_error, "/v1/": openai_error}, model_paths=_MODEL_PATHS,
                       max_requests=serve.request_threads, lifecycle=lifecycle)
    app.add_middleware(RequestContext, api_key=config.api_key)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
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
        body = (json.loads(openai_error(status, str(e))) if request.url.path.startswith("/v1/") else
                {"error": {"message": str(e)}, "request_id": request.state.request_id})
        log.info("unavailable (%s): %s", status, e)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health_endpoint(request: Request):  # not `health`: prepare() and retire() use the Health above
        """Status, the loaded models (as asked, and the versions serving) and what runs them (engine,
        precision, a fallback note), the index (null with `no_index` saying how to make one), and the
        last look at the registry when the app follows its alias."""
        with current.use() as service:
            loaded = service.loaded
            searcher = loaded.searcher
            index = None if searcher is None else {
                "collection": searcher.collection, "alias": searcher.store.alias,
                "points": await run_in_threadpool(searcher.store.count, exact=False),  # a server asks over HTTP
                "space": searcher.space.models}
            return {"status": "ok", "request_id": request.state.request_id, "warning": loaded.warning,
                    "api_key_required": bool(config.api_key),  # the page then shows its key field
                    "models": loaded.uris, "versions": loaded.versions, "index": index, "no_index": loaded.no_index,
                    "runtime": service.runtime(), "no_classifier": loaded.no_classifier,
                    "follow": None if follower is None else {"seconds": follower.interval, **follower.last}}

    @app.post("/admin/reload")
    async def reload(request: Request):
        """Look at the registry now and, when the alias names other models or another collection, load them
        beside the ones serving and swap them in (behind the API key where there is one)."""
        if follower is None:
            raise Refused(404, "this app serves fixed model URIs; start it with `clip-pyfunc app` (by alias) to "
                               "follow promotions")
        result = await run_in_threadpool(follower.check, True)
        if result["error"]:
            raise Refused(409, f"the reload failed, the previous models keep serving: {result['error']}")
        return {**result, "request_id": request.state.request_id}

    @app.post("/embeddings")
    async def embeddings(request: Request):
        """Any mix of image files and text fields; vectors keyed by field name."""
        fields = await read_form(request, config)
        if not fields:
            raise Refused(400, "send at least one form field: image files and/or text fields")
        for name, value in fields.items():
            if not isinstance(value, (str, bytes)):
                raise Refused(400, f"send one text or one file per field, got {type(value).__name__}", name)
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        images = {k: v for k, v in fields.items() if isinstance(v, bytes)}
        out = {}
        with current.use() as service:  # one pair for the whole request, through a swap
            for group, kind in ((texts, "text"), (images, "image")):
                if group:
                    vectors, errors = await run_in_threadpool(service.embed, kind, list(group.values()))
                    names = list(group)
                    if errors:
                        raise Refused(400, errors[0].reason, names[errors[0].row])
                    out.update({name: vectors[i].tolist() for i, name in enumerate(names)})
            served_by = service.served_by()
        return {"embeddings": {name: out[name] for name in fields}, "served_by": served_by,
                "request_id": request.state.request_id}

    @app.post("/classify")
    async def classify(request: Request):
        """One image file (field `image`) -> its top categories from the registered classifier."""
        fields = await read_form(request, config)
        with current.use() as service:
            loaded = service.loaded
            if loaded.classifier is None:
                raise Refused(503, loaded.no_classifier or "no classifier loaded; start the app with --classifier URI")
            image = one_image(fields)  # a missing image is named first, as the thing to send
            known_fields(fields, ("image", "top_k"))
            top_k = int_field(fields, "top_k", 3)
            try:
                labels, scores = await run_in_threadpool(service.classify, image, top_k)
            except MlflowException as e:
                raise refusal(e, "image") from e
        top = [{"label": label, "score": score} for label, score in zip(labels, scores)]
        return {"top_categories": top, "request_id": request.state.request_id}

    @app.post("/search")
    async def search(request: Request):
        """Fields `text`, an image file `image`, or `like` (an item id); `k`, repeated `filter` key=value."""
        fields = await read_form(request, config)
        known_fields(fields, ("text", "image", "like", "k", "filter"))
        query = {name: fields[name] for name in ("text", "image", "like") if name in fields}
        if len(query) != 1:
            raise Refused(400, f"send exactly one of the fields text, image or like; got {sorted(query) or 'none'}")
        k = int_field(fields, "k", 12)
        if k > MAX_K:
            raise Refused(400, f"at most {MAX_K} results per query, got {k}", "k")
        filters = fields.get("filter")
        filters = [filters] if isinstance(filters, str) else filters
        if filters is not None and not (isinstance(filters, list) and all(isinstance(f, str) for f in filters)):
            raise Refused(400, "filters are key=value strings", "filter")
        with current.use() as service:  # the query's model and the collection: one pair, through a swap
            loaded = service.loaded
            if loaded.searcher is None:
                raise Refused(404, loaded.no_index or "no index")
            try:
                hits = await run_in_threadpool(service.search, **query, k=k, filters=filters)
            except (InvalidInput, MlflowException) as e:
                raise refusal(e, next(iter(query))) from e
            served_by = service.served_by()
        for hit in hits:
            hit["thumbnail"] = _thumbnail_url(hit)
        return {"results": hits, "served_by": served_by, "request_id": request.state.request_id}

    @app.get("/items/{item_id:path}/thumbnail")
    async def thumbnail(item_id: str):
        """A small JPEG of an indexed item whose payload has a local `path` (only paths the index holds)."""
        from clip_pyfunc.search.store import ID_KEY

        with current.use() as service:
            loaded = service.loaded
            if loaded.searcher is None:
                raise Refused(404, loaded.no_index or "no index", ID_KEY)
            data = await run_in_threadpool(_thumbnail, loaded.searcher, item_id, service.image_limits)
        return Response(data, media_type="image/jpeg")

    from clip_pyfunc.serving.openai_api import add_routes
    add_routes(app, current, loaded.uris, config)
    app.state.current, app.state.follower = current, follower  # for in-process callers (tests, notebooks)
    return app


_METRIC_PATHS = ("/", "/health", "/admin/reload", "/embeddings", "/classify", "/search", "/v1/embeddings", "/v1/models")
_MODEL_PATHS = ("/embeddings", "/classify", "/search", "/v1/embeddings")  # requests that run a model


def _thumbnail(searcher, item_id: str, limits) -> bytes:
    """Decode an indexed item's file with the image model's own decoder and `limits`; a 160 px JPEG."""
    from clip_pyfunc.stages.decode import open_image
    from clip_pyfunc.search.store import ID_KEY

    found = searcher.store.retrieve([item_id])
    path = (found[0].payload or {}).get("path") if found else None
    if not isinstance(path, str):
        raise Refused(404, f"no indexed item {item_id!r} with a local path", ID_KEY)
    try:
        with open(path.removeprefix("file:"), "rb") as f:
            data = f.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise InvalidInput(f"over {limits.max_bytes} bytes")
        img = open_image(data, limits, draft_edge=320)
    except (OSError, InvalidInput) as e:
        raise Refused(404, f"item {item_id!r}: its image cannot be shown ({e})", ID_KEY) from e
    img.thumbnail((160, 160))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _thumbnail_url(hit: dict) -> str | None:
    from urllib.parse import quote

    url = hit["payload"].get("url")
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return url
    if isinstance(hit["payload"].get("path"), str):
        return f"/items/{quote(str(hit['id']), safe='')}/thumbnail"
    return None


def run(loaded: Loaded, config: AppConfig, serve: ServeConfig | None = None, follow: Follow | None = None) -> None:
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
    served = create_app(loaded, config, serve, follow)
    del loaded  # from here the app holds it, and lets it go when a promotion swaps it out
    uvicorn.run(served, host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=serve.drain_seconds)
