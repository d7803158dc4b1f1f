"""Answers that never lose, merge or misfilter data: ids, payload types and filters, in both stores,
the CLI and the app, checked against the same question asked of the table in pandas.

The table holds the column types real tables carry: a nullable int64 id with 19-digit values, a
boolean, a nullable integer, a float, a keyword, a list of keywords and a decimal. Its vectors are
random (no meaning): the filters and ids are under test, not the ranking.
"""

from __future__ import annotations

import decimal
import json
import subprocess
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.search.index import index_table
from clip_pyfunc.search.query import Searcher, parse_filters
from clip_pyfunc.search.store import EdgeStore, IndexRefused, ServerStore

BIG = 1239162456494753670  # above 2**53: as float64 it and BIG + 1 are one number
ROWS = 19


def _table(dim: int, with_null_id: bool = True) -> pd.DataFrame:
    """19 items (7 on sale, 12 not), plus a row without an id; random unit vectors, seeded."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((ROWS + 1, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [7, 101, 102, BIG, BIG + 1] + [1000 + i for i in range(ROWS - 5)] + [None]
    frame = pd.DataFrame({
        "product_id": pd.array(ids, dtype="Int64"),
        "embedding": list(vectors),
        "error": [None] * (ROWS + 1),
        "on_sale": [i % 3 == 0 for i in range(ROWS + 1)],  # rows 0, 3, ..., 18: 7 of the 19 with an id
        "stock": pd.array([5 if i % 4 == 0 else (None if i % 4 == 1 else i) for i in range(ROWS + 1)], dtype="Int64"),
        "colour": [("red", "blue", "green")[i % 3] for i in range(ROWS + 1)],
        "price": [float(i) + 0.5 for i in range(ROWS + 1)],
        "tags": [["a", "b"] if i % 2 else ["c"] for i in range(ROWS + 1)],
    })
    if not with_null_id:
        frame = frame.iloc[:ROWS].copy()
    return frame


def _write(frame: pd.DataFrame, path) -> str:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column("price_decimal", pa.array(
        [decimal.Decimal(f"{p:.2f}") for p in frame["price"]], type=pa.decimal128(10, 2)))
    pq.write_table(table, str(path))
    return str(path)


def _pandas_ids(frame: pd.DataFrame, key: str, value) -> set:
    """What `key=value` selects in pandas (rows with an id only)."""
    frame = frame[frame["product_id"].notna()]
    if key == "tags":
        picked = frame[frame["tags"].map(lambda t: value in t)]
    else:
        picked = frame[(frame[key] == value).fillna(False).astype(bool)]
    return {int(i) for i in picked["product_id"]}


FILTERS = [("on_sale", "true", True), ("on_sale", "false", False), ("on_sale", "TRUE", True),
           ("stock", "5", 5), ("stock", "6", 6), ("colour", "red", "red"), ("tags", "a", "a"), ("tags", "c", "c")]


@pytest.fixture(params=["edge", "server"])
def store(request, tmp_path):
    from qdrant_client import QdrantClient

    made = EdgeStore(str(tmp_path / "idx"), "c") if request.param == "edge" else \
        ServerStore(QdrantClient(":memory:"), "c", where=":memory:")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Local mode performs exact")
        yield made
    made.close()


def test_ids_keep_their_identity_and_filters_match_what_pandas_selects(store, registered, tmp_path):
    from clip_pyfunc.search.index import model_space

    uri = registered["models"]["image"]["uri"]
    frame = _table(model_space(uri).embedding_dim)
    report = index_table(store, _write(frame, tmp_path / "t.parquet"), uri, id_col="product_id", progress=False)
    assert (report["points"], report["indexed"], report["skipped_no_id"], report["rows_without_id"]) == (
        ROWS, ROWS, 1, [ROWS])
    assert report["payload_fields"] == {"product_id": "integer", "on_sale": "bool", "stock": "integer", "colour": "keyword", "price": "float",
                                        "tags": "keyword", "price_decimal": "float"}
    assert report["filter_fields"] == {"on_sale": "bool", "stock": "integer", "colour": "keyword", "tags": "keyword"}
    stored = {h.id: h.payload for batch in store.scroll() for h in batch}
    assert set(stored) == {int(i) for i in frame["product_id"].dropna()}  # 19 points: BIG and BIG + 1 apart
    assert all(type(i) is int for i in stored)
    assert stored[7]["stock"] == 5 and type(stored[7]["stock"]) is int and stored[101]["stock"] is None
    assert stored[BIG]["on_sale"] is True and stored[7]["price_decimal"] == 0.5
    searcher = Searcher(store)
    assert [h["id"] for h in searcher.search(like="101", k=ROWS) if h["id"] == 7] == [7]  # typed id found
    assert {h.id for h in store.retrieve([str(BIG + 1)])} == {BIG + 1}
    for key, typed, value in FILTERS:
        want = _pandas_ids(frame, key, value)
        got = {h["id"] for h in searcher.search(like=str(BIG), k=100, filters=[f"{key}={typed}"])} | (
            {BIG} & want)
        assert want and got == want, (key, typed, got, want)
    both = {h["id"] for h in searcher.search(like="7", k=100, filters=["on_sale=true", "colour=red"])} | {7}
    assert both == _pandas_ids(frame, "on_sale", True) & _pandas_ids(frame, "colour", "red")
    # A re-run from the same rows without the null updates the same 19 points.
    again = index_table(store, _write(_table(model_space(uri).embedding_dim, with_null_id=False),
                                      tmp_path / "t2.parquet"), uri, id_col="product_id", progress=False)
    assert (again["added"], again["updated"], again["points"], again["skipped"]) == (0, ROWS, ROWS, 0)


def test_filters_that_cannot_match_are_refused_not_empty(store, registered, tmp_path):
    from clip_pyfunc.search.index import model_space

    uri = registered["models"]["image"]["uri"]
    index_table(store, _write(_table(model_space(uri).embedding_dim), tmp_path / "t.parquet"), uri,
                id_col="product_id", progress=False)
    searcher = Searcher(store)
    for bad, says in (("onsale=true", "no payload field 'onsale'"), ("price=1.5", "holds float values"),
                      ("stock=five", "holds integers"), ("on_sale=yes", "holds booleans")):
        with pytest.raises(InvalidInput, match=says) as e:
            searcher.search(like="7", filters=[bad])
        assert "'on_sale': 'bool'" in str(e.value) or "give" in str(e.value)


def test_float_ids_are_kept_exactly_or_refused(store, registered, tmp_path):
    """An id column that went through pandas with a null is float64: whole values up to 2**53 are the same ids as
    the integers (7.0 is 7), and a value above 2**53 is refused naming its row, not merged with its neighbour."""
    from clip_pyfunc.search.index import model_space

    uri = registered["models"]["image"]["uri"]
    frame = _table(model_space(uri).embedding_dim).iloc[[0, 1, 2, ROWS]]
    floats = frame.assign(product_id=frame["product_id"].astype("float64"))
    report = index_table(store, _write(floats, tmp_path / "f.parquet"), uri, id_col="product_id", progress=False)
    assert (report["points"], report["skipped_no_id"]) == (3, 1)
    again = index_table(store, _write(frame, tmp_path / "i.parquet"), uri, id_col="product_id", progress=False)
    assert (again["added"], again["updated"]) == (0, 3)
    big = _table(model_space(uri).embedding_dim).iloc[[3, 4]]
    with pytest.raises(IndexRefused, match=r"row 0: id column 'product_id' holds 1\.2391624564947538e\+18"):
        index_table(store, _write(big.assign(product_id=big["product_id"].astype("float64")), tmp_path / "b.parquet"),
                    uri, id_col="product_id", progress=False)


def test_untyped_filters_of_older_collections_and_a_store_without_bool_filters():
    assert parse_filters(["on_sale=true"], {"on_sale": "bool"}) == [("on_sale", [True])]
    assert parse_filters(["sku=00123"], {"sku": "keyword"}) == [("sku", ["00123"])]
    assert parse_filters(["n=-5"], {"n": "integer"}) == [("n", [-5])]
    with pytest.raises(InvalidInput, match="re-run `clip-pyfunc index` into a new --collection"):
        parse_filters(["on_sale=true"], {"on_sale": "bool"}, bool_filters=False)


@pytest.fixture
def edge_index(registered, tmp_path):
    from clip_pyfunc.search.index import model_space

    uri = registered["models"]["image"]["uri"]
    frame = _table(model_space(uri).embedding_dim)
    table = _write(frame, tmp_path / "t.parquet")
    path = str(tmp_path / "idx")
    with EdgeStore(path, "clip") as store:
        index_table(store, table, uri, id_col="product_id", progress=False)
    return {"path": path, "frame": frame}


def test_cli_filters_and_like_by_the_typed_id(edge_index):
    def search(*args):
        out = subprocess.run(["clip-pyfunc", "search", "--index-path", edge_index["path"], *args],
                             capture_output=True, text=True, timeout=300)
        return out

    frame = edge_index["frame"]
    for value in (True, False):
        out = search("--like", "101", "--k", "100", "--filter", f"on_sale={str(value).lower()}")
        assert out.returncode == 0, out.stderr[-2000:]
        got = {json.loads(line)["id"] for line in out.stdout.splitlines()}
        assert got and got == _pandas_ids(frame, "on_sale", value) - {101}
    out = search("--like", str(BIG + 1), "--k", "1")
    assert out.returncode == 0 and json.loads(out.stdout)["id"] != BIG + 1, out.stderr[-2000:]
    out = search("--like", "7", "--filter", "price=0.5")
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "holds float values" in lines[0], out.stderr


def test_app_search_filters_by_type(edge_index, registered):
    """POST /search in the app (driven in process) answers what pandas selects, and names a bad filter."""
    import asyncio

    import httpx

    from clip_pyfunc.serving.app import create_app
    from clip_pyfunc.serving.loading import load
    from clip_pyfunc.settings import IndexConfig, load_settings

    uris = registered["models"]
    loaded = load(uris["text"]["uri"], uris["image"]["uri"], None, classifier_required=False,
                  index=IndexConfig(path=edge_index["path"], collection="clip"))
    app = create_app(loaded, load_settings().app)

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            good = await client.post("/search", data={"like": "102", "k": "100", "filter": "on_sale=false"})
            bad = await client.post("/search", data={"like": "102", "filter": "onsale=false"})
            return good, bad

    try:
        good, bad = asyncio.run(ask())
    finally:
        loaded.searcher.store.close()
    assert good.status_code == 200, good.text
    got = {h["id"] for h in good.json()["results"]}
    assert got and got == _pandas_ids(edge_index["frame"], "on_sale", False) - {102}
    assert bad.status_code == 400 and "no payload field 'onsale'" in bad.text, bad.text


def test_a_space_is_the_weights_not_the_run(store, registered, tiny_checkpoint):
    """Two registrations of one checkpoint write into one collection; a newer clip-pyfunc's extra space field is
    dropped with a warning, not a failed open."""
    import mlflow

    from clip_pyfunc.registry import register_models
    from clip_pyfunc.search.index import model_space, require_space
    from clip_pyfunc.search.store import Space
    from clip_pyfunc.settings import load_settings

    first = model_space(registered["models"]["image"]["uri"])
    again = register_models(load_settings(None, {"model": {"source": tiny_checkpoint}, "registry": {
        "text_name": "integrity_text", "image_name": "integrity_image", "combined_name": "integrity_combined"}}))
    second = model_space(again["models"]["image"]["uri"])
    assert first.run_id != second.run_id and first.embedding_space == second.embedding_space != ""
    store.ensure(first)
    store.ensure(second)  # the same weights: accepted
    info = mlflow.models.get_model_info(again["models"]["text"]["uri"])
    require_space(first, "c", "text", info)
    other = Space(model_uri="models:/x/1", run_id=second.run_id, models={}, embedding_dim=first.embedding_dim,
                  embedding_space="sha256:0000/1")
    with pytest.raises(IndexRefused, match="another embedding space"):
        store.ensure(other)
    with pytest.warns(UserWarning, match="fields this clip-pyfunc does not know, left out: catalogue") as caught:
        newer = Space.from_dict({**first.to_dict(), "catalogue": "t.parquet"}, "here")
    assert newer == first and len([w for w in caught if "catalogue" in str(w.message)]) == 1


def test_rows_that_would_merge_or_vanish_are_named(store, registered, tmp_path):
    """A repeated id is counted and named (its last row wins), an `id` payload column that the stored id would
    overwrite is refused, an id column with no values is refused, and float ids from 2**53 up are refused while
    whole decimals of any size are ids."""
    from clip_pyfunc.search.index import model_space, table_id

    uri = registered["models"]["image"]["uri"]
    frame = _table(model_space(uri).embedding_dim).iloc[:6].copy()
    frame.loc[4, "product_id"] = 7  # row 4 repeats row 0's id
    report = index_table(store, _write(frame, tmp_path / "r.parquet"), uri, id_col="product_id", progress=False)
    assert (report["points"], report["repeated_ids"], report["rows_with_repeated_id"]) == (5, 1, [4])
    with pytest.raises(IndexRefused, match="column 'id' in .*rename it, or give --id-col id"):
        index_table(store, _write(frame.assign(id="x"), tmp_path / "i.parquet"), uri, id_col="product_id",
                    progress=False)
    empty = frame.assign(product_id=pd.array([None] * len(frame), dtype="Int64"))
    with pytest.raises(IndexRefused, match="every row's id in column 'product_id' is empty"):
        index_table(store, _write(empty, tmp_path / "e.parquet"), uri, id_col="product_id", progress=False)
    with pytest.raises(IndexRefused, match="row 3: .* from 9007199254740992 up"):
        table_id(float(2 ** 53), 3, "product_id")
    assert table_id(decimal.Decimal(BIG + 1), 0, "product_id") == BIG + 1
    with pytest.raises(IndexRefused, match="from 16777216 up"):
        table_id(float(2 ** 24), 0, "product_id", exact_below=2 ** 24)


def test_lists_of_booleans_with_nulls_match(store):
    from clip_pyfunc.search.store import Space

    store.ensure(Space(model_uri="m", run_id="r", models={}, embedding_dim=4))
    store.upsert(["a", "b", "c"], np.eye(4, dtype=np.float32)[:3],
                 [{"flags": [True, None]}, {"flags": [False]}, {"flags": [None, False, True]}])
    store.finish({"flags": "bool"}, {"flags": "bool"})
    got = {h.id for h in store.query(np.ones(4, np.float32) / 2, 10, parse_filters(["flags=true"],
                                                                                 store.payload_fields()))}
    assert got == {"a", "c"}


def test_a_copy_of_a_collection_without_field_types_stays_untyped(tmp_path):
    from qdrant_client import QdrantClient

    from clip_pyfunc.search.store import Space, copy_store

    with EdgeStore(str(tmp_path / "idx"), "c") as edge:
        edge.ensure(Space(model_uri="m", run_id="r", models={}, embedding_dim=4))
        edge.upsert(["a"], np.eye(4, dtype=np.float32)[:1], [{"path": "/a.jpg"}])
        edge.finish({})
        assert edge.payload_fields() is None
        server = ServerStore(QdrantClient(":memory:"), "c", where=":memory:")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Local mode performs exact")
            copy_store(edge, server)
        assert server.payload_fields() is None and parse_filters(["path=/a.jpg"], None) == [("path", ["/a.jpg"])]
        server.close()


@pytest.mark.spark
def test_a_spark_table_keeps_its_types(spark, registered, tmp_path):
    """A Spark table is read with its own schema: a batch of failed rows only (embedding all null) and a struct
    of mixed field types are indexed, and the integer ids stay integers."""
    from pyspark.sql import types as T

    from clip_pyfunc.search.index import model_space

    uri = registered["models"]["image"]["uri"]
    dim = model_space(uri).embedding_dim
    schema = T.StructType([T.StructField("product_id", T.LongType()), T.StructField("embedding",
                           T.ArrayType(T.FloatType())), T.StructField("error", T.StringType()),
                           T.StructField("info", T.StructType([T.StructField("name", T.StringType()),
                                                               T.StructField("stock", T.LongType())]))])
    vector = [1.0 / dim ** 0.5] * dim
    rows = [(1, None, "row 0: bytes are not an image", ("x", 1)), (2, None, "row 1: not an image", ("y", 2)),
            (BIG, vector, None, ("z", 3)), (None, vector, None, ("w", None))]
    spark.createDataFrame(rows, schema).write.saveAsTable("integrity_items")
    with EdgeStore(str(tmp_path / "idx"), "c") as store:
        report = index_table(store, "integrity_items", uri, id_col="product_id", batch_rows=2, progress=False)
        assert (report["points"], report["skipped_error"], report["skipped_no_id"]) == (1, 2, 1)
        assert [(h.id, h.payload["info"]) for h in store.retrieve([str(BIG)])] == [(BIG, {"name": "z", "stock": 3})]
