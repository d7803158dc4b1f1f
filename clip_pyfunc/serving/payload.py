"""What a request's headers and body say before the application behind the edge reads them.

The edge (serving.edge) uses these to answer what MLflow's scoring server would answer wrongly
(a 500, a 415 for a header a client may send, a silently dropped param) and to give it a body
it reads right:

- **Media types** (`parse_content_type`): case-insensitive type and parameter names, quoted
  parameter values (RFC 9110 5.6.6, 8.3.1). MLflow's server compares them as raw strings, so
  the edge hands it the canonical form (`canonical_content_type`).
- **Content codings** (`Inflater`): `gzip`, `x-gzip` and `deflate` (RFC 9110 8.4.1), inflated as
  the body arrives and counted against the body limit as they inflate, so a gzip bomb stops at
  the limit.
- **Scoring payloads** (`scoring_cells`, `unknown_params`): the input cells and params of a JSON
  body in each of MLflow's forms (`dataframe_split`, `dataframe_records`, `inputs`, `instances`),
  read the way `models.request.input_values` reads the parsed frame.
"""

from __future__ import annotations

import codecs
import zlib

from clip_pyfunc.errors import InvalidInput, combine_row_errors
from clip_pyfunc.models.request import INPUT_COLUMN

# The media types MLflow's scoring server parses (mlflow.pyfunc.scoring_server.CONTENT_TYPES).
SCORING_MEDIA_TYPES = ("application/json", "text/csv", "application/vnd.apache.parquet")
# Content codings the edge inflates (RFC 9110 8.4.1); identity is no coding.
CODINGS = ("gzip", "x-gzip", "deflate", "identity")
_PAYLOAD_FORMS = ("dataframe_split", "dataframe_records", "inputs", "instances")


class RequestRefused(Exception):
    """A request the edge answers itself: HTTP status and a message naming what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """(media type, parameters) of a Content-Type value, lower-cased names and unquoted values.

    `Application/JSON; Charset="UTF-8"` gives ("application/json", {"charset": "UTF-8"}).

    Raises:
        RequestRefused: 415 when the value is not `type/subtype` followed by `; name=value` parameters.
    """
    head, _, rest = value.partition(";")
    media = head.strip().lower()
    kind, slash, sub = media.partition("/")
    if not (slash and kind and sub and " " not in media):
        raise RequestRefused(415, f"Content-Type {value[:80]!r} is not a media type; send application/json")
    params: dict[str, str] = {}
    while rest.strip():
        name, eq, rest = rest.partition("=")
        name = name.strip().lower()
        rest = rest.lstrip()
        if not eq or not name:
            raise RequestRefused(415, f"Content-Type {value[:80]!r}: a parameter is not name=value")
        if rest.startswith('"'):  # quoted-string: backslash escapes one character
            chars, i = [], 1
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= len(rest):
                raise RequestRefused(415, f"Content-Type {value[:80]!r}: an unterminated quoted parameter")
            params[name], rest = "".join(chars), rest[i + 1:]
            after, _, rest = rest.partition(";")
            if after.strip():
                raise RequestRefused(415, f"Content-Type {value[:80]!r}: text after a quoted parameter")
        else:
            token, _, rest = rest.partition(";")
            params[name] = token.strip()
    return media, params


def canonical_content_type(value: str | None) -> str:
    """The Content-Type MLflow's scoring server reads right, for a request that sent `value`.

    No Content-Type is taken as JSON (MLflow's own clients send it; `requests.post(url, data=...)`
    sends none). The charset, when sent, must name UTF-8 (any spelling Python knows).

    Raises:
        RequestRefused: 415 for a media type MLflow does not parse, a charset other than UTF-8, or a
            parameter other than charset, each naming what is allowed.
    """
    if value is None or not value.strip():
        return "application/json"
    media, params = parse_content_type(value)
    if media not in SCORING_MEDIA_TYPES:
        raise RequestRefused(415, f"Content-Type {media!r} is not one the scoring server parses; send one of "
                                  f"{', '.join(SCORING_MEDIA_TYPES)}")
    if other := sorted(set(params) - {"charset"}):
        raise RequestRefused(415, f"Content-Type parameters {other} are not understood; send only charset=utf-8")
    if "charset" not in params:
        return media
    try:
        utf8 = codecs.lookup(params["charset"]).name == "utf-8"
    except LookupError:
        utf8 = False
    if not utf8:
        raise RequestRefused(415, f"charset {params['charset'][:40]!r} is not supported; send the body as UTF-8 "
                                  "(charset=utf-8)")
    return f"{media}; charset=utf-8"


def content_codings(value: str | None) -> list[str]:
    """The codings of a Content-Encoding value, in the order they were applied (identity left out).

    Raises:
        RequestRefused: 415 for a coding the edge does not inflate, naming those it does.
    """
    codings = [c.strip().lower() for c in (value or "").split(",") if c.strip()]
    if unknown := [c for c in codings if c not in CODINGS]:
        raise RequestRefused(415, f"Content-Encoding {unknown[0][:40]!r} is not supported; send the body as "
                                  "gzip, deflate or uncompressed")
    return [c for c in codings if c != "identity"]


class Inflater:
    """Undo a body's content codings as it arrives, counting the inflated bytes against `limit`.

    A gzip body may hold several members one after another (RFC 1952 2.2), each inflated in turn;
    bytes after the end of a deflate stream are an error.

    Args:
        codings: From `content_codings`, in the order applied (undone last first).
        limit: Most bytes of the body once inflated (serve.max_body_bytes).

    Raises (from `feed` and `finish`):
        RequestRefused: 413 once the inflated body passes `limit` (a gzip bomb stops there), 400 for
            data that is not in the coding it claims.
    """

    def __init__(self, codings: list[str], limit: int):
        self.limit = limit
        self._stages = [_Stage(c) for c in reversed(codings)]
        self.size = 0

    def feed(self, data: bytes) -> bytes:
        """Inflate the next bytes of the body; what they inflate to."""
        return self._through(data, final=False)

    def finish(self) -> bytes:
        """The rest of the inflated body, once every byte has been fed.

        Raises:
            RequestRefused: 400 when a coding's stream is cut short.
        """
        return self._through(b"", final=True)

    def _through(self, data: bytes, final: bool) -> bytes:
        room = self.limit + 1 - self.size  # what may still come out (zlib's max_length 0 would mean no bound)
        for stage in self._stages:
            data = stage.inflate(data, room, final)
            if self.size + len(data) > self.limit:  # also when input is left over: the output filled `room`
                raise RequestRefused(413, f"request body passed the limit of {self.limit} bytes once inflated "
                                          "(Content-Encoding; serve.max_body_bytes); send fewer or smaller rows "
                                          "per request")
        self.size += len(data)
        return data


class _Stage:
    """One content coding being undone (zlib: wbits 31 reads a gzip member, 15 a zlib stream, which is
    HTTP's deflate, RFC 9110 8.4.1.2)."""

    def __init__(self, coding: str):
        self.coding, self.gzip = coding, coding in ("gzip", "x-gzip")
        self.z = zlib.decompressobj(31 if self.gzip else 15)

    def inflate(self, data: bytes, room: int, final: bool) -> bytes:
        """What `data` inflates to, at most `room` bytes (more input left over then); with `final`, the
        stream must end here."""
        out = bytearray()
        try:
            while data and len(out) < room:
                if self.z.eof:
                    if not self.gzip:
                        raise RequestRefused(400, f"the body has bytes after the end of its {self.coding} stream")
                    self.z = zlib.decompressobj(31)  # the next gzip member
                out += self.z.decompress(data, room - len(out))
                data = self.z.unconsumed_tail or (self.z.unused_data if self.z.eof else b"")
            if final and len(out) < room:
                out += self.z.flush()
        except zlib.error as e:
            raise RequestRefused(400, f"the body is not valid {self.coding} (Content-Encoding): {e}") from e
        # Input left over means the output filled `room`, which the caller refuses.
        if not data and final and not self.z.eof:
            raise RequestRefused(400, f"the body ends before its {self.coding} stream does (Content-Encoding)")
        return bytes(out)


def unknown_params(payload: object, allowed: frozenset[str]) -> None:
    """Refuse a JSON payload's params that the model does not declare.

    MLflow drops an unknown param with a warning before `predict` sees it, so a misspelt one
    (`normalise`) would give silently different vectors.

    Raises:
        RequestRefused: 400 naming the unknown params and the allowed ones.
    """
    params = payload.get("params") if isinstance(payload, dict) else None
    if not isinstance(params, dict):
        return
    if unknown := sorted(str(name) for name in params if name not in allowed):
        shown = ", ".join(sorted(allowed)) or "none"
        raise RequestRefused(400, f"unknown params {unknown}; this model's params are: {shown}")


def scoring_cells(payload: object, column: str = INPUT_COLUMN) -> list[object] | None:
    """The cells of `column` in a JSON scoring payload, as `predict` would see its rows; None for a shape
    MLflow itself refuses or reads otherwise (it answers those).

    For `input` (a model of one input column), a payload with a single column of another name, or
    plain cells, is read as that column too, as `models.request.input_values` does; another column
    (the combined model's `text`) is read only by its name.
    """
    single = column == INPUT_COLUMN
    if not isinstance(payload, dict):
        return None
    forms = [form for form in _PAYLOAD_FORMS if form in payload]
    if len(forms) != 1:
        return None
    body = payload[forms[0]]
    if forms[0] == "dataframe_split":
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            return None
        columns = body.get("columns")
        if isinstance(columns, list) and column in columns:
            at = columns.index(column)
        elif single and (not isinstance(columns, list) or len(columns) == 1):
            at = 0
        else:
            return None
        return [row[at] if isinstance(row, list) and len(row) > at else None for row in body["data"]]
    if isinstance(body, dict):  # {"input": [...]} (inputs, instances)
        keys = list(body)
        key = column if column in keys else (keys[0] if single and len(keys) == 1 else None)
        if key is None:
            return None
        cells = body[key]
        return cells if isinstance(cells, list) else [cells]
    if isinstance(body, list):
        if not single and not all(isinstance(row, dict) for row in body):
            return None
        return [_record_cell(row, column, single) for row in body]
    return [body] if single else None  # a single value (inputs: "a cat")


def _record_cell(row: object, column: str, single: bool) -> object:
    """A record's cell of `column` (or, for `input`, its one value); a plain cell is itself."""
    if not isinstance(row, dict):
        return row
    if column in row:
        return row[column]
    return next(iter(row.values())) if single and len(row) == 1 else None


def check_text_cells(cells: list[object]) -> None:
    """Refuse cells a text model cannot embed because of their JSON type (numbers, booleans, objects).

    MLflow's parser would turn them into strings first, so `95120` would be embedded as "95120";
    the message is the one the model gives in process (stages.decode.decode_texts). Null cells are
    left to the model, which names them.

    Raises:
        RequestRefused: 400 naming the rows.
    """
    from clip_pyfunc.stages.decode import decode_texts

    errors = [e for e in decode_texts(cells) if isinstance(e, InvalidInput) and e.kind == "type"]
    if errors:
        raise RequestRefused(400, str(combine_row_errors(errors)))
