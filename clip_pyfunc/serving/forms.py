"""The app's forms: reading a request's fields (multipart, url-encoded or JSON) within the limits, the
fields each endpoint reads, and the app's refusals (Refused), which its exception handler answers as JSON.

The body's size is the edge's to check (serving.edge.Edge, `body_limits`, set from `body_limits`
here); what is left here is per field: how many, and how big each is.
"""

from __future__ import annotations

from typing import Any

from clip_pyfunc.errors import ForwardStalled, Overloaded, RequestCancelled
from clip_pyfunc.serving.payload import RequestRefused, parse_content_type
from clip_pyfunc.settings import AppConfig

_GUARD_STATUSES = frozenset(kind.http_status for kind in (Overloaded, ForwardStalled, RequestCancelled))
_MULTIPART_HEADERS = 64 * 1024  # room for the parts' own headers beside their data


def body_limits(config: AppConfig) -> dict[str, tuple[int, str]]:
    """The most body bytes per path prefix, for the edge: max_fields fields of max_upload_bytes each (as base64
    for OpenAI's JSON), plus room for the framing."""
    base64_item = -(-config.max_upload_bytes // 3) * 4
    return {"": (config.max_upload_bytes * config.max_fields + _MULTIPART_HEADERS, "max_fields x max_upload_bytes"),
            "/v1/": (base64_item * config.max_fields + _MULTIPART_HEADERS,
                     "max_fields x max_upload_bytes, as base64")}


class Refused(Exception):
    """A request error for the edge to answer as JSON: status, field and message."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def refusal(e: Exception, field: str) -> "Refused":
    """A model's refusal as the app's: MLflow's 429, 503 and 499 (the engine's guards) keep their status,
    the rest (the caller's input) is a 400."""
    status = e.get_http_status_code() if hasattr(e, "get_http_status_code") else 400
    return Refused(status if status in _GUARD_STATUSES else 400, reason(e), field)


def known_fields(fields: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse a field the endpoint does not read (a misspelt `topk` would otherwise be ignored)."""
    if unknown := sorted(set(fields) - set(allowed)):
        raise Refused(400, f"unknown fields {unknown}; this endpoint reads: {', '.join(allowed)}", unknown[0])


async def read_form(request, config: AppConfig) -> dict[str, Any]:
    """Read a multipart (or url-encoded, or JSON) body: {field: str, bytes or [str, ...]} within the limits."""
    try:
        media = parse_content_type(request.headers.get("content-type") or "application/x-www-form-urlencoded")[0]
    except RequestRefused as e:
        raise Refused(e.status, e.message) from e
    if media == "application/json":
        try:
            body = await request.json()
        except ValueError as e:
            raise Refused(400, f"body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise Refused(400, "a JSON body must be an object of fields")
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
        raise Refused(413 if too_many else 400,
                       f"bad form: {message} (limits: {config.max_fields} fields, {config.max_upload_bytes} bytes "
                       "per field; max_fields, max_upload_bytes)") from e
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read(config.max_upload_bytes + 1)
            if len(data) > config.max_upload_bytes:
                raise Refused(413, f"file is over {config.max_upload_bytes} bytes (max_upload_bytes)", name)
            value = data
        if name in fields:  # a repeated field (filter=a=1&filter=b=2) becomes a list
            fields[name] = (fields[name] if isinstance(fields[name], list) else [fields[name]]) + [value]
        else:
            fields[name] = value
    return _limited(fields, config)


def _limited(fields: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    if len(fields) > config.max_fields:
        raise Refused(413, f"{len(fields)} fields, over the limit of {config.max_fields} (max_fields)")
    for name, value in fields.items():
        if isinstance(value, (str, bytes)) and len(value) > config.max_upload_bytes:
            raise Refused(413, f"field is over {config.max_upload_bytes} bytes (max_upload_bytes)", name)
    return fields


def one_image(fields: dict[str, Any]) -> bytes | str:
    image = fields.get("image")
    if image is None:
        raise Refused(400, f"send the image as a file field 'image'; got fields {sorted(fields)}", "image")
    if not isinstance(image, (bytes, str)):
        raise Refused(400, "send one image", "image")
    return image


def int_field(fields: dict[str, Any], name: str, default: int) -> int:
    value = fields.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool):
        raise Refused(400, f"must be a whole number >= 1, got {str(value)[:40]!r}", name)
    return number


def reason(e: Exception) -> str:
    return getattr(e, "message", None) or str(e)
