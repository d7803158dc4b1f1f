"""Index embeddings: the embedding space of a model, and an embed-table output upserted into a store.

A collection remembers the embedding space it holds: the model that made the vectors (pinned
to its version), the run that logged it (the text and image models of one run share a space),
their URIs and the dimension. Vectors from another space are refused, because mixing spaces
silently gives plausible, wrong answers. Where the vectors live is `search.store`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

from clip_pyfunc.errors import one_line
from clip_pyfunc.models.request import EMBEDDING_COL, ERROR_COL
from clip_pyfunc.registry.lookup import model_error
from clip_pyfunc.search.store import (ID_KEY, PAYLOAD_TYPES, IndexRefused, Space, Store, build_settings,
                                      merge_field_types, payload_type)

INDEXED = "indexed"  # Store.record key: the last index run that completed (input, model, rows, points, at)
CATALOGUE = "catalogue"  # Store.record key: the catalogue the collection was embedded from (what embed-table took)
NOT_FILTERED = ("path", "url")  # payload fields indexed for filters only when asked: unique per item, as the id is


def model_space(model_uri: str) -> Space:
    """The space of a registered (or logged) model, read from the registry.

    Raises:
        ModelLoadError: MLflow cannot find `model_uri`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from clip_pyfunc.registry.lookup import embedding_space, pin_model_uri, run_models

    try:
        info = mlflow.models.get_model_info(model_uri)
        dim = int((info.metadata or {}).get("embedding_dim", 0))
        return Space(model_uri=pin_model_uri(model_uri), run_id=info.run_id or "", models=run_models(model_uri),
                     embedding_dim=dim, embedding_space=embedding_space(info))
    except MlflowException as e:
        raise model_error("--model-uri", model_uri, e) from e


def require_space(space: Space, collection: str, kind: str, metadata) -> None:
    """Refuse a model of another embedding space (weights) or dimension than the collection's: its queries would
    land elsewhere. A collection made before spaces were recorded compares by run.

    Args:
        space: The collection's space (`Store.space`).
        collection: Its name, for the message.
        kind: "text" or "image", for the message.
        metadata: The model's MLflow metadata: a ModelInfo (before loading) or a loaded model's `metadata`.

    Raises:
        IndexRefused: Another space or dimension.
    """
    from clip_pyfunc.registry.lookup import embedding_space

    run_id = metadata.run_id or ""
    dim = int((metadata.metadata or {}).get("embedding_dim", 0))
    held = embedding_space(metadata) if space.embedding_space else f"run:{run_id}"
    if held != space.key or dim != space.embedding_dim:
        raise IndexRefused(
            f"collection {collection!r} holds vectors of {space.model_uri} (space {space.key}, run {space.run_id}, "
            f"dim {space.embedding_dim}); the {kind} model is of space {embedding_space(metadata)}, run "
            f"{run_id or '?'}, dim {dim}: another embedding space. Query with the collection's models "
            f"{space.models}, or re-index with this one")


def read_table(source: str, batch_rows: int = 1024) -> Iterator[Any]:
    """Read an embed-table output in batches of `pyarrow.RecordBatch`: a parquet file or directory, or a Spark table.

    Values keep the table's own types: an integer column with nulls stays integers (pandas would
    turn it into float64, and ids above 2**53 would merge, apache/arrow#43112). A parquet path is
    opened, and a missing one refused, at the call; a table is read (and Spark started) only when
    the batches are iterated.

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
        columns = [c for c in dataset.schema.names if not c.startswith("__index_level_")]  # pandas' saved index
        return dataset.to_batches(columns=columns, batch_size=batch_rows)
    if "/" in source or os.sep in source or source.endswith(".parquet"):  # a path: table names have neither
        raise IndexRefused(f"--input {source}: no such file or folder; give an embed-table output (a parquet "
                           "file or folder) or a table name")
    return _read_spark_table(source, batch_rows)


def _read_spark_table(source: str, batch_rows: int) -> Iterator[Any]:
    """Batches of a Spark table, read through the JVM (no Python workers), with the rows' Python values."""
    import pyarrow as pa
    from pyspark.errors import AnalysisException

    from pyspark.sql.pandas.types import to_arrow_schema

    from clip_pyfunc.batch.spark.session import spark_session

    spark = spark_session(start_workers=False)
    rows = []
    try:
        table = spark.table(source)
    except AnalysisException as e:
        raise IndexRefused(f"--input {source}: no such parquet path or table ({one_line(e)})") from e
    schema = to_arrow_schema(table.schema)  # the table's own types, not ones guessed from a batch's values

    def batch():
        return pa.RecordBatch.from_pylist(rows, schema=schema)

    for row in table.toLocalIterator():
        rows.append(row.asDict(recursive=True))  # structs as dicts
        if len(rows) == batch_rows:
            yield batch()
            rows = []
    if rows:
        yield batch()


EXACT_FLOAT_IDS = 2 ** 53  # float64 holds every whole number below it; at and above, two ids may be one float
EXACT_FLOAT32_IDS = 2 ** 24  # the same for float32


def table_id(value: object, row: int, id_col: str, exact_below: int = EXACT_FLOAT_IDS) -> int | str | None:
    """A row's id as the point is keyed and answered by: an int or a str, or None where the row has none.

    Whole floats below `exact_below` (2**53 for float64: an integer column that went through pandas
    with a null) and whole decimals of any size become ints, so 7.0 is the id 7 and a re-run from
    the integer column updates the same point.

    Args:
        value: The id cell, as read (`read_table`: Python values; numpy and pandas scalars also taken).
        row: The row's number in the table, for messages.
        id_col: The id column's name, for messages.
        exact_below: Where the column's float type stops holding every whole number (2**24 for float32).

    Raises:
        IndexRefused: An id that cannot be told apart exactly: a float at or above `exact_below` or not
            whole, a decimal not whole, a boolean, or another type; the message names the row and what
            is allowed.
    """
    import decimal
    import math

    import pandas as pd

    value = _plain_scalar(value)
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str, float, decimal.Decimal)):
        raise IndexRefused(f"row {row}: id column {id_col!r} holds {value!r} ({type(value).__name__}); ids must be "
                           "integers or strings")
    if isinstance(value, decimal.Decimal):
        if not (value.is_finite() and value == value.to_integral_value()):
            raise IndexRefused(f"row {row}: id column {id_col!r} holds the decimal {value}; ids must be whole numbers "
                               "or strings")
        return int(value)
    if isinstance(value, float):
        if not (math.isfinite(value) and value == int(value) and abs(value) < exact_below):
            raise IndexRefused(
                f"row {row}: id column {id_col!r} holds {value!r}, a float: ids from {exact_below} up or not whole "
                "cannot be told apart exactly (an integer column with a null turns into float64 in pandas). Write "
                "the ids as int64 (nullable) or strings, or name another --id-col")
        return int(value)
    return value


def index_table(store: Store, source: str, model_uri: str, *, id_col: str | None = None,
                batch_rows: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Upsert an embed-table output into the store: one point per good row, keyed by its id; then build the index.

    The rows go in bounded batches (memory holds one batch); HNSW, the payload indexes and the
    quantized copy are built once, at the end. A run killed halfway leaves a store that opens; a
    re-run upserts the same ids again, so it completes it with no duplicates. Ids keep their exact
    value (`table_id`): one point per distinct id, whatever the column type; payload values keep
    their types (integers stay integers, booleans booleans), and every field's type is recorded so
    that `key=value` filters are typed by it (`search.query.parse_filters`).

    Args:
        store: From `search.store.open_store`.
        source: A parquet path or a table with columns id, `embedding`, `error` and payload columns.
        model_uri: The model that made the embeddings (its space is recorded and checked).
        id_col: The id column; None takes the table's first column (embed-table writes it first).
        batch_rows: Rows per upsert.
        progress: Show a progress bar on stderr.

    Returns:
        {"collection", "model_uri", "rows", "indexed", "skipped" (rows with an error, no vector or no id),
        "skipped_error", "skipped_no_id", "rows_without_id" (the first 20 such rows' numbers, 0-based),
        "repeated_ids" (rows whose id an earlier row had: each replaced that row's point, last one wins),
        "rows_with_repeated_id" (the first 20),
        "added", "updated", "points", "filter_fields" (payload field -> index type), "payload_fields"
        (every payload field -> its type), and "note" when the collection was created with other build
        settings than `store.config` asks for}.

    Raises:
        IndexRefused: Another embedding space, a vector of the wrong size, a missing column, an id that
            cannot be kept exactly, or no such table.
        ModelLoadError: MLflow cannot find `model_uri`.
    """
    import pyarrow as pa
    from tqdm import tqdm

    frames = read_table(source, batch_rows)  # a missing path is refused before the registry is asked
    space = model_space(model_uri)
    store.ensure(space)
    before = store.count()
    cleared = False  # the completion record, cleared before the first write (a refused run changes nothing)
    rows = indexed = skipped_error = 0
    no_id: list[int] = []
    repeated: list[int] = []  # rows whose id an earlier row of this run had: they replace it
    seen: set[int] = set()
    fields: dict[str, str] = {}
    bar = tqdm(desc=f"index {store.collection}", unit=" rows", disable=not progress)
    for batch in frames:
        names = batch.schema.names
        id_col = id_col or names[0]
        for col in (id_col, EMBEDDING_COL):
            if col not in names:
                raise IndexRefused(f"column {col!r} not in {source}; columns: {list(names)}")
        if ID_KEY in names and id_col != ID_KEY:
            raise IndexRefused(f"column {ID_KEY!r} in {source}: the store keeps each item's id under that payload key, "
                               f"so its values would be replaced by {id_col!r}'s; rename it, or give --id-col {ID_KEY}")
        exact_below = EXACT_FLOAT32_IDS if pa.types.is_float32(batch.schema.field(id_col).type) else EXACT_FLOAT_IDS
        ids = [table_id(v, rows + n, id_col, exact_below) for n, v in enumerate(batch.column(id_col).to_pylist())]
        errors = batch.column(ERROR_COL).to_pylist() if ERROR_COL in names else [None] * len(ids)
        vectors = _vectors(batch.column(EMBEDDING_COL))
        good = []
        for n, (item_id, error, vector) in enumerate(zip(ids, errors, vectors)):
            if isinstance(error, str) or vector is None or not len(vector):
                skipped_error += 1
            elif item_id is None:
                no_id.append(rows + n)
            else:
                good.append(n)
                key = hash(str(item_id))  # ids compare by their text (point_id); a hash keeps memory small
                if key in seen:
                    repeated.append(rows + n)
                seen.add(key)
        payload_cols = [c for c in names if c not in (EMBEDDING_COL, ERROR_COL)]
        if good:
            wrong = next((n for n in good if len(vectors[n]) != space.embedding_dim), None)
            if wrong is not None:
                raise IndexRefused(f"row {ids[wrong]!r}: embedding has {len(vectors[wrong])} values, the collection "
                                   f"holds {space.embedding_dim}-d vectors of {space.model_uri}")
            columns = {c: batch.column(c).take(good).to_pylist() for c in payload_cols}
            payloads = [{c: _plain(columns[c][m]) for c in payload_cols} for m in range(len(good))]
            if not cleared:  # until this run completes: a run killed halfway leaves the collection incomplete
                store.record(INDEXED, None)
                cleared = True
            store.upsert([ids[n] for n in good], _stack([vectors[n] for n in good]), payloads)
            for c in payload_cols:
                kinds = {payload_type(p[c]) for p in payloads if p[c] is not None} - {None}
                merge_field_types(fields, {c: kinds.pop() if len(kinds) == 1 else "mixed"} if kinds else {})
        indexed += len(good)
        rows += len(ids)
        bar.update(len(ids))
    bar.close()
    if rows and not indexed and len(no_id) == rows:
        raise IndexRefused(f"--input {source}: every row's id in column {id_col!r} is empty, so nothing can be "
                           "indexed; name the id column with --id-col")
    wanted = store.config.filter_fields
    filter_fields = {c: t for c, t in fields.items() if t in PAYLOAD_TYPES
                     and (c in wanted if wanted is not None else c not in (*NOT_FILTERED, id_col))}
    bar = tqdm(desc=f"build the index of {store.collection} (HNSW)", total=1, disable=not progress)
    store.finish(filter_fields, fields)
    bar.update(1)
    bar.close()
    after = store.count()
    report = {"collection": store.collection, "model_uri": space.model_uri, "rows": rows, "indexed": indexed,
              "skipped": skipped_error + len(no_id), "skipped_error": skipped_error, "skipped_no_id": len(no_id),
              "rows_without_id": no_id[:20], "repeated_ids": len(repeated), "rows_with_repeated_id": repeated[:20],
              "added": after - before, "updated": indexed - (after - before),
              "points": after, "filter_fields": filter_fields, "payload_fields": fields}
    store.record(INDEXED, {"input": source, "model_uri": space.model_uri, "rows": rows, "points": after,
                           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    recorded = store.created_with()  # an embedded store's settings, fixed when it was created
    if recorded is not None and recorded != build_settings(store.config):
        report["note"] = (f"the collection keeps the settings it was created with, {recorded}; index.* asks for "
                          f"{build_settings(store.config)}: index into a new --collection to use them")
    return report


def _vectors(column) -> list:
    """An Arrow list column of vectors -> per-row float32 arrays (None where the row has none)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_null(column.type):  # a batch of failed rows only, typed from its values
        return [None] * len(column)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [values[offsets[n]:offsets[n + 1]] if valid[n] else None for n in range(len(column))]


def _stack(vectors) -> Any:
    import numpy as np

    return np.stack(vectors).astype(np.float32, copy=False)


def _plain(value: object) -> object:
    """A JSON-ready payload value: numpy and pandas scalars to Python, missing values (None, NaN, pd.NA,
    NaT) and non-finite floats to None, dates and times to ISO 8601 strings, lists element by element;
    raw bytes (image data) left out as None."""
    import datetime
    import decimal
    import math

    import pandas as pd

    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0):
        return [_plain(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, dict):  # a struct
        return {str(k): _plain(v) for k, v in value.items()}
    value = _plain_scalar(value)
    if isinstance(value, decimal.Decimal):  # JSON has no decimals; both stores then hold the same number
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None  # raw image bytes do not belong in a payload
    return value


def _plain_scalar(value: object) -> object:
    """A numpy scalar as its Python value; anything else as it is."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def index_space(index, source: str, model_uri: str, *, id_col: str | None = None, catalogue: dict | None = None,
                progress: bool = True) -> dict[str, Any]:
    """`clip-pyfunc index`: upsert an embed-table output into the collection of its model's space.

    `index.collection` names the live collection (an alias, search.aliases). Vectors of the live
    collection's space go into it. Vectors of another space go into a collection of their own
    (`space_collection`), which does not go live: `clip-pyfunc promote` switches the alias to it
    together with the models. Where no collection is live under the name yet, the new one goes
    live at once.

    Args:
        index: The store settings; `collection` is the alias.
        source, model_uri, id_col, progress: As `index_table`.
        catalogue: What the embeddings were made from (embed-table's input: {"input", "input_format",
            "id_col", "input_col"}), recorded so a promotion can re-embed it with another model.

    Returns:
        `index_table`'s report, plus "alias", "live" (whether the alias names this collection now) and a
        "note" saying how to make it live where it is not.

    Raises:
        As `index_table`; IndexRefused also when the live collection cannot be read.
    """
    from clip_pyfunc.search.aliases import open_aliases, space_collection
    from clip_pyfunc.search.store import open_store

    read_table(source, 1)  # a missing path is refused before the registry is asked
    space = model_space(model_uri)
    alias = index.collection
    with open_aliases(index) as aliases:
        live = aliases.live(alias)
        target = space_collection(alias, space)
        held = None if live is None else aliases.describe(live)  # read without the lock a running app holds
        if held is None:
            live = None
        elif held[0].same_as(space):
            target = live
        with open_store(dataclasses.replace(index, collection=target), resolve=False) as store:
            report = index_table(store, source, model_uri, id_col=id_col, batch_rows=index.batch_rows,
                                 progress=progress)
            if catalogue is not None:
                store.record(CATALOGUE, catalogue)
        if live is None and target != alias:
            aliases.switch(alias, target)
            live = target
    report.update(alias=alias, live=live == target)
    if live != target:
        report["note"] = " ".join(filter(None, [report.get("note"), f"{target} holds another embedding space than the live collection {live}, which {alias!r} "
                          f"still names: search and the app answer from {live} until `clip-pyfunc promote` moves the "
                          "models and the collection together"]))
    return report
