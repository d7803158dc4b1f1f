"""The store interface on small data: Qdrant Edge (embedded, the default) and qdrant-client (a server's path).

The server path runs against qdrant-client's own in-process mode (`QdrantClient(":memory:")`),
the stand-in qdrant-client offers for tests: no Qdrant server can run here. That stand-in
searches exactly and ignores HNSW, quantization and payload indexes, so on it these tests check
the interface's contract (ids, payloads, filters, batches, spaces), not the index; the index is
checked on the embedded store. Vectors are random (no meaning).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import warnings

import numpy as np
import pandas as pd
import pytest

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.search.query import duplicate_groups
from clip_pyfunc.search.store import (EdgeStore, IndexRefused, NoIndex, ServerStore, Space, copy_store, open_store,
                                      read_edge_aliases)
from clip_pyfunc.settings import IndexConfig, load_settings

DIM = 32
SPACE = Space(model_uri="models:/store_test/1", run_id="run-a", models={}, embedding_dim=DIM)


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _server_store(config=None) -> ServerStore:
    from qdrant_client import QdrantClient

    return ServerStore(QdrantClient(":memory:"), "c", config, where=":memory:")


@pytest.fixture(params=["edge", "server"])
def make_store(request, tmp_path):
    """A factory of empty stores of one kind; closes them after the test."""
    made = []

    def make(config=None):
        store = EdgeStore(str(tmp_path / f"idx{len(made)}"), "c", config) if request.param == "edge" \
            else _server_store(config)
        made.append(store)
        return store

    with warnings.catch_warnings():  # in-process qdrant-client: search params have no effect there, by design
        warnings.filterwarnings("ignore", message="Local mode performs exact")
        yield make
    for store in made:
        store.close()


def _fill(store, vectors, start=0):
    ids = [f"item-{i}" for i in range(start, start + len(vectors))]
    payloads = [{"colour": ("red", "blue")[i % 2], "size": i % 5, "sale": i % 3 == 0, "path": f"/p/{i}.jpg"}
                for i in range(start, start + len(vectors))]
    store.upsert(ids, vectors, payloads)


@contextlib.contextmanager
def _filled_edge(path, vectors, fields, config=None):
    """An embedded store holding `vectors` (see _fill), built with `fields` indexed; closed after."""
    with EdgeStore(str(path), "c", config) as store:
        store.ensure(SPACE)
        _fill(store, vectors)
        store.finish(fields)
        yield store


def test_both_stores_answer_alike(make_store):
    """Upsert by id, the HNSW build, query against exact search, filters, retrieve, scroll, batches and count."""
    store = make_store()
    vectors = _unit(600, 0)
    store.ensure(SPACE)
    _fill(store, vectors[:400])
    _fill(store, vectors[300:], start=300)  # 100 rows again: replaced, not added
    store.finish({"colour": "keyword", "size": "integer", "sale": "bool"})
    assert store.count() == 600 and store.space() == SPACE
    if isinstance(store, EdgeStore):  # the HNSW was built, over every point, and the payload indexes exist
        info = store.info()
        assert info["indexed_vectors"] == 600 and info["payload_indexes"] == ["colour", "sale", "size"], info
    queries = _unit(20, 1)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = [len({f"item-{i}" for i in want} & {h.id for h in store.query(q, 10)}) / 10
              for q, want in zip(queries, exact)]
    assert np.mean(recall) >= 0.98, recall
    best = store.query(vectors[7], 3)
    assert best[0].id == "item-7" and best[0].score == pytest.approx(1.0, abs=1e-5)
    assert best[0].payload == {"colour": "blue", "size": 2, "sale": False, "path": "/p/7.jpg"}
    assert best[0].score >= best[1].score >= best[2].score
    blue_two = store.query(vectors[7], 50, [("colour", ["blue"]), ("size", ["2", 2])])
    assert blue_two and all(h.payload["colour"] == "blue" and h.payload["size"] == 2 for h in blue_two)
    assert len(blue_two) == 50  # 60 items are blue and of size 2
    assert all(h.payload["sale"] for h in store.query(vectors[0], 20, [("sale", ["true", True])]))
    got = store.retrieve(["item-5", "no-such-item"], with_vectors=True)
    assert [h.id for h in got] == ["item-5"] and np.allclose(got[0].vector, vectors[5], atol=1e-6)
    seen = [h.id for batch in store.scroll(batch=128) for h in batch]
    assert len(seen) == 600 and set(seen) == {f"item-{i}" for i in range(600)}
    batched = store.query_batch(vectors[:5], 3)
    assert [[h.id for h in hits] for hits in batched] == [[h.id for h in store.query(v, 3)] for v in vectors[:5]]
    assert all(h.score >= 0.5 for h in store.query(vectors[9], 50, score_threshold=0.5))


def test_another_space_is_refused_the_same_way(make_store):
    store = make_store()
    store.ensure(SPACE)
    store.ensure(Space(model_uri="models:/store_test/2", run_id="run-a", models={"text": "x"}, embedding_dim=DIM))
    with pytest.raises(IndexRefused, match="another embedding space") as e:
        store.ensure(Space(model_uri="models:/other/1", run_id="run-b", models={}, embedding_dim=DIM))
    assert "models:/store_test/1" in str(e.value) and "run-b" in str(e.value)


def test_filtered_queries_walk_the_graph(tmp_path):
    """With a full-scan threshold of 1 KB, filtered queries go through the HNSW graph, not a scan; with ACORN
    they keep their neighbours (a plain filtered walk found 0.74 of them, and none for some queries)."""
    vectors = _unit(3000, 10)
    with _filled_edge(tmp_path / "idx", vectors, {"colour": "keyword", "size": "integer"},
                      IndexConfig(full_scan_threshold_kb=1)) as store:
        for q in _unit(10, 11):
            hits = store.query(q, 10, [("colour", ["red"]), ("size", [3])])
            want = [f"item-{i}" for i in np.argsort(-(vectors @ q)) if i % 2 == 0 and i % 5 == 3][:10]
            assert [h.id for h in hits] and all(h.payload["colour"] == "red" and h.payload["size"] == 3
                                                for h in hits)
            assert len(set(want) & {h.id for h in hits}) >= 9


def test_int8_quantization_rescored_keeps_recall(tmp_path):
    store = EdgeStore(str(tmp_path / "idx"), "c", IndexConfig(quantization="int8", hnsw_ef=64))
    vectors = _unit(2000, 2)
    store.ensure(SPACE)
    _fill(store, vectors)
    store.finish({})
    queries = _unit(30, 3)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = [len({f"item-{i}" for i in want} & {h.id for h in store.query(q, 10)}) / 10
              for q, want in zip(queries, exact)]
    assert np.mean(recall) >= 0.95, recall
    hit = store.query(vectors[11], 1)[0]
    assert hit.id == "item-11" and hit.score == pytest.approx(1.0, abs=1e-5)  # rescored with the float32 vector
    assert store.build["quantization"] == "int8"
    store.close()


def test_duplicates_through_the_index_find_planted_copies(make_store):
    rng = np.random.default_rng(4)
    vectors = _unit(3000, 5)
    originals = rng.choice(2970, 30, replace=False)
    copies = vectors[originals] + 0.01 * rng.standard_normal((30, DIM)).astype(np.float32)
    vectors[2970:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    store = make_store()
    store.ensure(SPACE)
    _fill(store, vectors)
    store.finish({})
    groups = duplicate_groups(store, threshold=0.99, k=5)
    pairs = {frozenset(g["ids"]) for g in groups}
    assert pairs == {frozenset({f"item-{o}", f"item-{2970 + n}"}) for n, o in enumerate(originals)}
    assert all(g["size"] == 2 and g["min_score"] >= 0.99 for g in groups)


def test_copy_to_a_server_store(tmp_path):
    """`index --to-server`'s copy: every point, its payload and the space; a re-run adds nothing."""
    vectors = _unit(700, 6)
    with _filled_edge(tmp_path / "idx", vectors, {"colour": "keyword"}) as edge:
        server = _server_store()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Local mode performs exact")
            first = copy_store(edge, server, batch=256)
            again = copy_store(edge, server, batch=256)
            assert (first["copied"], first["points"], again["points"]) == (700, 700, 700)
            assert server.space() == SPACE
            for v in vectors[:5]:
                assert [h.id for h in server.query(v, 5)] == [h.id for h in edge.query(v, 5)]
            assert server.retrieve(["item-3"])[0].payload == edge.retrieve(["item-3"])[0].payload
        server.close()


def test_to_server_unreachable_is_one_line(tmp_path):
    from conftest import free_port

    with EdgeStore(str(tmp_path / "idx"), "clip") as edge:
        edge.ensure(SPACE)
    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(["clip-pyfunc", "index", "--index-path", str(tmp_path / "idx"), "--to-server", url],
                         capture_output=True, text=True, timeout=300)
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and f"cannot use the Qdrant server at {url}" in lines[0], out.stderr
    out = subprocess.run(["clip-pyfunc", "index", "--index-path", str(tmp_path / "idx")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "index needs --input and --model-uri" in out.stderr, out.stderr


def test_a_store_in_use_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "idx")
    with EdgeStore(path, "clip") as store:
        store.ensure(SPACE)
        _fill(store, _unit(50, 7))
        store.finish({})
        out = subprocess.run(["clip-pyfunc", "search", "--index-path", path, "--like", "item-1"],
                             capture_output=True, text=True, timeout=300)
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and out.stdout == "", out.stderr
    assert "in use by another process" in lines[0] and "POST /search" in lines[0] and "--qdrant-url" in lines[0]
    out = subprocess.run(["clip-pyfunc", "search", "--index-path", path, "--like", "item-1", "--k", "3"],
                         capture_output=True, text=True, timeout=300)  # released: it opens now
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 3, out.stderr


def test_missing_and_old_stores_say_what_to_do(tmp_path):
    with pytest.raises(NoIndex, match="no index at"):
        EdgeStore(str(tmp_path / "nothing"), "clip", must_exist=True)
    with EdgeStore(str(tmp_path / "idx"), "a") as store:
        store.ensure(SPACE)
    with pytest.raises(NoIndex, match=r"no collection 'b' .*collections here: \['a'\]"):
        EdgeStore(str(tmp_path / "idx"), "b", must_exist=True)
    from qdrant_client import QdrantClient, models

    old = QdrantClient(path=str(tmp_path / "old"))
    old.create_collection("clip", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))
    old.close()
    with pytest.raises(IndexRefused, match="qdrant-client's local mode.*re-run `clip-pyfunc index`"):
        EdgeStore(str(tmp_path / "old"), "clip")


def test_bad_index_settings_name_the_setting():
    with pytest.raises(ModelLoadError, match=r"index.quantization must be one of \('none', 'int8'\)"):
        load_settings(None, {"index": {"quantization": "int4"}})
    with pytest.raises(ModelLoadError, match="index.hnsw_ef must be a whole number >= 1"):
        load_settings(None, {"index": {"hnsw_ef": 0}})
    with pytest.raises(ModelLoadError, match="index.batch_rows"):
        load_settings(None, {"index": {"batch_rows": "many"}})


def test_concurrent_queries_from_threads(tmp_path):
    """The app queries one store from a thread pool: answers equal the serial ones."""
    vectors = _unit(2000, 8)
    with _filled_edge(tmp_path / "idx", vectors, {"colour": "keyword"}) as store:
        serial = [[h.id for h in store.query(v, 5)] for v in vectors[:64]]
        answers: dict[int, list] = {}

        def worker(n):
            for i in range(n, 64, 8):
                answers[i] = [h.id for h in store.query(vectors[i], 5)]

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [answers[i] for i in range(64)] == serial


@pytest.mark.slow
def test_an_index_run_killed_halfway_is_completed_by_a_rerun(registered, tmp_path):
    """SIGKILL `clip-pyfunc index` mid-run: the store opens, and a re-run leaves every row once."""
    from clip_pyfunc.search.index import model_space

    uri = registered["models"]["image"]["uri"]
    dim = model_space(uri).embedding_dim
    rows = 40_000  # 80 batches of 500: the kill lands a quarter in, with three quarters still to go
    vectors = np.random.default_rng(9).standard_normal((rows, dim)).astype(np.float32)
    table = str(tmp_path / "t.parquet")
    pd.DataFrame({"id": [f"item-{i}" for i in range(rows)], "embedding": list(vectors), "error": [None] * rows,
                  "shop": [f"shop-{i % 7}" for i in range(rows)]}).to_parquet(table)
    conf = tmp_path / "conf.yaml"
    conf.write_text("index:\n  batch_rows: 500\n")
    cmd = ["clip-pyfunc", "index", "--conf", str(conf), "--index-path", str(tmp_path / "idx"), "--input", table,
           "--model-uri", uri]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while True:  # the progress bar on stderr says how far it got
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        done = [int(n) for n in re.findall(rb"index clip-[0-9a-f]{12}: (\d+) rows", seen)]
        if done and done[-1] >= rows // 4:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, seen.decode()[-2000:]  # killed mid-run, not finished
    # The run writes the model's space's own collection; the first one goes live (the alias `clip`) only when done.
    collection = re.search(rb"index (clip-[0-9a-f]{12}):", seen).group(1).decode()
    assert read_edge_aliases(str(tmp_path / "idx")) == {}
    with EdgeStore(str(tmp_path / "idx"), collection, must_exist=True) as store:
        survived = store.count()
    assert 0 < survived < rows
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert (report["points"], report["added"], report["indexed"]) == (rows, rows - survived, rows)
    assert report["filter_fields"] == {"shop": "keyword"}
    assert (report["collection"], report["live"]) == (collection, True)
    with open_store(IndexConfig(path=str(tmp_path / "idx"), collection="clip"), must_exist=True) as store:
        ids = [h.id for batch in store.scroll(batch=10000) for h in batch]
        assert len(ids) == rows and len(set(ids)) == rows
        assert store.query(vectors[123] / np.linalg.norm(vectors[123]), 1)[0].id == "item-123"
