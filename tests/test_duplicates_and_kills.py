"""Duplicate groups that never chain unrelated items, and an index build killed in its HNSW step that a
re-run leaves as a clean build would. Vectors are random or constructed (no meaning)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.search.query import duplicate_groups
from clip_pyfunc.search.store import EdgeStore, ServerStore, Space

DIM = 32
SPACE = Space(model_uri="models:/dups/1", run_id="run-d", models={}, embedding_dim=DIM)


def _chain_and_pairs() -> tuple[list[str], np.ndarray]:
    """Twelve items each at cosine 0.97 to the next (their ends at -0.905), an exact pair, and 60 unrelated items."""
    rng = np.random.default_rng(12)
    step = np.arccos(0.97)
    chain = np.zeros((12, DIM))
    chain[:, 0], chain[:, 1] = np.cos(np.arange(12) * step), np.sin(np.arange(12) * step)
    others = rng.standard_normal((61, DIM))
    others[:, :2] = 0  # orthogonal to the chain's plane
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    vectors = np.vstack([chain, others[:60], others[60:], others[60:]]).astype(np.float32)
    ids = [f"colourway-{i}" for i in range(12)] + [f"other-{i}" for i in range(60)] + ["copy-a", "copy-b"]
    return ids, vectors


@pytest.fixture(params=["edge", "server"])
def chain_store(request, tmp_path):
    from qdrant_client import QdrantClient

    store = EdgeStore(str(tmp_path / "idx"), "c") if request.param == "edge" else \
        ServerStore(QdrantClient(":memory:"), "c", where=":memory:")
    ids, vectors = _chain_and_pairs()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Local mode performs exact")
        store.ensure(SPACE)
        store.upsert(ids, vectors, [{} for _ in ids])
        store.finish({})
        yield store, dict(zip(ids, vectors))
    store.close()


def test_a_chain_is_never_one_group(chain_store):
    """Default (complete linkage): every pair inside a group is at or above the threshold, and min_score is the
    lowest of them; the exact pair is found. Transitive linking, asked for, chains the twelve and says how far
    apart its ends are."""
    store, vectors = chain_store
    groups = duplicate_groups(store, threshold=0.95)
    assert {"ids": ["copy-a", "copy-b"], "size": 2, "min_score": 1.0, "max_score": 1.0} in groups
    for g in groups:
        members = np.stack([vectors[i] for i in g["ids"]])
        cos = members @ members.T
        pairs = cos[np.triu_indices(len(members), 1)]
        assert pairs.min() >= 0.95 and g["min_score"] == pytest.approx(pairs.min(), abs=1e-5), g
        assert not any(i.startswith("other-") for i in g["ids"])
    assert max(g["size"] for g in groups) == 2
    assert sum(g["size"] for g in groups if g["ids"][0].startswith("colourway-")) >= 10  # most are paired
    chained = duplicate_groups(store, threshold=0.95, linkage="transitive")
    twelve = next(g for g in chained if g["size"] == 12)
    assert twelve["min_link_score"] == pytest.approx(0.97, abs=1e-5)
    assert twelve["min_score"] == pytest.approx(-0.9046, abs=1e-3)
    with pytest.raises(InvalidInput, match=r"linkage must be one of \('complete', 'transitive'\)"):
        duplicate_groups(store, linkage="single")


def test_a_large_exact_group_stays_whole_beyond_k(tmp_path):
    """Forty identical items with k=5: complete linkage checks the pairs it was not shown from the vectors."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(DIM).astype(np.float32)
    noise = rng.standard_normal((200, DIM)).astype(np.float32)
    vectors = np.vstack([np.tile(base, (40, 1)), noise])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with EdgeStore(str(tmp_path / "idx"), "c") as store:
        store.ensure(SPACE)
        store.upsert([f"same-{i}" for i in range(40)] + [f"n-{i}" for i in range(200)], vectors, [{}] * 240)
        store.finish({})
        groups = duplicate_groups(store, threshold=0.99, k=5)
    assert [g["size"] for g in groups] == [40] and groups[0]["min_score"] == pytest.approx(1.0, abs=1e-5)


BUILD = """
import sys, numpy as np
from clip_pyfunc.search.store import EdgeStore, Space
store = EdgeStore(sys.argv[1], "c")
store.ensure(Space(model_uri="models:/dups/1", run_id="run-d", models={}, embedding_dim=32))
vectors = np.random.default_rng(0).standard_normal((40000, 32)).astype(np.float32)
for i in range(0, 40000, 10000):
    store.upsert([f"i{j}" for j in range(i, i + 10000)], vectors[i:i + 10000], [{"k": j % 7} for j in range(i, i + 10000)])
print("loaded", flush=True)
store.finish({"k": "integer"})
store.close()
"""


def _layout(path: str) -> list[str]:
    """The kinds of path under an index folder: segment UUIDs masked (how many segments an optimizer leaves may
    differ), the files a segment holds left out."""
    out = []
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        if re.search(r"segments/[0-9a-f-]{36}", rel):
            continue
        out += [re.sub(r"[0-9a-f-]{36}", "UUID", os.path.join(rel, n)) for n in dirs + files]
    return sorted(set(out))


@pytest.mark.slow
def test_a_build_killed_during_hnsw_leaves_no_temporary_segment_after_a_rerun(tmp_path):
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    subprocess.run([sys.executable, "-c", BUILD, clean], check=True, timeout=600, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-c", BUILD, killed], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "loaded"
    temp = os.path.join(killed, "c", "shard", "temp_segments")
    deadline = time.monotonic() + 300
    while not (os.path.isdir(temp) and any(n.startswith("segment_builder") for n in os.listdir(temp))):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before its HNSW step was seen"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert os.listdir(temp)  # what the kill left
    with EdgeStore(killed, "c", must_exist=True) as store:  # the re-run: open, then build again
        assert store.count() == 40000
        store.finish({"k": "integer"})
        assert store.count() == 40000 and store.info()["indexed_vectors"] == 40000
    assert os.listdir(temp) == [] and os.listdir(os.path.join(clean, "c", "shard", "temp_segments")) == []
    assert _layout(killed) == _layout(clean)
