"""The package's exceptions: what the caller sent versus what the operator configured."""

from __future__ import annotations

_PREVIEW_CHARS = 40


def preview(value: object, limit: int = _PREVIEW_CHARS) -> str:
    """Return a short, printable copy of a bad value for an error message."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[: limit // 2])
        text = f"b'{raw.hex()}'" + ("..." if len(value) > limit // 2 else "")
        return f"{text} ({len(value)} bytes)"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class ClipPyfuncError(Exception):
    """Base class of every error clip-pyfunc raises on purpose."""


# What kind of bad input an InvalidInput is, for metrics (serving.metrics counts bad rows by kind).
BAD_KINDS = ("null", "type", "empty", "base64", "over_limit", "not_an_image", "corrupt_image", "image_shape", "url",
             "request")


class InvalidInput(ClipPyfuncError):
    """What the caller sent cannot be embedded.

    Attributes:
        row: The index of the offending row, or None when the error is not about one row.
        reason: What was wrong, without the row prefix.
        kind: One of BAD_KINDS: null, type (not a string / bytes), empty, base64, over_limit (bytes,
            pixels, tokens, rows), not_an_image (not an allowed format), corrupt_image, image_shape (an image
            too small or odd to preprocess), url (an image URL refused or failed), or request (the request as a
            whole: columns, params, row count).
    """

    def __init__(self, reason: str, row: int | None = None, kind: str = "request"):
        self.row = row
        self.reason = reason
        self.kind = kind
        super().__init__(reason if row is None else f"row {row}: {reason}")

    def at(self, row: int, reason: str | None = None) -> "InvalidInput":
        """The same error (same kind) for another row, optionally with another reason."""
        return InvalidInput(self.reason if reason is None else reason, row, self.kind)


class ModelLoadError(ClipPyfuncError):
    """What the operator configured (checkpoint, device, precision, settings) cannot be loaded."""


class Unavailable(ClipPyfuncError):
    """A served request was not run, for a reason that is neither the caller's input nor a model failure.

    Subclasses say why, and the HTTP status a server answers with (`http_status`: serving edges,
    models.request).
    """

    http_status = 503


class Overloaded(Unavailable):
    """More work is waiting than the server bounds its queue to (HTTP 429).

    Attributes:
        retry_after: Seconds after which the work waiting now should be done (for `Retry-After`).
    """

    http_status = 429

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ForwardStalled(Unavailable):
    """A forward pass has run past its limit: the engine is stuck (HTTP 503)."""


class RequestCancelled(Unavailable):
    """The request's client went away or was answered already (its 504), so its rows were dropped (HTTP 499,
    nginx's "client closed request": nobody reads it)."""

    http_status = 499


class ConfigError(ModelLoadError):
    """A setting the operator wrote (conf/, a flag, a model_config) is not one the package takes.

    A ModelLoadError, so that code catching what the operator configured catches it too.
    """


class EmbedJobError(ClipPyfuncError):
    """A batch job refused its arguments, or to publish its output (bad rows with --fail-on-error)."""


def combine_row_errors(errors: list[InvalidInput], limit: int = 5) -> InvalidInput:
    """Fold several per-row errors into one, naming the first few rows."""
    shown = "; ".join(str(e) for e in errors[:limit])
    more = f"; and {len(errors) - limit} more bad rows" if len(errors) > limit else ""
    rows = len(errors)
    head = "1 bad row" if rows == 1 else f"{rows} bad rows"
    combined = InvalidInput(f"{head}: {shown}{more}", kind=errors[0].kind)
    combined.row = errors[0].row
    return combined


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (for one-line CLI and log errors)."""
    text = " ".join((getattr(e, "message", None) or str(e) or type(e).__name__).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
