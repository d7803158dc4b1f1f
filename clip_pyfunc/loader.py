"""The shared CLIP loader: the pyfunc base class both embedding models subclass.

`load_context` turns the logged artifacts into a ready tower once: it reads the tower
directory, picks the device and precision, sets threads, and puts the tower in eval mode.
`predict` is stateless: it validates the `input` column, runs the subclass's stages in
micro-batches and turns domain errors into MLflow's invalid-parameter errors (HTTP 400).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import mlflow.pyfunc

from clip_pyfunc.config import RuntimeConfig
from clip_pyfunc.errors import InvalidInput, ModelLoadError, combine_row_errors, preview

INPUT_COLUMN = "input"
# The cosine to fp32 a precision must have held on the sample inputs (measured at registration,
# see registry.measure_precisions) to be the "default" precision.
DEFAULT_PRECISION_COSINE = 0.9999
_TRUE_WORDS, _FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


class ClipEmbeddingModel(mlflow.pyfunc.PythonModel):
    """Base pyfunc model for one tower of a dual encoder (any family in clip_pyfunc.families). Subclasses set `tower` and implement the stages.

    Subclasses implement:
        `_load_tower(path)`: load weights and pre-processing from the artifact directory.
        `_embed_valid(values, stop_on_error=...)`: decode, preprocess and encode rows,
            yielding (positions of good rows, their embeddings tensor, list of InvalidInput).
    """

    tower: str = ""
    params_schema: dict[str, Any] = {"normalize": True}

    def load_context(self, context) -> None:
        """Load the tower once: artifacts, device, precision, threads, eval mode."""
        import torch

        self.config = RuntimeConfig.from_dict(getattr(context, "model_config", None))
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        path = context.artifacts[self.tower]
        if not os.path.isdir(path):
            raise ModelLoadError(f"artifact {self.tower!r} is not a directory: {path}")
        from clip_pyfunc.checkpoint import CheckpointInfo

        self.runtime = pick_runtime(self.config, CheckpointInfo.read(path).precision_cosine)
        self.model = self._load_tower(path)

    def _load_weights(self, path: str):
        """Read the artifact's description and its tower, on the chosen device and precision."""
        from clip_pyfunc.checkpoint import CheckpointInfo, load_tower

        self.info = CheckpointInfo.read(path)
        return apply_precision(load_tower(path, self.tower), self.runtime)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Embed the `input` column.

        Args:
            context: MLflow's context (unused; everything was loaded in load_context).
            model_input: DataFrame with a column `input`, a single-column DataFrame, a list,
                a Series or a 1-D array of cells (see `input_values`).
            params: `normalize` (bool; default the model_config's `normalize`, True unless set).

        Returns:
            float32 numpy array (n, dim).

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE naming the bad rows or argument.
        """
        from mlflow.exceptions import MlflowException

        try:
            values = input_values(model_input, served_row_limit(self.config.max_rows))
            return self.respond(values, self.read_params(params))
        except InvalidInput as e:
            raise MlflowException.invalid_parameter_value(str(e)) from e

    def respond(self, values: Sequence[object], params: dict[str, Any]):
        """Answer a checked request: the float32 vectors (n, dim), or one error naming every bad row."""
        vectors, errors = self.embed_rows(values, normalize=params["normalize"], stop_on_error=True)
        if errors:
            raise combine_row_errors(errors)
        return vectors

    def embed_rows(self, values: Sequence[object], *, normalize: bool = True, stop_on_error: bool = False):
        """Embed rows, keeping going past bad ones.

        Args:
            values: One cell per row (see the subclass for what a cell holds).
            normalize: L2-normalise each vector.
            stop_on_error: Skip forward passes once a row has failed (its caller will refuse
                the whole batch); every row is still checked so all bad rows are named.

        Returns:
            (float32 array (n, dim) with NaN rows where a row failed, list of InvalidInput).
        """
        import numpy as np

        from clip_pyfunc.postprocess import finish

        dim = self.embedding_dim
        out = np.full((len(values), dim), np.nan, dtype=np.float32)
        errors: list[InvalidInput] = []
        for positions, embeddings, bad in self._embed_valid(values, stop_on_error=stop_on_error):
            errors.extend(bad)
            if embeddings is not None and len(positions):
                out[positions] = finish(embeddings, normalize)
        errors.sort(key=lambda e: e.row)
        return out, errors

    def table_columns(self, values: Sequence[object], *, normalize: bool | None = None):
        """Per-row output columns for table jobs (Spark): {"embedding": vectors or None} and the row errors.

        `normalize` None keeps the model_config's default, as a request without params does.
        """
        vectors, errors = self.embed_rows(values, normalize=self.config.normalize if normalize is None else normalize)
        bad = {e.row for e in errors}
        return {"embedding": [None if row in bad else vectors[row] for row in range(len(values))]}, errors

    def read_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Validate predict-time params against `params_schema`; unknown names are an error."""
        params = dict(params or {})
        unknown = set(params) - set(self.params_schema)
        if unknown:
            raise InvalidInput(f"unknown params {sorted(unknown)}; allowed: {sorted(self.params_schema)}")
        defaults = {**self.params_schema, "normalize": self.config.normalize}
        return {name: as_bool(name, params.get(name, defaults[name])) for name in self.params_schema}

    @property
    def embedding_dim(self) -> int:
        """Output dimension, as the family's full model computes it (recorded at registration)."""
        return self.info.embedding_dim

    def _load_tower(self, path: str):
        raise NotImplementedError

    def _embed_valid(self, values, *, stop_on_error: bool):
        raise NotImplementedError


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

    The logged models declare no input schema (see `registry.model_signature`), so MLflow
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


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    return "avx512_bf16" in words or "amx_bf16" in words


def pick_runtime(config: RuntimeConfig, measured: dict[str, float] | None = None):
    """Resolve device and precision from the config and the hardware found now.

    "default" is the fastest precision this hardware runs natively that held a cosine of at
    least DEFAULT_PRECISION_COSINE to fp32 on the sample inputs measured at registration
    (`measured`, from the artifact): bf16 on CPUs with AVX512_BF16 or AMX, else fp32; on CUDA
    fp16, else bf16, else fp32. Without a measurement it is fp32 on CPU and fp16 on CUDA.

    Raises:
        ModelLoadError: CUDA asked for but absent, or a precision the device cannot run.
    """
    import torch

    from clip_pyfunc.encode import Runtime

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {config.device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    else:
        device = torch.device(config.device)
    cuda = device.type == "cuda"
    precision = config.precision
    if precision == "default":
        precision = _default_precision(cuda, measured)
    elif precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise ModelLoadError("precision 'fp16' needs a CUDA device; on CPU choose 'fp32', 'bf16', 'int8' or 'auto'")
    if precision == "int8" and cuda:
        raise ModelLoadError("precision 'int8' (dynamic quantisation) runs on CPU only; on CUDA choose 'fp16' or 'bf16'")
    input_dtype = torch.float16 if precision == "fp16" else torch.float32
    autocast = torch.bfloat16 if precision == "bf16" else None
    return Runtime(
        device=device, precision=precision, input_dtype=input_dtype,
        autocast_dtype=autocast, batch_size=config.batch_size,
    )


def _default_precision(cuda: bool, measured: dict[str, float] | None) -> str:
    import torch

    if not measured:
        return "fp16" if cuda else "fp32"
    if cuda:
        if "fp16" not in measured:  # registered on a CPU: nothing measured for CUDA, keep fp16
            return "fp16"
        native = ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    else:
        native = ["bf16"] if cpu_has_native_bf16() else []
    held = [p for p in native if measured.get(p, 0.0) >= DEFAULT_PRECISION_COSINE]
    return held[0] if held else "fp32"


def apply_precision(model, runtime):
    """Move a tower to its device and precision (fp16 weights, int8 dynamic quantisation)."""
    import torch

    if runtime.precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if runtime.precision == "fp16":
        model = model.half()
    return model.to(runtime.device)
