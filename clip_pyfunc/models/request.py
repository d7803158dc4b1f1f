"""The pyfunc edge: what `predict` accepts, and how a bad request becomes MLflow's 400.

Every model reads its rows with `input_values` (or the combined model's own splitter), checks
params with `check_params`, and answers inside `invalid_input_as_400`, the one place where the
package's InvalidInput becomes `MlflowException.invalid_parameter_value` (HTTP 400 when served).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from clip_pyfunc.errors import InvalidInput, Overloaded, Unavailable, preview

INPUT_COLUMN = "input"
# The columns of a table job's output (Spark's embed-table, read back by search.index): the vector
# `table_columns` returns, and the row's error, null where the row was embedded.
EMBEDDING_COL, ERROR_COL = "embedding", "error"
_TRUE_WORDS, _FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


@contextlib.contextmanager
def invalid_input_as_400():
    """Turn an InvalidInput raised inside into MLflow's INVALID_PARAMETER_VALUE (a served 400), a server's
    guards into RESOURCE_EXHAUSTED (Overloaded, 429), TEMPORARILY_UNAVAILABLE (ForwardStalled, 503) and
    CANCELLED (RequestCancelled, 499, for a client that is gone), and any other failure (an engine error,
    out of memory) into INTERNAL_ERROR (a served 500, not the caller's fault).

    MLflow's scoring server answers an exception that is not an MlflowException with 400 BAD_REQUEST
    and a stack trace, which would blame the caller for the model's failure.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import CANCELLED, INTERNAL_ERROR, RESOURCE_EXHAUSTED, TEMPORARILY_UNAVAILABLE

    from clip_pyfunc.runtime.batching import current_request

    try:
        yield
    except InvalidInput as e:
        raise MlflowException.invalid_parameter_value(str(e)) from e
    except Unavailable as e:  # a server's guards (runtime.batching): 429, 503, or a request nobody waits for
        if isinstance(e, Overloaded) and (state := current_request.get()) is not None:
            state.retry_after = e.retry_after  # the edge sends it as Retry-After
        code = {429: RESOURCE_EXHAUSTED, 503: TEMPORARILY_UNAVAILABLE, 499: CANCELLED}[e.http_status]
        raise MlflowException(str(e), error_code=code) from e
    except MlflowException:
        raise
    except Exception as e:
        raise MlflowException(f"the model failed, not the request: {type(e).__name__}: {e}",
                              error_code=INTERNAL_ERROR) from e


def check_params(params: dict[str, Any] | None, schema: dict[str, Any]) -> dict[str, Any]:
    """The request's params as a dict, refusing names `schema` does not declare.

    Raises:
        InvalidInput: Unknown param names, listing the allowed ones.
    """
    params = dict(params or {})
    unknown = set(params) - set(schema)
    if unknown:
        raise InvalidInput(f"unknown params {sorted(unknown)}; allowed: {sorted(schema)}")
    return params


# Environment variables Spark sets for its Python workers (and that a scoring server which
# `spark_udf` starts in a restored environment inherits from the worker).
_SPARK_WORKER_ENV = ("SPARK_JOB_ARTIFACT_UUID", "SPARK_REUSE_WORKER", "PYTHON_WORKER_FACTORY_SECRET")


def served_row_limit(max_rows: int) -> int | None:
    """`max_rows` when this predict call answers a served request, None for batch and in-process calls.

    The row limit protects a server from one oversized request. MLflow's scoring server (`mlflow
    models serve`, `clip-pyfunc serve`, and platforms built on it) sets
    `_MLFLOW_IS_IN_SERVING_ENVIRONMENT` when it starts; in-process calls (notebooks, evaluate,
    index) never have it. Spark hands a pandas UDF Arrow batches of up to 10,000 rows, and
    `spark_udf` with a restored environment (uv, virtualenv, conda) does so through a scoring
    server of its own, which inherits the Spark worker's environment: no limit there either.
    `mlflow models predict` and `mlflow.models.predict` simulate the serving environment, so
    they are limited as a served request is.
    """
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT

    if not _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get() or any(name in os.environ for name in _SPARK_WORKER_ENV):
        return None
    return max_rows


def input_values(model_input, max_rows: int | None) -> list[object]:
    """Return the rows to embed as a list, checking the shape of the request and the row limit.

    The logged models declare no input schema (see `registry.signatures.model_signature`), so MLflow
    hands over what the caller sent, in any of the shapes users send:

    - a DataFrame with a column `input` (other columns are ignored), or with exactly one
      column of any name (what `spark_udf` passes for a positional column);
    - a list, tuple, pandas Series or 1-D numpy array of cells (`predict(["a cat"])`);
    - a dict {"input": cells} (served `inputs` and `instances` payloads parse to this);
    - a single string or bytes value, taken as one row.

    Raises:
        InvalidInput: A DataFrame with several columns and none named `input`, an unsupported
            type, or more rows than `max_rows` (None: no limit).
    """
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        columns = list(model_input.columns)
        if INPUT_COLUMN in columns:
            values = model_input[INPUT_COLUMN].tolist()
        elif len(columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise InvalidInput(
                f"expected a column {INPUT_COLUMN!r} (or a single column), got columns {[str(c) for c in columns]}"
            )
    elif isinstance(model_input, dict):
        keys = list(model_input)
        if INPUT_COLUMN not in keys and len(keys) != 1:
            raise InvalidInput(f"expected the key {INPUT_COLUMN!r} (or a single key), got keys {[str(k) for k in keys]}")
        return input_values(model_input[INPUT_COLUMN if INPUT_COLUMN in keys else keys[0]], max_rows)
    elif isinstance(model_input, (str, bytes)):
        values = [model_input]
    elif isinstance(model_input, np.ndarray) and (model_input.ndim == 1 or model_input.shape[1:] == (1,)):
        values = array_cells(model_input)
    elif isinstance(model_input, pd.Series):
        values = array_cells(model_input.to_numpy()) if model_input.dtype.kind == "S" else model_input.tolist()
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        shape = f" of shape {model_input.shape}" if isinstance(model_input, np.ndarray) else ""
        raise InvalidInput(
            f"expected a DataFrame with a column {INPUT_COLUMN!r}, a list, a Series or a 1-D array, "
            f"got {type(model_input).__name__}{shape}"
        )
    if max_rows is not None and len(values) > max_rows:
        raise InvalidInput(f"{len(values)} rows, over the limit of {max_rows} rows per call (max_rows)")
    return values


def array_cells(array) -> list[object]:
    """The cells of a numpy array as a flat list, fixed-width bytes (dtype `S`) at their full width.

    numpy strips trailing zero bytes from each element of an `S` array it hands out
    (`np.array([png_bytes])`), and an image whose last bytes are zeros (a BMP or TIFF with dark
    pixels at the end) would then be cut short. Each element is padded back to the array's
    width: every allowed format's decoder ignores zero bytes past the image's end.
    """
    flat = array.reshape(-1)
    if flat.dtype.kind == "S":
        width = flat.dtype.itemsize
        return [bytes(v).ljust(width, b"\0") for v in flat.tolist()]
    return flat.tolist()


def as_bool(name: str, value: object) -> bool:
    """Accept a bool (or 'true'/'false' text, as query strings send) for param `name`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise InvalidInput(f"param {name!r} must be true or false, got {preview(value)}")
