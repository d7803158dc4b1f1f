"""Where the vectors live: one small store interface, two Qdrant deployments behind it.

- `EdgeStore`: Qdrant's own engine in this process (qdrant-edge-py, Qdrant Edge): segments, a
  write-ahead log, HNSW, payload indexes and scalar quantization, in a folder under `index.path`.
  The default. One process at a time holds a store (a lock on its WAL).
- `ServerStore`: a Qdrant server or cluster through qdrant-client (`index.url` / QDRANT_URL).
  The tests drive it through qdrant-client's own in-process mode (`QdrantClient(":memory:")`),
  the stand-in qdrant-client offers for tests; no Qdrant server runs here.

Both hold one collection, record the embedding space it holds (`Space`, in a JSON file beside the
shard, or in the collection's metadata on a server), take the same settings (`IndexConfig`), and answer with
the same `Hit`s keyed by the table's own ids. The caller decides what to put in: ids, float32
vectors, JSON payloads.

A filtered query asks for ACORN (Qdrant's filtered graph search, https://qdrant.tech/documentation/
concepts/search/#acorn-search-algorithm): without per-value links (`hnsw_payload_m` 0, the
default) a plain filtered walk lost neighbours, 0.74 recall@10 against 1.0 with ACORN on a 1-in-10
filter (tests/test_store.py).

HNSW, the payload indexes and the quantized copy are built once, in `finish()`, at the end of an
index run: Qdrant's bulk-load recipe ("indexing_threshold: 0" while loading, https://qdrant.tech/
documentation/database-tutorials/bulk-upload/). Until then queries scan the unindexed segments, which
is exact and correct, only slower.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from clip_pyfunc.errors import ClipPyfuncError, one_line
from clip_pyfunc.settings import IndexConfig

ID_KEY = "id"  # the payload key that holds the table's own id (Qdrant ids must be ints or UUIDs)
META_KEY = "clip_pyfunc"
META_FILE = "clip_pyfunc.json"  # beside an Edge shard: the space and the store's settings
SHARD_DIR = "shard"
_ID_NAMESPACE = uuid.UUID("6f1e2d1c-0b7a-4e55-9c3e-2f1f6f3a9d10")
SERVER_INDEXING_THRESHOLD_KB = 20000  # Qdrant's default `optimizers.indexing_threshold`, restored by finish()
PAYLOAD_TYPES = ("keyword", "integer", "bool")  # what `key=value` filters match
RECORDS_KEY = "clip_pyfunc_records"  # a server collection's metadata: what `Store.record` kept
FIELDS_KEY = "clip_pyfunc_fields"  # a server collection's metadata: payload field -> type (`payload_type`)
# Qdrant Edge's Python binding (qdrant-edge-py 0.9) reads `MatchValue(True)` as the integer 1 (bool is an
# int subclass), so a filter on a boolean field matches nothing. The embedded store therefore keeps each
# boolean also as the keyword "true"/"false" under this key, filters on that, and hides it from answers.
BOOL_KEY = "_clip_pyfunc_bool"

MAKE_INDEX = ("Make one with `clip-pyfunc embed-table --model-uri MODEL --input PHOTOS --output TABLE` "
              "then `clip-pyfunc index --input TABLE --model-uri MODEL`")
IN_USE = ("query the running app's POST /search instead, stop the process that holds it, or serve the index from "
          "a Qdrant server (`clip-pyfunc index --to-server URL`, then --qdrant-url)")


class IndexRefused(ClipPyfuncError):
    """An index operation was refused: another embedding space, a bad table, a locked or unreachable store."""


class NoIndex(IndexRefused):
    """There is no index to read: no store folder, or no such collection."""


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
    embedding_space: str = ""  # registry.lookup.embedding_space of the model; "" in collections made before it

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str) -> Space:
        """A space as a collection recorded it; fields a newer clip-pyfunc added are dropped, with one warning.

        Raises:
            IndexRefused: A field this version needs is missing.
        """
        import warnings

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            warnings.warn(f"{where}: the collection's space records fields this clip-pyfunc does not know, left out: "
                          f"{', '.join(unknown)}", UserWarning, stacklevel=2)
        try:
            return cls(**{k: v for k, v in record.items() if k in known})
        except TypeError as e:
            raise IndexRefused(f"{where}: the collection's recorded space is incomplete ({e})") from e

    @property
    def key(self) -> str:
        """What two spaces compare by: the weights' digest, or for a collection made before it, its run."""
        return self.embedding_space or f"run:{self.run_id}"

    def to_dict(self) -> dict[str, Any]:
        return {"model_uri": self.model_uri, "run_id": self.run_id, "models": dict(self.models),
                "embedding_dim": self.embedding_dim, "embedding_space": self.embedding_space}

    def same_as(self, other: Space) -> bool:
        """The same space: one checkpoint's weights (however many registrations), or one run, and one dimension."""
        return self.key == other.key and self.embedding_dim == other.embedding_dim


def build_settings(config: IndexConfig) -> dict[str, Any]:
    """The settings fixed when a collection is created, as recorded beside it (see `IndexConfig`)."""
    return {"hnsw_m": config.hnsw_m, "hnsw_ef_construct": config.hnsw_ef_construct,
            "hnsw_payload_m": config.hnsw_payload_m, "full_scan_threshold_kb": config.full_scan_threshold_kb,
            "quantization": config.quantization}


@dataclass
class Hit:
    """One stored item: the table's id, its score (cosine similarity, queries only), payload and vector."""

    id: Any
    score: float | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    vector: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "payload": self.payload}


Filters = Sequence[tuple[str, Sequence[Any]]]  # every (key, options) must match one of its options


def point_id(item_id: object) -> str:
    """The Qdrant point id of a table id: a UUID derived from it, so a re-run upserts the same point."""
    return str(uuid.uuid5(_ID_NAMESPACE, str(item_id)))


def payload_type(value: object) -> str | None:
    """The type of a JSON payload value: "bool", "integer", "keyword" (strings), "float", "object", or a
    list's element type when its elements share one (Qdrant matches an array when any element matches);
    None for None, an empty list and a list of mixed types. Only `PAYLOAD_TYPES` take `key=value` filters."""
    if isinstance(value, bool):  # before int: True is an int in Python
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "keyword"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        kinds = {payload_type(v) for v in value if v is not None}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def merge_field_types(into: dict[str, str], fields: dict[str, str]) -> dict[str, str]:
    """`into` updated with `fields`; a field seen with two types becomes "mixed" (no filter can match it all)."""
    for name, kind in fields.items():
        into[name] = kind if into.get(name, kind) == kind else "mixed"
    return into


def _hit(point, score: float | None = None) -> Hit:
    payload = dict(point.payload or {})
    payload.pop(BOOL_KEY, None)
    return Hit(id=payload.pop(ID_KEY, str(point.id)), score=score, payload=payload,
               vector=getattr(point, "vector", None))


class Store(ABC):
    """One collection of vectors with the embedding space it records.

    Vectors are float32 `[dim]` (cosine distance); ids are the table's own ids (any JSON scalar,
    compared as strings); payloads are flat JSON objects.
    """

    collection: str
    where: str  # the folder or URL, for messages
    config: IndexConfig
    alias: str | None = None  # the name it was opened by, where that is an alias (search.aliases)

    @abstractmethod
    def space(self) -> Space:
        """The space the collection holds.

        Raises:
            NoIndex: No such collection.
            IndexRefused: It was not made by clip-pyfunc.
        """

    @abstractmethod
    def create(self, space: Space) -> None:
        """Create the collection for `space` with this store's build settings."""

    def ensure(self, space: Space) -> None:
        """Create the collection for `space`, or check that an existing one holds the same space.

        Raises:
            IndexRefused: The collection holds another embedding space (other weights, or dimension).
        """
        try:
            held = self.space()
        except NoIndex:
            self.create(space)
            return
        if not held.same_as(space):
            raise IndexRefused(
                f"collection {self.collection!r} holds vectors of {held.model_uri} (space {held.key}, run "
                f"{held.run_id}, dim {held.embedding_dim}); these come from {space.model_uri} (space {space.key}, run "
                f"{space.run_id}, dim {space.embedding_dim}), another embedding space. Mixing them gives wrong answers: index into "
                "another --collection, or re-embed everything with the collection's model")

    @abstractmethod
    def upsert(self, ids: Sequence[Any], vectors, payloads: Sequence[dict[str, Any]]) -> None:
        """Insert or replace items by id; each payload also keeps its id under `ID_KEY`.

        Args:
            ids: The table's ids, one per row.
            vectors: float32 [rows, dim].
            payloads: One JSON object per row.
        """

    @abstractmethod
    def finish(self, filter_fields: dict[str, str], payload_fields: dict[str, str] | None = None) -> None:
        """Build the payload indexes (field -> `PAYLOAD_TYPES`), HNSW and the quantized copy; blocks.

        Args:
            filter_fields: The fields to index for filters, with their types.
            payload_fields: Every payload field seen, with its type (`payload_type`, or "mixed"); merged into
                what the collection records (`payload_fields`). None records nothing (filters stay untyped
                on a collection that never recorded its fields).
        """

    @abstractmethod
    def payload_fields(self) -> dict[str, str] | None:
        """The payload fields the collection records, field -> type (`payload_type`, or "mixed"); filters are
        typed by it. None for a collection indexed before clip-pyfunc recorded them."""

    def bool_filters(self) -> bool:
        """Whether a filter on a boolean field can match here (see `BOOL_KEY`)."""
        return True

    def filter_fields(self) -> dict[str, str]:
        """The payload fields indexed for filters, field -> `PAYLOAD_TYPES`, as this store records them
        ({} where it records none: a server's collection)."""
        return {}

    def created_with(self) -> dict[str, Any] | None:
        """The build settings (`build_settings`) the collection was created with, where the store records
        them (an embedded one); None elsewhere."""
        return None

    @abstractmethod
    def record(self, key: str, value: Any) -> None:
        """Keep `value` (JSON) under `key` in the collection's own metadata (`recorded` reads it back)."""

    @abstractmethod
    def recorded(self, key: str) -> Any:
        """What `record` kept under `key`, or None."""

    @abstractmethod
    def query(self, vector, k: int, filters: Filters | None = None, score_threshold: float | None = None) -> list[Hit]:
        """The k nearest items to `vector` (float32 [dim]) by cosine, best first."""

    @abstractmethod
    def query_batch(self, vectors, k: int, score_threshold: float | None = None) -> list[list[Hit]]:
        """`query` for each row of `vectors` (float32 [n, dim]), planned as one batch; hits carry ids only."""

    @abstractmethod
    def retrieve(self, ids: Sequence[Any], with_vectors: bool = False) -> list[Hit]:
        """The stored items of these table ids (missing ones left out)."""

    @abstractmethod
    def scroll(self, batch: int = 1024, with_vectors: bool = False, payload: bool = True) -> Iterator[list[Hit]]:
        """Every item, in batches of at most `batch`; `payload=False` reads ids (and vectors) only."""

    @abstractmethod
    def count(self, exact: bool = True) -> int:
        """Items stored; `exact=False` may be an estimate, and is cheap at any size (for /health)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store (the lock of an embedded one)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EdgeStore(Store):
    """A collection in Qdrant Edge (qdrant-edge-py): `<path>/<collection>/shard` plus `clip_pyfunc.json`.

    Opening a store reads its segments' files (memory-mapped), not every point. A second process
    that opens the same store is refused while the first holds it.
    """

    def __init__(self, path: str, collection: str, config: IndexConfig | None = None, *, must_exist: bool = False):
        """Open (or prepare to create) the collection's store.

        Args:
            path: The index folder (`index.path`).
            collection: Collection name; its folder under `path`.
            config: Build and query settings (build ones apply when the collection is created).
            must_exist: Refuse a missing folder at once (readers).

        Raises:
            NoIndex: `must_exist` and there is no such folder or collection.
            IndexRefused: Another process holds the store, or its files cannot be read.
        """
        self.path, self.collection, self.config = path, collection, config or IndexConfig()
        self.folder = os.path.join(path, collection)
        self.where = path
        self._shard = None
        self._meta: dict[str, Any] | None = None
        if must_exist and not os.path.isdir(path):
            raise NoIndex(f"no index at {path} (--index-path, or --qdrant-url for a server). {MAKE_INDEX}")
        if _is_local_mode_folder(path):
            raise IndexRefused(
                f"{path} is an index of qdrant-client's local mode, which clip-pyfunc wrote before it moved to Qdrant "
                "Edge and no longer reads: re-run `clip-pyfunc index` into a new --index-path, then delete the old folder")
        if os.path.isfile(os.path.join(self.folder, META_FILE)):
            self._open()
        elif must_exist:
            raise NoIndex(f"no collection {collection!r} in {path}; collections here: {self.collections(path)}. "
                          f"{MAKE_INDEX}")

    @staticmethod
    def collections(path: str) -> list[str]:
        """The collections under an index folder."""
        if not os.path.isdir(path):
            return []
        return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n, META_FILE)))

    def _open(self) -> None:
        """Read the metadata and load (or, after a run killed before its first write, create) the shard."""
        from qdrant_edge import EdgeShard

        try:
            with open(os.path.join(self.folder, META_FILE)) as f:
                self._meta = json.load(f)
        except (OSError, ValueError) as e:
            raise IndexRefused(f"cannot read {os.path.join(self.folder, META_FILE)}: {one_line(e)}") from e
        shard = os.path.join(self.folder, SHARD_DIR)
        try:
            if os.path.isfile(os.path.join(shard, "edge_config.json")):
                self._shard = EdgeShard.load(shard)
                _remove_temp_segments(shard)  # a build killed halfway: the lock is ours, so it is dead
            else:
                self._shard = EdgeShard.create(shard, self._edge_config(self._meta))
        except Exception as e:  # the binding raises a bare Exception
            if "WouldBlock" in str(e):
                raise IndexRefused(f"the index {self.folder} is in use by another process (a running `clip-pyfunc "
                                   f"app`, or an index run): {IN_USE}") from e
            raise IndexRefused(f"cannot open the index {self.folder}: {one_line(e)}") from e

    @staticmethod
    def _edge_config(meta: dict[str, Any]):
        """The shard's config from recorded build settings."""
        from qdrant_edge import (Distance, EdgeConfig, EdgeOptimizersConfig, EdgeVectorParams, HnswIndexConfig,
                                 ScalarQuantizationConfig, ScalarType)

        build = meta["build"]
        quantization = None
        if build["quantization"] == "int8":
            quantization = ScalarQuantizationConfig(type=ScalarType.Int8, quantile=0.99, always_ram=True)
        vectors = EdgeVectorParams(size=int(meta["space"]["embedding_dim"]), distance=Distance.Cosine,
                                   quantization_config=quantization)
        return EdgeConfig(vectors={"": vectors},
                          hnsw_config=HnswIndexConfig(m=build["hnsw_m"], ef_construct=build["hnsw_ef_construct"],
                                                      full_scan_threshold=build["full_scan_threshold_kb"],
                                                      payload_m=build.get("hnsw_payload_m", 0)),
                          # Edge runs its optimizers only when asked (finish): no index is built while loading.
                          optimizers=EdgeOptimizersConfig(indexing_threshold=1))

    def _need(self):
        if self._shard is None:
            raise NoIndex(f"no collection {self.collection!r} in {self.path}; collections here: "
                          f"{self.collections(self.path)}. {MAKE_INDEX}")
        return self._shard

    def space(self) -> Space:
        self._need()
        return Space.from_dict(self._meta["space"], self.folder)

    def create(self, space: Space) -> None:
        os.makedirs(self.folder, exist_ok=True)
        meta = {"space": space.to_dict(), "build": build_settings(self.config), "payload_indexes": {},
                "bool_key": BOOL_KEY}
        self._write_meta(meta)
        self._open()

    def _write_meta(self, meta: dict[str, Any]) -> None:
        """Replace the metadata file atomically (a kill leaves the old or the new one, never half)."""
        tmp = os.path.join(self.folder, META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.folder, META_FILE))
        self._meta = meta

    @property
    def build(self) -> dict[str, Any]:
        """The build settings the collection was created with."""
        self._need()
        return dict(self._meta["build"])

    def info(self) -> dict[str, Any]:
        """{"points", "indexed_vectors" (in the HNSW), "segments", "payload_indexes" (field names)}."""
        info = self._need().info()
        return {"points": info.points_count, "indexed_vectors": info.indexed_vectors_count,
                "segments": info.segments_count,
                "payload_indexes": sorted(k.removeprefix(BOOL_KEY + ".") for k in info.payload_schema)}

    @property
    def payload_indexes(self) -> dict[str, str]:
        """The payload fields indexed for filters: field -> `PAYLOAD_TYPES`."""
        self._need()
        return dict(self._meta.get("payload_indexes", {}))

    def filter_fields(self) -> dict[str, str]:
        return self.payload_indexes

    def created_with(self) -> dict[str, Any] | None:
        return self.build

    def payload_fields(self) -> dict[str, str] | None:
        self._need()
        fields = self._meta.get("payload_fields")
        return None if fields is None else dict(fields)

    def bool_filters(self) -> bool:
        self._need()
        return self._meta.get("bool_key") == BOOL_KEY

    def record(self, key: str, value: Any) -> None:
        self._need()
        self._write_meta({**self._meta, "records": {**self._meta.get("records", {}), key: value}})

    def recorded(self, key: str) -> Any:
        self._need()
        return self._meta.get("records", {}).get(key)

    def upsert(self, ids, vectors, payloads) -> None:
        from qdrant_edge import Point, UpdateOperation

        points = [Point(point_id(i), v, _with_bool_keywords({**p, ID_KEY: i}))
                  for i, v, p in zip(ids, vectors, payloads)]
        if points:
            self._need().update(UpdateOperation.upsert_points(points))

    def finish(self, filter_fields: dict[str, str], payload_fields: dict[str, str] | None = None) -> None:
        from qdrant_edge import PayloadSchemaType, UpdateOperation

        shard = self._need()
        have = dict(self._meta.get("payload_indexes", {}))
        for name, kind in filter_fields.items():
            if have.get(name) != kind:
                # a boolean is filtered through its keyword copy (BOOL_KEY), so that copy is what is indexed
                key, schema = (f"{BOOL_KEY}.{name}", "Keyword") if kind == "bool" else (name, kind.capitalize())
                shard.update(UpdateOperation.create_field_index(key, getattr(PayloadSchemaType, schema)))
                have[name] = kind
        meta = {**self._meta, "payload_indexes": have}
        if payload_fields is not None:
            meta["payload_fields"] = merge_field_types(dict(self._meta.get("payload_fields") or {}), payload_fields)
        if meta != self._meta:
            self._write_meta(meta)
        shard.optimize()
        shard.flush()
        _remove_temp_segments(os.path.join(self.folder, SHARD_DIR))

    def _params(self, k: int, filtered: bool):
        from qdrant_edge import AcornSearchParams, QuantizationSearchParams, SearchParams

        quantization = None
        if self._meta["build"]["quantization"] != "none":
            quantization = QuantizationSearchParams(rescore=True, oversampling=float(self.config.oversampling))
        return SearchParams(hnsw_ef=max(self.config.hnsw_ef, k), quantization=quantization,
                            acorn=AcornSearchParams(enable=True) if filtered else None)

    def _filter(self, filters: Filters | None):
        from qdrant_edge import FieldCondition, Filter, MatchValue

        if not filters:
            return None

        def condition(key, value):
            if isinstance(value, bool):  # see BOOL_KEY
                return FieldCondition(key=f"{BOOL_KEY}.{key}", match=MatchValue("true" if value else "false"))
            return FieldCondition(key=key, match=MatchValue(value))

        return Filter(must=[Filter(should=[condition(key, v) for v in options]) for key, options in filters])

    def _request(self, vector, k, filters=None, score_threshold=None, with_payload=True):
        from qdrant_edge import Query, QueryRequest

        return QueryRequest(limit=k, query=Query.Nearest(vector), filter=self._filter(filters),
                            with_payload=with_payload, score_threshold=score_threshold,
                            params=self._params(k, bool(filters)))

    def query(self, vector, k, filters=None, score_threshold=None) -> list[Hit]:
        found = self._need().query(self._request(vector, k, filters, score_threshold))
        return [_hit(p, float(p.score)) for p in found]

    def query_batch(self, vectors, k, score_threshold=None) -> list[list[Hit]]:
        from qdrant_edge import QueryBatchRequest

        requests = [self._request(v, k, score_threshold=score_threshold, with_payload=[ID_KEY]) for v in vectors]
        if not requests:
            return []
        return [[_hit(p, float(p.score)) for p in found]
                for found in self._need().query_batch(QueryBatchRequest(requests))]

    def retrieve(self, ids, with_vectors=False) -> list[Hit]:
        found = self._need().retrieve([point_id(i) for i in ids], with_payload=True, with_vector=with_vectors)
        return [_hit(p) for p in found]

    def scroll(self, batch=1024, with_vectors=False, payload=True) -> Iterator[list[Hit]]:
        from qdrant_edge import ScrollRequest

        shard, offset = self._need(), None
        while True:
            points, offset = shard.scroll(ScrollRequest(offset=offset, limit=batch,
                                                        with_payload=True if payload else [ID_KEY],
                                                        with_vector=with_vectors))
            if points:
                yield [_hit(p) for p in points]
            if offset is None:
                return

    def count(self, exact: bool = True) -> int:
        from qdrant_edge import CountRequest

        if not exact:
            return int(self._need().info().points_count)
        return int(self._need().count(CountRequest(exact=True)))

    def close(self) -> None:
        shard, self._shard = self._shard, None
        if shard is not None:
            try:
                shard.flush()
            finally:
                shard.close()  # releases the lock even when the flush failed


def _with_bool_keywords(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload plus a keyword copy of its booleans under `BOOL_KEY` (lists of booleans element-wise)."""
    def keyword(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        present = [v for v in value if v is not None] if isinstance(value, list) else []
        if present and all(isinstance(v, bool) for v in present):  # as payload_type types it: nulls left out
            return [keyword(v) for v in present]
        return None

    copies = {k: w for k, v in payload.items() if (w := keyword(v)) is not None}
    return {**payload, BOOL_KEY: copies} if copies else payload


def _remove_temp_segments(shard: str) -> None:
    """Remove what a segment build killed halfway left behind (`temp_segments/segment_builder_*`).

    Called with the shard open, so this process holds its lock: no other builder is running, and
    the shard's live segments are not under `temp_segments`.
    """
    import shutil

    temp = os.path.join(shard, "temp_segments")
    if os.path.isdir(temp):
        for name in os.listdir(temp):
            target = os.path.join(temp, name)
            shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)


def _is_local_mode_folder(path: str) -> bool:
    """A folder qdrant-client's local mode wrote (its `meta.json` and `collection/`)."""
    return os.path.isfile(os.path.join(path, "meta.json")) and os.path.isdir(os.path.join(path, "collection"))


def _floats(vector) -> list[float]:
    """A vector as the JSON list qdrant-client sends."""
    import numpy as np

    return np.asarray(vector, dtype=np.float32).tolist()


class ServerStore(Store):
    """A collection on a Qdrant server or cluster, through qdrant-client; the space is in its metadata."""

    def __init__(self, client, collection: str, config: IndexConfig | None = None, *, where: str = "server"):
        """Use one collection through a connected client.

        Args:
            client: A `qdrant_client.QdrantClient` (from `connect_server`, or `QdrantClient(":memory:")` in tests).
            collection: Collection name.
            config: Build and query settings.
            where: The server's URL, for messages.
        """
        self.client, self.collection, self.config, self.where = client, collection, config or IndexConfig(), where
        self._quantization: bool | None = None

    def space(self) -> Space:
        if not self.client.collection_exists(self.collection):
            names = [c.name for c in self.client.get_collections().collections]
            raise NoIndex(f"no collection {self.collection!r} at {self.where}; collections there: {names}. "
                          f"{MAKE_INDEX}")
        meta = (self.client.get_collection(self.collection).config.metadata or {}).get(META_KEY)
        if not meta:
            raise IndexRefused(f"collection {self.collection!r} was not made by clip-pyfunc: it records no "
                               "embedding model")
        return Space.from_dict(meta, f"{self.where} {self.collection!r}")

    def create(self, space: Space) -> None:
        from qdrant_client import models

        quantization = None
        if self.config.quantization == "int8":
            quantization = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
                type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
        self.client.create_collection(
            self.collection,
            vectors_config=models.VectorParams(size=space.embedding_dim, distance=models.Distance.COSINE),
            hnsw_config=models.HnswConfigDiff(m=self.config.hnsw_m, ef_construct=self.config.hnsw_ef_construct,
                                              full_scan_threshold=self.config.full_scan_threshold_kb,
                                              payload_m=self.config.hnsw_payload_m),
            optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0),  # build once, in finish()
            quantization_config=quantization, metadata={META_KEY: space.to_dict()})

    def upsert(self, ids, vectors, payloads) -> None:
        from qdrant_client import models

        points = [models.PointStruct(id=point_id(i), vector=_floats(v), payload={**p, ID_KEY: i})
                  for i, v, p in zip(ids, vectors, payloads)]
        if points:
            self.client.upsert(self.collection, points=points, wait=True)

    def finish(self, filter_fields: dict[str, str], payload_fields: dict[str, str] | None = None) -> None:
        import warnings

        from qdrant_client import models

        if payload_fields is not None:
            fields = merge_field_types(self.payload_fields() or {}, payload_fields)
            metadata = self.client.get_collection(self.collection).config.metadata or {}
            self.client.update_collection(self.collection, metadata={**metadata, FIELDS_KEY: fields})

        with warnings.catch_warnings():  # in-process mode says payload indexes do nothing there
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            for name, kind in filter_fields.items():
                self.client.create_payload_index(self.collection, name,
                                                  field_schema=getattr(models.PayloadSchemaType, kind.upper()))
        self.client.update_collection(self.collection, optimizers_config=models.OptimizersConfigDiff(
            indexing_threshold=SERVER_INDEXING_THRESHOLD_KB))
        while self.client.get_collection(self.collection).status != models.CollectionStatus.GREEN:
            time.sleep(1)  # the server builds in the background: finish() blocks until it is done

    def payload_fields(self) -> dict[str, str] | None:
        fields = (self.client.get_collection(self.collection).config.metadata or {}).get(FIELDS_KEY)
        return None if fields is None else dict(fields)

    def record(self, key: str, value: Any) -> None:
        metadata = self.client.get_collection(self.collection).config.metadata or {}
        records = {**metadata.get(RECORDS_KEY, {}), key: value}
        self.client.update_collection(self.collection, metadata={**metadata, RECORDS_KEY: records})

    def recorded(self, key: str) -> Any:
        metadata = self.client.get_collection(self.collection).config.metadata or {}
        return metadata.get(RECORDS_KEY, {}).get(key)

    def _quantized(self) -> bool:
        """Whether the collection holds quantized vectors, as the server says (not as this conf asks)."""
        if self._quantization is None:
            self._quantization = self.client.get_collection(self.collection).config.quantization_config is not None
        return self._quantization

    def _params(self, k: int, filtered: bool = False):
        from qdrant_client import models

        quantization = None
        if self._quantized():
            quantization = models.QuantizationSearchParams(rescore=True, oversampling=float(self.config.oversampling))
        return models.SearchParams(hnsw_ef=max(self.config.hnsw_ef, k), quantization=quantization,
                                   acorn=models.AcornSearchParams(enable=True) if filtered else None)

    @staticmethod
    def _filter(filters: Filters | None):
        from qdrant_client import models

        if not filters:
            return None
        return models.Filter(must=[models.Filter(should=[
            models.FieldCondition(key=key, match=models.MatchValue(value=v)) for v in options])
            for key, options in filters])

    def query(self, vector, k, filters=None, score_threshold=None) -> list[Hit]:
        found = self.client.query_points(self.collection, query=_floats(vector), limit=k,
                                         query_filter=self._filter(filters),
                                         search_params=self._params(k, bool(filters)),
                                         score_threshold=score_threshold, with_payload=True).points
        return [_hit(p, float(p.score)) for p in found]

    def query_batch(self, vectors, k, score_threshold=None) -> list[list[Hit]]:
        from qdrant_client import models

        requests = [models.QueryRequest(query=_floats(v), limit=k, params=self._params(k),
                                        score_threshold=score_threshold, with_payload=[ID_KEY]) for v in vectors]
        if not requests:
            return []
        answers = self.client.query_batch_points(self.collection, requests=requests)
        return [[_hit(p, float(p.score)) for p in answer.points] for answer in answers]

    def retrieve(self, ids, with_vectors=False) -> list[Hit]:
        found = self.client.retrieve(self.collection, [point_id(i) for i in ids], with_payload=True,
                                     with_vectors=with_vectors)
        return [_hit(p) for p in found]

    def scroll(self, batch=1024, with_vectors=False, payload=True) -> Iterator[list[Hit]]:
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=batch, offset=offset,
                                                with_payload=True if payload else [ID_KEY], with_vectors=with_vectors)
            if points:
                yield [_hit(p) for p in points]
            if offset is None:
                return

    def count(self, exact: bool = True) -> int:
        return int(self.client.count(self.collection, exact=exact).count)

    def close(self) -> None:
        self.client.close()


def connect_server(url: str):
    """A qdrant-client connected to the server at `url` (QDRANT_API_KEY sent when set).

    Raises:
        IndexRefused: The server cannot be reached, or refuses the API key.
    """
    import warnings

    from qdrant_client import QdrantClient
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

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


ALIASES_FILE = "aliases.json"  # in an embedded index folder: {alias: collection} (search.aliases)


def read_edge_aliases(path: str) -> dict[str, str]:
    """{alias: collection} of an embedded index folder ({} where it has none).

    Raises:
        IndexRefused: The file cannot be read.
    """
    try:
        with open(os.path.join(path, ALIASES_FILE)) as f:
            return dict(json.load(f))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise IndexRefused(f"cannot read {os.path.join(path, ALIASES_FILE)}: {one_line(e)}") from e


def read_server_aliases(client) -> dict[str, str]:
    """{alias: collection} of a Qdrant server."""
    return {a.alias_name: a.collection_name for a in client.get_aliases().aliases}


def open_store(index, *, must_exist: bool = False, resolve: bool = True) -> Store:
    """The store an `IndexConfig` names: a server at `index.url` (or QDRANT_URL), else Qdrant Edge at `index.path`.

    `index.collection` may be an alias (search.aliases): the store opens the collection it names now,
    and keeps it open when the alias moves on; `store.alias` is the name asked for. `resolve=False`
    opens the collection of that very name.

    Raises:
        NoIndex: `must_exist` and the embedded store has no such folder or collection.
        IndexRefused: The store is in use by another process, unreadable, or the server is unreachable.
    """
    url = index.url or os.environ.get("QDRANT_URL")
    if url:
        client = connect_server(url)
        name = read_server_aliases(client).get(index.collection, index.collection) if resolve else index.collection
        store = ServerStore(client, name, index, where=url)
    else:
        path = index.path or "clip-index"
        name = read_edge_aliases(path).get(index.collection, index.collection) if resolve else index.collection
        store = EdgeStore(path, name, index, must_exist=must_exist)
    store.alias = index.collection
    return store


def copy_store(source: Store, target: Store, *, batch: int = 1024, progress: bool = False) -> dict[str, Any]:
    """Copy every item of `source` into `target` in batched upserts, then build the target's index.

    The target gets the source's space (an existing target collection must hold the same one) and
    its payload indexes; its HNSW and quantization settings are the target store's own config.
    Re-running a copy upserts the same ids again, so a copy cut off halfway is completed by a re-run.

    Returns:
        {"collection", "from", "to", "copied", "points" (in the target afterwards)}.

    Raises:
        IndexRefused: The target collection holds another embedding space.
    """
    import numpy as np
    from tqdm import tqdm

    target.ensure(source.space())
    copied = 0
    bar = tqdm(desc=f"copy {source.collection}", unit=" points", total=source.count(), disable=not progress)
    for items in source.scroll(batch=batch, with_vectors=True):
        target.upsert([h.id for h in items], np.asarray([h.vector for h in items], dtype=np.float32),
                      [h.payload for h in items])
        copied += len(items)
        bar.update(len(items))
    bar.close()
    target.finish(source.filter_fields(), source.payload_fields())
    return {"collection": target.collection, "from": source.where, "to": target.where, "copied": copied,
            "points": target.count()}


def copy_to_server(index, url: str, *, progress: bool = True) -> dict[str, Any]:
    """`clip-pyfunc index --to-server URL`: the embedded collection of `index` into the server at `url`.

    Batched upserts through qdrant-client rather than a snapshot: they work with any server
    version and cluster layout, and keep the collection's space in its metadata.

    Raises:
        NoIndex: No embedded collection to copy.
        IndexRefused: The embedded store is in use, the server is unreachable, or its collection holds
            another embedding space.
    """
    from qdrant_client import models

    name = read_edge_aliases(index.path).get(index.collection, index.collection)  # the live one, by its own name
    with EdgeStore(index.path, name, index, must_exist=True) as source:
        server_config = dataclasses.replace(index, **source.build)  # the server collection is built as the source was
        with ServerStore(connect_server(url), name, server_config, where=url) as target:
            report = copy_store(source, target, batch=index.batch_rows, progress=progress)
            if name != index.collection:  # and the alias, as the embedded store has it (one atomic request)
                operations = [models.CreateAliasOperation(create_alias=models.CreateAlias(
                    collection_name=name, alias_name=index.collection))]
                if index.collection in read_server_aliases(target.client):
                    operations.insert(0, models.DeleteAliasOperation(delete_alias=models.DeleteAlias(
                        alias_name=index.collection)))
                target.client.update_collection_aliases(change_aliases_operations=operations)
                report["alias"] = index.collection
            return report
