"""The job's mapper: a registered pyfunc model inside `mapInPandas`.

The model is loaded at most once per Python worker process (cached in this module, counted
with an accumulator), fed Arrow batches of a bounded number of rows, with torch threads set
so that concurrent workers x threads <= cores. Every input row gives exactly one output row:
the id columns, the embedding, or a null embedding and an `error` saying what was wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from clip_pyfunc.batch.spark.session import worker_threads
from clip_pyfunc.errors import EmbedJobError, InvalidInput
from clip_pyfunc.models.request import EMBEDDING_COL, ERROR_COL


_WORKER_MODELS: dict[str, object] = {}  # per Python worker process: config key -> loaded model


def resolve_model_uri(model_uri: str) -> str:
    """Pin an alias to its current version on the driver, so every worker loads the same one."""
    from clip_pyfunc.registry.lookup import pin_model_uri

    return pin_model_uri(model_uri)


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A registered model as a job's workers load it.

    Attributes:
        requested: The URI the caller gave (an alias, a version, a path).
        uri: The pinned model URI (models:/name/version).
        load_from: What the workers pass to load_model: `uri`, or a copy on the local disk.
        fields: The result columns (see output_fields).
        checked: The driver already compared the model's requirements with this environment.
    """

    requested: str
    uri: str
    load_from: str
    fields: tuple
    checked: bool = False


def prepare_model(model_uri: str, local_copy: str | None = None, before_download=None) -> ModelSource:
    """Pin the model and read its result columns; with `local_copy` (a directory), give workers
    that share this machine's disk the model there, and check its requirements once.

    The model is used in place where its artifacts are already in a local folder (local_artifacts),
    and downloaded into `local_copy` otherwise. A local job's workers then load from disk instead
    of each copying the model out of the registry, and skip the requirements check (both about a
    second each). Nothing here needs the JVM, so the CLI runs it while Spark starts. The directory
    must outlive every action on a DataFrame embedded with the result (run_job and the CLI
    remove it after the job); a model used in place must not be deleted from the registry meanwhile.
    `before_download`, a function of no arguments, is called once before a download starts.
    """
    from clip_pyfunc.registry.lookup import local_artifacts

    uri = resolve_model_uri(model_uri)
    fields = tuple(output_fields(uri))
    if local_copy is None:
        return ModelSource(requested=model_uri, uri=uri, load_from=uri, fields=fields)
    import mlflow
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    path = local_artifacts(uri)
    if path is None:
        if before_download is not None:
            before_download()
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=local_copy)
    requirements = os.path.join(path, "requirements.txt")
    if not os.path.exists(requirements):  # the workers run MLflow's own check instead
        return ModelSource(requested=model_uri, uri=uri, load_from=path, fields=fields)
    with open(requirements, encoding="utf-8") as f:
        pins = [line.strip() for line in f if line.strip() and not line.lstrip().startswith(("#", "-"))]
    warn_dependency_requirement_mismatches(pins)
    return ModelSource(requested=model_uri, uri=uri, load_from=path, fields=fields, checked=True)


def worker_modules(source: ModelSource, model_config: dict | None = None) -> tuple[str, ...]:
    """What the job's workers need imported beyond the daemon's BASE, from the model on this disk.

    Each tower artifact's engine is chosen as load_context would choose it (models.base.plan_engine,
    on the logged model_config with `model_config`'s keys over it), without importing torch. Only
    speed depends on it: a worker imports whatever its model needs that the daemon did not. It
    cannot foresee a tower whose engine fails to load and falls back to torch, nor a model_config
    that MLflow's own merge would treat otherwise (MLflow drops keys the logged config lacks).

    Args:
        source: From prepare_model with a local copy directory.
        model_config: The job's overrides of the logged model_config.

    Returns:
        () where every tower runs on a torch-free engine; daemon.TORCH_STACK otherwise, and where
        the model cannot be read here (no local copy, an unknown layout, a config its towers refuse:
        the worker reports the error).
    """
    from clip_pyfunc.batch.spark.daemon import TORCH_STACK

    if not os.path.isdir(source.load_from):
        return TORCH_STACK
    try:
        return () if _torch_free(source.load_from, model_config or {}) else TORCH_STACK
    except Exception:  # noqa: BLE001 - only a plan: the worker loads the model and reports what is wrong
        return TORCH_STACK


def _torch_free(model_dir: str, overrides: dict) -> bool:
    """True where every tower artifact of the model in `model_dir` plans a torch-free engine here."""
    from mlflow.models import Model

    from clip_pyfunc.artifacts.towers import INFO_FILE, CheckpointInfo
    from clip_pyfunc.models.base import plan_engine
    from clip_pyfunc.runtime.engines import engine_class
    from clip_pyfunc.settings import RuntimeConfig

    flavor = Model.load(os.path.join(model_dir, "MLmodel")).flavors["python_function"]
    config = RuntimeConfig.from_dict({**(flavor.get("config") or {}), **overrides})
    towers = {name: os.path.join(model_dir, spec["path"]) for name, spec in (flavor.get("artifacts") or {}).items()}
    towers = {name: path for name, path in towers.items() if os.path.exists(os.path.join(path, INFO_FILE))}
    engines = [plan_engine(path, name, config, CheckpointInfo.read(path)) for name, path in towers.items()]
    return bool(engines) and all(engine_class(engine).torch_free for engine in engines)


def embed_dataframe(df, model_uri: str | ModelSource, *, input_col: str = "input", normalize: bool | None = None,
                    model_config: dict | None = None, threads: int | None = None):
    """Add `embedding` (array<float>) and `error` (string) columns computed by a registered model.

    Args:
        df: Spark DataFrame with `input_col` (text, base64 strings or binary image bytes).
        model_uri: A pyfunc model URI, e.g. models:/clip_image_embedding@champion, or a
            ModelSource from prepare_model.
        input_col: Column to embed; it is dropped from the result (other columns pass through).
        normalize: L2-normalise the vectors; None keeps the model's default (its model_config).
        model_config: Overrides of the logged model_config (precision, batch_size, limits...).
        threads: torch threads per worker; None derives it from the session (see worker_threads).

    Returns:
        (DataFrame, accumulator of model loads). One output row per input row.

    Raises:
        EmbedJobError: `input_col` is missing.
    """
    import mlflow
    from pyspark.sql.types import StringType, StructField, StructType

    source = model_uri if isinstance(model_uri, ModelSource) else prepare_model(model_uri)
    results = list(source.fields)
    names = [f.name for f in results]
    combined_inputs, combined_outputs = _combined_columns()
    if names == list(combined_outputs):  # the combined model reads its own two columns, either may be absent
        inputs = [c for c in combined_inputs if c in df.columns]
        if not inputs:
            raise EmbedJobError(f"the combined model reads columns {list(combined_inputs)}; columns: {df.columns}")
    elif input_col not in df.columns:
        raise EmbedJobError(f"input column {input_col!r} not in the table; columns: {df.columns}")
    else:
        inputs = [input_col]
    spark = df.sparkSession
    slots = spark.sparkContext.defaultParallelism
    if df.rdd.getNumPartitions() < slots:  # a small file is one partition: spread it over every slot
        df = df.repartition(slots)
    config = dict(model_config or {})
    config.setdefault("num_threads", threads or worker_threads(spark))
    tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    loads = spark.sparkContext.accumulator(0)
    keep = [f for f in df.schema.fields if f.name not in inputs]
    schema = StructType(keep + results + [StructField(ERROR_COL, StringType(), True)])
    key = json.dumps([source.uri, config, tracking_uri], sort_keys=True)

    def embed_batches(batches):
        model = _worker_model(key, source, config, tracking_uri, registry_uri, loads)
        for pdf in batches:
            yield _embed_pandas(model, pdf, inputs, normalize, names)

    return df.mapInPandas(embed_batches, schema=schema), loads


def output_fields(model_uri: str) -> list:
    """The result columns a model gives a table, from its signature: `embedding` (array<float>)
    for the embedding models, `labels` (array<string>) and `scores` (array<double>) for the
    classifier, `image_features` and `text_features` (array<float>) for the combined model."""
    import mlflow
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StringType, StructField

    outputs = mlflow.models.get_model_info(model_uri).signature.outputs
    names = outputs.input_names() if outputs is not None and outputs.has_input_names() else []
    if names == ["labels", "scores"]:
        return [StructField("labels", ArrayType(StringType()), True), StructField("scores", ArrayType(DoubleType()), True)]
    if names == list(_combined_columns()[1]):
        return [StructField(name, ArrayType(FloatType()), True) for name in names]
    return [StructField(EMBEDDING_COL, ArrayType(FloatType()), True)]


def _combined_columns() -> tuple[tuple[str, str], tuple[str, ...]]:
    """The combined model's input and output columns.

    Imported on use: the model module imports MLflow (over a second), which a job's driver
    should import beside the JVM's start, not before it.
    """
    from clip_pyfunc.models.combined import IMAGE_COLUMN, OUTPUT_COLUMNS, TEXT_COLUMN

    return (IMAGE_COLUMN, TEXT_COLUMN), OUTPUT_COLUMNS


def _worker_model(key: str, source: ModelSource, config: dict, tracking_uri: str, registry_uri: str, loads):
    """The model for `key` in this Python worker, loaded on first use only.

    A module-level function, so the closure above refers to it by import and every task in
    a reused worker sees the same cache (a closure's own globals would be pickled per task).
    """
    import mlflow

    model = _WORKER_MODELS.get(key)
    if model is None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        model = mlflow.pyfunc.load_model(source.load_from, model_config=config,
                                         suppress_warnings=source.checked).unwrap_python_model()
        _WORKER_MODELS[key] = model
        loads.add(1)
    return model


def _embed_pandas(model, pdf, inputs: list[str], normalize: bool | None, names: list[str]):
    """Embed one pandas batch; bad rows get null results and their reason."""
    # The combined model takes its columns as a frame; the others take the one column's cells.
    values = pdf[inputs] if getattr(model, "table_inputs", None) else pdf[inputs[0]].tolist()
    rows = len(pdf)
    try:
        columns, errors = model.table_columns(values, normalize=normalize)
    except InvalidInput as e:  # a whole-batch problem (should not happen per row): mark every row
        columns, errors = {}, [InvalidInput(e.reason, row) for row in range(rows)]
    reasons: dict[int, str] = {}
    for e in errors:  # a row may fail in several fields (combined model): keep every reason
        reasons[e.row] = f"{reasons[e.row]}; {e.reason}" if e.row in reasons else e.reason
    out = pdf.drop(columns=inputs)
    for name in names:
        out[name] = columns.get(name, [None] * rows)
    out[ERROR_COL] = [reasons.get(row) for row in range(rows)]
    return out
