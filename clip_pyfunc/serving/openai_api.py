"""OpenAI's embeddings API over the app's text and image models: `POST /v1/embeddings` and `GET /v1/models`.

An edge like the rest of the app: it reads the request, sorts each input into text or image, and
asks the app's embedding service (serving.service), which calls the loaded models' own `embed_rows`;
it decodes nothing itself. Clients written for OpenAI
(the `openai` Python client with `base_url=".../v1"`, LangChain, LlamaIndex) then get this
model's vectors. Both towers share one embedding space, so one request may mix texts and images:

- a string starting with `data:image/` (a data URL, `data:image/jpeg;base64,...`) is an image;
- an `https://` or `http://` URL is an image when the image model fetches URLs (its model_config's
  `allow_urls`; the model's own fetch then applies `allow_http` and its address checks), and a text
  otherwise, as OpenAI would take it;
- every other string is a text.

`model` names the pair of models the app serves, by any of the names `accepted_names` lists (the
registered name of the text or the image model, `name@alias`, the alias, or the model URI); it
does not choose a tower, the kind of each input does. Errors answer in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, the message naming the bad item as `input[i]`;
the request id travels in the `X-Request-ID` header only (the `openai` client reads it from there),
so that bodies keep OpenAI's shape.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`request: Request`,
# imported inside add_routes) at registration, and a string it cannot resolve would become a query parameter.
import base64
import json
import logging
from typing import Any

# A child of the app's logger: its lines carry the request id and go where the app's go.
log = logging.getLogger("clip_pyfunc.serving.app.openai")
_ENCODINGS = ("float", "base64")
_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")  # what OpenAI's embeddings API takes
_IMAGE_PREFIX = "data:image/"
_URL_PREFIXES = ("https://", "http://")
_DATA_URL_HEADER = 256  # characters allowed for `data:image/<type>;base64,` on top of the base64 itself


class OpenAIError(Exception):
    """A request refused in OpenAI's error shape: HTTP status, message, the bad parameter and a short code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI answers errors with."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def accepted_names(uris: dict[str, str | None]) -> list[str]:
    """The names `model` may take: for each of the text and image URIs, `models:/NAME@ALIAS` gives NAME,
    NAME@ALIAS, ALIAS and the URI; `models:/NAME/VERSION` gives NAME, NAME/VERSION and the URI; any other
    URI (runs:/..., a path) only itself. In that order, text first, without repeats."""
    names: list[str] = []
    for kind in ("text", "image"):
        uri = uris.get(kind)
        if not uri:
            continue
        ref = uri.removeprefix("models:/") if uri.startswith("models:/") else None
        if ref and "@" in ref:
            name, alias = ref.split("@", 1)
            names += [name, ref, alias]
        elif ref and "/" in ref:
            names += [ref.split("/", 1)[0], ref]
        names.append(uri)
    return list(dict.fromkeys(names))


def input_kind(value: str, urls_on: bool) -> str:
    """"image" for a data URL (`data:image/...`), and for an http(s) URL when the image model fetches
    URLs; "text" for everything else."""
    head = value[:16].lstrip().lower()
    if head.startswith(_IMAGE_PREFIX) or (urls_on and head.startswith(_URL_PREFIXES)):
        return "image"
    return "text"


def encode_vector(vector, encoding_format: str):
    """One embedding as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def add_routes(app, current, uris: dict[str, str | None], config) -> None:
    """Register `POST /v1/embeddings`, `GET /v1/models` and the handler of their errors on the app.

    Usage counts the tokens the text tower reads for each text (special tokens included, after
    truncation to the context length), from the text model's own tokenizer; images count 0. The body
    may hold as many images as a multipart `/embeddings` request, now base64-encoded:
    `max_fields` x `max_upload_bytes` x 4/3 plus 64 KiB of JSON (the edge answers 413 over it, serving.forms.body_limits); each item, text or
    data URL, to `max_upload_bytes` x 4/3 characters (one upload's base64; 413), and a request to the
    text model's `max_rows` items (400).

    Args:
        app: The FastAPI app (serving.app.create_app).
        current: The app's serving.follow.Current: each request asks the EmbeddingService it holds at its start
            (the routes ask it, never a model).
        uris: The loaded models' URIs ({"text", "image", ...}), for the names `model` accepts.
        config: The app's settings (settings.AppConfig): max_upload_bytes, max_fields.
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool  # model calls block: keep them off the event loop

    names = accepted_names(uris)
    item_limit = -(-config.max_upload_bytes // 3) * 4  # base64 of max_upload_bytes

    @app.exception_handler(OpenAIError)
    async def refused(request: Request, e: OpenAIError):
        log.info("refused %s: %s", e.param or "-", e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/v1/models")
    async def models():
        """OpenAI's model list: every name `model` accepts (one pair of models behind them all)."""
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "clip-pyfunc"} for name in names]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        """OpenAI's embeddings: `model`, `input` (a string or a list of strings: texts, data-URL images),
        `encoding_format` ("float" or "base64"), `dimensions` (the model's own or absent), `user` (ignored)."""
        body = await _json_body(request)
        if unknown := sorted(set(body) - set(_FIELDS)):  # OpenAI's own API refuses them too
            raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}; this endpoint "
                                   f"reads {', '.join(_FIELDS)}", unknown[0], "unknown_parameter")
        model = _model(body, names)
        encoding_format = _encoding_format(body)
        with current.use() as service:  # one pair for the whole request, through a swap
            urls_on = service.urls_on
            _check_dimensions(body, service.embedding_dim)
            values = _inputs(body, service.max_items, item_limit)
            kinds = [input_kind(v, urls_on) for v in values]
            vectors: list[Any] = [None] * len(values)
            tokens = 0
            for kind in ("image", "text"):  # images fail more often: first
                rows = [i for i, k in enumerate(kinds) if k == kind]
                if rows:
                    got, counted = await run_in_threadpool(_embed, service, [values[i] for i in rows], rows, kind,
                                                            urls_on)
                    tokens += counted
                    for row, vector in zip(rows, got):
                        vectors[row] = encode_vector(vector, encoding_format)
        return {"object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _embed(service, values: list[str], rows: list[int], kind: str, urls_on: bool):
    """(float32 vectors, tokens read) of one tower's inputs, `rows` their places in `input`.

    Raises:
        OpenAIError: 400 naming the first item the model refused as `input[i]` (and how many more), or
            the model's refusal of the request as a whole.
    """
    from mlflow.exceptions import MlflowException

    from clip_pyfunc.errors import InvalidInput

    try:
        vectors, errors = service.embed(kind, values)
        tokens = service.count_tokens(values) if kind == "text" and not errors else 0
    except (InvalidInput, MlflowException) as e:
        raise OpenAIError(400, f"the {kind} model refused the input: {getattr(e, 'message', None) or e}",
                          "input", "invalid_input") from e
    if errors:
        more = f" (and {len(errors) - 1} more bad items)" if len(errors) > 1 else ""
        raise OpenAIError(400, f"input[{rows[errors[0].row]}] ({kind}): {errors[0].reason}{more}; "
                               f"{_allowed(urls_on)}", "input", "invalid_input")
    return vectors, tokens


def _allowed(urls_on: bool) -> str:
    urls = ", or an http(s) image URL" if urls_on else ""
    return f"each item is a text, or an image as a data URL 'data:image/<type>;base64,<data>'{urls}"


async def _json_body(request) -> dict[str, Any]:
    """The request's JSON object (its size was checked by the edge: serving.forms.body_limits).

    Raises:
        OpenAIError: 400 when the body is not JSON or not an object.
    """
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise OpenAIError(400, f"body is not valid JSON ({e}); send a JSON object with model and input", None,
                          "invalid_json") from e
    if not isinstance(body, dict):
        raise OpenAIError(400, f"body must be a JSON object with model and input, got {type(body).__name__}", None,
                          "invalid_json")
    return body


def _model(body: dict[str, Any], names: list[str]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, f"model must be a string, one of {names}", "model", None)
    if model not in names:
        raise OpenAIError(404, f"the model {model[:100]!r} does not exist here; use one of {names}", "model",
                          "model_not_found")
    return model


def _encoding_format(body: dict[str, Any]) -> str:
    value = body.get("encoding_format")
    if value is None:
        return "float"
    if value not in _ENCODINGS:
        raise OpenAIError(400, f"encoding_format must be one of {list(_ENCODINGS)}, got {str(value)[:40]!r}",
                          "encoding_format", None)
    return value


def _check_dimensions(body: dict[str, Any], dim: int) -> None:
    value = body.get("dimensions")
    if value is None or (value == dim and isinstance(value, int) and not isinstance(value, bool)):
        return
    raise OpenAIError(400, f"dimensions must be {dim}, the model's own, or left out: its vectors cannot be "
                           f"shortened, got {str(value)[:40]!r}", "dimensions", None)


def _inputs(body: dict[str, Any], max_items: int, item_limit: int) -> list[str]:
    """`input` as a list of strings, checked for type, count and size.

    Raises:
        OpenAIError: 400 when missing, empty, not a string or list of strings (token ids included) or over
            `max_items`; 413 for an item over `item_limit` characters.
    """
    value = body.get("input")
    if value is None or value == "" or value == []:
        raise OpenAIError(400, "input is missing or empty; send a string or a list of strings (texts, or images "
                               "as data URLs)", "input", None)
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise OpenAIError(400, f"input must be a string or a list of strings, got {type(value).__name__}", "input",
                          None)
    if len(values) > max_items:
        raise OpenAIError(400, f"input has {len(values)} items, over the limit of {max_items} (max_rows)", "input",
                          "too_many_inputs")
    for i, item in enumerate(values):
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise OpenAIError(400, f"input[{i}] is {'a list' if isinstance(item, list) else 'a number'}: token-id "
                                   "arrays are not supported; send strings (texts, or images as data URLs)", "input",
                              "token_ids_not_supported")
        if not isinstance(item, str):
            raise OpenAIError(400, f"input[{i}] is {type(item).__name__}; send strings (texts, or images as data "
                                   "URLs)", "input", None)
        if len(item) > item_limit + _DATA_URL_HEADER:
            raise OpenAIError(413, f"input[{i}] is {len(item)} characters, over the limit of {item_limit} "
                                   "(max_upload_bytes, as base64 for an image)", "input", "input_too_large")
    return values
