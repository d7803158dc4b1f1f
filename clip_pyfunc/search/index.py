"""Index embeddings: the embedding space of a model, and an embed-table output upserted into a store.

A collection remembers the embedding space it holds: the model that made the vectors (pinned
to its version), the run that logged it (the text and image models of one run share a space),
their URIs and the dimension. Vectors from another space are refused, because mixing spaces
silently gives plausible, wrong answers. Where the vectors live is `search.store`.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from clip_pyfunc.errors import one_line
from clip_pyfunc.models.request import EMBEDDING_COL, ERROR_COL
from clip_pyfunc.registry.lookup import model_error
from clip_pyfunc.search.store import IndexRefused, build_settings, Space, Store, payload_type

NOT_FILTERED = ("path", "url")  # payload fields indexed for filters only when asked: unique per item, as the id is


def model_space(model_uri: str) -> Space:
    """The space of a registered (or logged) model, read from the registry.

    Raises:
        ModelLoadError: MLflow cannot find `model_uri`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from clip_pyfunc.registry.lookup import pin_model_uri, run_models

    try:
        info = mlflow.models.get_model_info(model_uri)
        dim = int((info.metadata or {}).get("embedding_dim", 0))
        return Space(model_uri=pin_model_uri(model_uri), run_id=info.run_id or "", models=run_models(model_uri),
                     embedding_dim=dim)
    except MlflowException as e:
        raise model_error("--model-uri", model_uri, e) from e


def require_space(space: Space, collection: str, kind: str, metadata) -> None:
    """Refuse a model of another run or dimension than the collection's: its queries would land elsewhere.

    Args:
        space: The collection's space (`Store.space`).
        collection: Its name, for the message.
        kind: "text" or "image", for the message.
        metadata: The model's MLflow metadata: a ModelInfo (before loading) or a loaded model's `metadata`.

    Raises:
        IndexRefused: Another run or dimension.
    """
    run_id = metadata.run_id or ""
    dim = int((metadata.metadata or {}).get("embedding_dim", 0))
    if run_id != space.run_id or dim != space.embedding_dim:
        raise IndexRefused(
            f"collection {collection!r} holds vectors of {space.model_uri} (run {space.run_id}, dim "
            f"{space.embedding_dim}); the {kind} model is of run {run_id or '?'}, dim {dim}: another embedding "
            f"space. Query with the collection's models {space.models}, or re-index with this one")


def read_table(source: str, batch_rows: int = 1024) -> Iterator[Any]:
    """Read an embed-table output in batches: a parquet file or directory, or a Spark table name.

    A parquet path is opened, and a missing one refused, at the call; a table is read (and Spark
    started) only when the batches are iterated.

    Raises:
        IndexRefused: No such file or folder, a file that is not parquet, or no such table.
    """
    if os.path.exists(source):
        import pyarrow
        import pyarrow.dataset as ds

        try:
            dataset = ds.dataset(source, format="parquet")
        except (pyarrow.ArrowInvalid, OSError) as e:
            raise IndexRefused(f"--input {source} is not a parquet file or folder ({one_line(e)}); give an "
                               "embed-table output") from e
        return (batch.to_pandas() for batch in dataset.to_batches(batch_size=batch_rows))
    if "/" in source or os.sep in source or source.endswith(".parquet"):  # a path: table names have neither
        raise IndexRefused(f"--input {source}: no such file or folder; give an embed-table output (a parquet "
                           "file or folder) or a table name")
    return _read_spark_table(source, batch_rows)


def _read_spark_table(source: str, batch_rows: int) -> Iterator[Any]:
    """Batches of a Spark table, read through the JVM (no Python workers)."""
    from pyspark.errors import AnalysisException

    from clip_pyfunc.batch.spark.session import spark_session

    spark = spark_session(start_workers=False)
    rows = []
    try:
        table = spark.table(source)
    except AnalysisException as e:
        raise IndexRefused(f"--input {source}: no such parquet path or table ({one_line(e)})") from e
    columns = table.columns
    import pandas as pd

    for row in table.toLocalIterator():
        rows.append(tuple(row))
        if len(rows) == batch_rows:
            yield pd.DataFrame(rows, columns=columns)
            rows = []
    if rows:
        yield pd.DataFrame(rows, columns=columns)


def index_table(store: Store, source: str, model_uri: str, *, id_col: str | None = None,
                batch_rows: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Upsert an embed-table output into the store: one point per good row, keyed by its id; then build the index.

    The rows go in bounded batches (memory holds one batch); HNSW, the payload indexes and the
    quantized copy are built once, at the end. A run killed halfway leaves a store that opens; a
    re-run upserts the same ids again, so it completes it with no duplicates.

    Args:
        store: From `search.store.open_store`.
        source: A parquet path or a table with columns id, `embedding`, `error` and payload columns.
        model_uri: The model that made the embeddings (its space is recorded and checked).
        id_col: The id column; None takes the table's first column (embed-table writes it first).
        batch_rows: Rows per upsert.
        progress: Show a progress bar on stderr.

    Returns:
        {"collection", "model_uri", "rows", "indexed", "skipped" (rows with an error or no vector),
        "added", "updated", "points", "filter_fields" (payload field -> index type), and "note" when the
        collection was created with other build settings than `store.config` asks for}.

    Raises:
        IndexRefused: Another embedding space, a vector of the wrong size, a missing column, or no such table.
        ModelLoadError: MLflow cannot find `model_uri`.
    """
    import numpy as np
    from tqdm import tqdm

    frames = read_table(source, batch_rows)  # a missing path is refused before the registry is asked
    space = model_space(model_uri)
    store.ensure(space)
    before = store.count()
    rows = indexed = skipped = 0
    fields: dict[str, str] = {}
    bar = tqdm(desc=f"index {store.collection}", unit=" rows", disable=not progress)
    for frame in frames:
        id_col = id_col or frame.columns[0]
        for col in (id_col, EMBEDDING_COL):
            if col not in frame.columns:
                raise IndexRefused(f"column {col!r} not in {source}; columns: {list(frame.columns)}")
        good = frame[EMBEDDING_COL].notna() & frame[id_col].notna()  # no id: nothing to upsert it by
        if ERROR_COL in frame.columns:
            good &= ~frame[ERROR_COL].map(lambda e: isinstance(e, str)).astype(bool)
        skipped += int((~good).sum())
        frame = frame[good]
        payload_cols = [c for c in frame.columns if c not in (EMBEDDING_COL, ERROR_COL)]
        if len(frame):
            lengths = frame[EMBEDDING_COL].map(len)
            wrong = (lengths != space.embedding_dim).to_numpy()
            if wrong.any():
                raise IndexRefused(f"row {frame[id_col][wrong].iloc[0]!r}: embedding has {lengths[wrong].iloc[0]} "
                                   f"values, the collection holds {space.embedding_dim}-d vectors of "
                                   f"{space.model_uri}")
            vectors = np.stack([np.asarray(v, dtype=np.float32) for v in frame[EMBEDDING_COL]])
            payloads = [{c: _plain(v) for c, v in zip(payload_cols, values)}
                        for values in frame[payload_cols].itertuples(index=False, name=None)]
            store.upsert([_plain(i) for i in frame[id_col]], vectors, payloads)
            for c in payload_cols:
                if c not in fields:  # a field's type is read once, from its first value
                    kind = next((payload_type(p[c]) for p in payloads if p[c] is not None), None)
                    if kind:
                        fields[c] = kind
        indexed += len(frame)
        rows += len(good)
        bar.update(len(good))
    bar.close()
    wanted = store.config.filter_fields
    filter_fields = {c: t for c, t in fields.items()
                     if (c in wanted if wanted is not None else c not in (*NOT_FILTERED, id_col))}
    bar = tqdm(desc=f"build the index of {store.collection} (HNSW)", total=1, disable=not progress)
    store.finish(filter_fields)
    bar.update(1)
    bar.close()
    after = store.count()
    report = {"collection": store.collection, "model_uri": space.model_uri, "rows": rows, "indexed": indexed,
              "skipped": skipped, "added": after - before, "updated": indexed - (after - before), "points": after,
              "filter_fields": filter_fields}
    recorded = getattr(store, "build", None)  # an embedded store's settings, fixed when it was created
    if recorded is not None and recorded != build_settings(store.config):
        report["note"] = (f"the collection keeps the settings it was created with, {recorded}; index.* asks for "
                          f"{build_settings(store.config)}: index into a new --collection to use them")
    return report


def _plain(value: object) -> object:
    """A JSON-ready payload value: numpy and pandas scalars to Python, missing values (None, NaN, pd.NA,
    NaT) and non-finite floats to None, dates and times to ISO 8601 strings, lists element by element;
    raw bytes (image data) left out as None."""
    import datetime
    import math

    import pandas as pd

    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0):
        return [_plain(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, datetime.date, datetime.time)):
        return value.isoformat()
    if hasattr(value, "item"):  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None  # raw image bytes do not belong in a payload
    return value
