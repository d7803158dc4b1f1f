"""Index embeddings in Qdrant: open the store, record and check a collection's space, upsert a table.

One code path for both Qdrant deployments: qdrant-client's embedded local mode (a directory,
brute-force search) and a Qdrant server (`url`, or QDRANT_URL) speak the same client API.

A collection remembers the embedding space it holds: the model that made the vectors (pinned
to its version), the run that logged it (the text and image models of one run share a space),
their URIs and the dimension. Vectors from another space are refused, because mixing spaces
silently gives plausible, wrong answers.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from clip_pyfunc.errors import ClipPyfuncError, one_line
from clip_pyfunc.models.request import EMBEDDING_COL, ERROR_COL
from clip_pyfunc.registry.lookup import model_error

ID_KEY = "id"  # the payload key that holds the table's own id (Qdrant ids must be ints or UUIDs)
META_KEY = "clip_pyfunc"
_ID_NAMESPACE = uuid.UUID("6f1e2d1c-0b7a-4e55-9c3e-2f1f6f3a9d10")


class IndexRefused(ClipPyfuncError):
    """An index operation was refused: another embedding space, a bad table, a locked or unreachable store."""


class NoIndex(IndexRefused):
    """There is no index to read: no local-mode folder, or no such collection."""


MAKE_INDEX = ("Make one with `clip-pyfunc embed-table --model-uri MODEL --input PHOTOS --output TABLE` "
              "then `clip-pyfunc index --input TABLE --model-uri MODEL`")


@dataclass(frozen=True, kw_only=True)
class Space:
    """The embedding space a collection holds.

    Attributes:
        model_uri: The model that made the vectors, pinned (`models:/name/version`).
        run_id: The run that logged it; its text, image and combined models share the space.
        models: {"text": uri, "image": uri, ...} registered in that run.
        embedding_dim: Vector size.
    """

    model_uri: str
    run_id: str
    models: dict[str, str]
    embedding_dim: int

    @classmethod
    def of_model(cls, model_uri: str) -> Space:
        """The space of a registered (or logged) model, read from the registry."""
        import mlflow
        from mlflow.exceptions import MlflowException

        from clip_pyfunc.registry.lookup import pin_model_uri, run_models

        try:
            info = mlflow.models.get_model_info(model_uri)
            dim = int((info.metadata or {}).get("embedding_dim", 0))
            return cls(model_uri=pin_model_uri(model_uri), run_id=info.run_id or "", models=run_models(model_uri),
                       embedding_dim=dim)
        except MlflowException as e:
            raise model_error("--model-uri", model_uri, e) from e

    def to_dict(self) -> dict[str, Any]:
        return {"model_uri": self.model_uri, "run_id": self.run_id, "models": dict(self.models),
                "embedding_dim": self.embedding_dim}


def open_client(path: str | None = None, url: str | None = None, *, must_exist: bool = False):
    """A Qdrant client: a server at `url` (or QDRANT_URL, with QDRANT_API_KEY), else local mode under `path`.

    Args:
        path: The local-mode folder (default ./clip-index).
        url: A Qdrant server; wins over `path`.
        must_exist: Refuse a local-mode folder that does not exist instead of creating it (readers).

    Raises:
        NoIndex: `must_exist` and there is no folder at `path`.
        IndexRefused: The folder is open in another process (local mode allows one), it cannot be
            opened, or the server cannot be reached or refuses the API key.
    """
    import warnings

    from qdrant_client import QdrantClient
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    url = url or os.environ.get("QDRANT_URL")
    if url:
        with warnings.catch_warnings(record=True) as caught:  # its version-check warning, when unreachable
            warnings.simplefilter("always")
            client = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"))
            try:
                client.get_collections()  # the client connects lazily: find out now
            except (ResponseHandlingException, UnexpectedResponse) as e:
                client.close()
                raise IndexRefused(f"cannot use the Qdrant server at {url} ({one_line(e)}): start it, or check "
                                   "--qdrant-url / QDRANT_URL and QDRANT_API_KEY") from e
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return client
    path = path or "clip-index"
    if must_exist and not os.path.isdir(path):
        raise NoIndex(f"no index at {path} (local mode folder; --index-path, or --qdrant-url for a server). "
                      f"{MAKE_INDEX}")
    try:
        return QdrantClient(path=path)
    except RuntimeError as e:
        if "already accessed" not in str(e):
            raise
        raise IndexRefused(
            f"the index folder {path} is open in another process (a running `clip-pyfunc app`, or another "
            "command), and local mode allows one process at a time: query the running app's POST /search "
            "instead, stop that process, or serve the index from a Qdrant server (--qdrant-url)") from e
    except OSError as e:
        raise IndexRefused(f"cannot open the index folder {path}: {e}") from e


def point_id(item_id: object) -> str:
    """The Qdrant point id of a table id: a UUID derived from it, so a re-run upserts the same point."""
    return str(uuid.uuid5(_ID_NAMESPACE, str(item_id)))


def collection_space(client, collection: str) -> Space:
    """The space a collection records.

    Raises:
        NoIndex: The collection does not exist.
        IndexRefused: It was not made by `clip-pyfunc index`.
    """
    if not client.collection_exists(collection):
        names = [c.name for c in client.get_collections().collections]
        raise NoIndex(f"no collection {collection!r}; collections here: {names}. {MAKE_INDEX}")
    meta = (client.get_collection(collection).config.metadata or {}).get(META_KEY)
    if not meta:
        raise IndexRefused(f"collection {collection!r} was not made by clip-pyfunc: it records no embedding model")
    return Space(**meta)


def require_space(space: Space, collection: str, kind: str, metadata) -> None:
    """Refuse a model of another run or dimension than the collection's: its queries would land elsewhere.

    Args:
        space: The collection's space (collection_space).
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


def ensure_collection(client, collection: str, space: Space) -> None:
    """Create the collection for `space`, or check that an existing one holds the same space.

    Raises:
        IndexRefused: The collection holds another embedding space (another run or dimension).
    """
    from qdrant_client import models

    if not client.collection_exists(collection):
        client.create_collection(collection, vectors_config=models.VectorParams(
            size=space.embedding_dim, distance=models.Distance.COSINE), metadata={META_KEY: space.to_dict()})
        return
    held = collection_space(client, collection)
    if held.run_id != space.run_id or held.embedding_dim != space.embedding_dim:
        raise IndexRefused(
            f"collection {collection!r} holds vectors of {held.model_uri} (run {held.run_id}, dim "
            f"{held.embedding_dim}); these come from {space.model_uri} (run {space.run_id}, dim "
            f"{space.embedding_dim}), another embedding space. Mixing them gives wrong answers: index into "
            "another --collection, or re-embed everything with the collection's model")


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


def index_table(client, collection: str, source: str, model_uri: str, *, id_col: str | None = None,
                batch_rows: int = 512, progress: bool = True) -> dict[str, Any]:
    """Upsert an embed-table output into `collection`: one point per good row, keyed by its id.

    Args:
        client: From `open_client`.
        collection: Collection name (created on first use).
        source: A parquet path or a table with columns id, `embedding`, `error` and payload columns.
        model_uri: The model that made the embeddings (its space is recorded and checked).
        id_col: The id column; None takes the table's first column (embed-table writes it first).
        batch_rows: Points per upsert.
        progress: Show a progress bar on stderr.

    Returns:
        {"collection", "rows", "indexed", "skipped" (rows with an error or no vector), "added",
        "updated", "points"}.

    Raises:
        IndexRefused: Another embedding space, a vector of the wrong size, a missing column, or no such table.
        ModelLoadError: MLflow cannot find `model_uri`.
    """
    import numpy as np
    from qdrant_client import models
    from tqdm import tqdm

    frames = read_table(source, batch_rows)  # a missing path is refused before the registry is asked
    space = Space.of_model(model_uri)
    ensure_collection(client, collection, space)
    before = client.count(collection, exact=True).count
    rows = indexed = skipped = 0
    bar = tqdm(desc=f"index {collection}", unit=" rows", disable=not progress)
    for frame in frames:
        id_col = id_col or frame.columns[0]
        for col in (id_col, EMBEDDING_COL):
            if col not in frame.columns:
                raise IndexRefused(f"column {col!r} not in {source}; columns: {list(frame.columns)}")
        payload_cols = [c for c in frame.columns if c not in (EMBEDDING_COL, ERROR_COL)]
        points = []
        for record in frame.to_dict("records"):
            vector = record[EMBEDDING_COL]
            failed = isinstance(record.get(ERROR_COL), str) or vector is None
            if failed:
                skipped += 1
                continue
            vector = np.asarray(vector, dtype=np.float32)
            if vector.shape != (space.embedding_dim,):
                raise IndexRefused(f"row {record[id_col]!r}: embedding has shape {vector.shape}, the collection holds "
                                  f"{space.embedding_dim}-d vectors of {space.model_uri}")
            payload = {c: _plain(record[c]) for c in payload_cols}
            payload[ID_KEY] = _plain(record[id_col])
            points.append(models.PointStruct(id=point_id(record[id_col]), vector=vector.tolist(), payload=payload))
        if points:
            client.upsert(collection, points=points, wait=True)
        indexed += len(points)
        rows += len(frame)
        bar.update(len(frame))
    bar.close()
    after = client.count(collection, exact=True).count
    return {"collection": collection, "model_uri": space.model_uri, "rows": rows, "indexed": indexed,
            "skipped": skipped, "added": after - before, "updated": indexed - (after - before), "points": after}


def _plain(value: object) -> object:
    """A JSON-ready payload value (numpy scalars and arrays to Python, NaN to None)."""
    import math

    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        return None  # raw image bytes do not belong in a payload
    return value
