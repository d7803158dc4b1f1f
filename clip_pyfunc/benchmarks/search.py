"""`clip-pyfunc bench-search`: the embedded store (Qdrant Edge) at catalogue sizes, and what sits around it.

Every figure goes through the store interface (`search.store`), in one run, on synthetic vectors.
The vectors are random: they carry no meaning; only their geometry is designed.

- **low-dim** ("like real embeddings"): `centres` cluster centres in a random 64-d subspace of the
  512-d space, each item its centre plus variation in another random 32-d subspace plus a little
  full-rank noise, L2-normalised. The run reports the nearest-neighbour and random-pair cosines
  it produced.
- **iid**: Gaussian clusters in all 512 dimensions (a worst case for graph search, unlike
  embeddings).

Parts (`--parts`):
1. `large`: `points` low-dim vectors: upsert time, HNSW build time, then in a fresh process (as
   a restarted server would): open time, RSS, and per `hnsw_ef` query p50/p95 and recall@10
   against exact search (numpy over the same matrix). Size on disk.
2. `iid`: the same for the iid data, with larger `hnsw_ef` to find the one that reaches 0.95.
3. `compare`: at each compare size, the embedded store beside qdrant-client's local mode (the old
   default): build and query p50/p95, recall@10.
4. `shell`: one `clip-pyfunc search --like ID` from the shell at the largest compare size, start-up
   included (median of 5).
5. `duplicates`: `clip-pyfunc`'s duplicate_groups over the largest compare size with 1% planted
   near-copies: recall of the planted pairs and the time.
6. `app`: the app's `/search` on the `large` store against the store's own query and against
   `Searcher.search` in-process, split into its parts (HTTP + form, the text forward, the query).
7. `int8`: at the largest compare size, the store with and without int8 scalar quantization
   (rescored with the float32 vectors): build, latency and recall per `hnsw_ef`.
8. `payload_m`: at the largest compare size, with a 10-value indexed keyword field, the store
   with Qdrant's per-value graph links (`hnsw_payload_m` 16) and without (0, the default).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

DIM = 512
K = 10


def low_dim_vectors(n: int, seed: int, centres: int, *, sigma_var: float = 0.5, sigma_noise: float = 0.05,
                    space_seed: int = 0):
    """n unit vectors [n, 512] float32 of low intrinsic dimension (see the module doc); the centres come from
    `space_seed`, so items and queries drawn with other seeds share them."""
    import numpy as np

    space = np.random.default_rng(space_seed)
    basis = np.linalg.qr(space.standard_normal((DIM, 96)))[0].astype(np.float32)  # orthonormal 512 x 96
    centre_basis, var_basis = basis[:, :64], basis[:, 64:]
    centre_coords = space.standard_normal((centres, 64)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 65536):
        m = min(n, start + 65536) - start
        which = rng.integers(0, centres, m)
        x = centre_coords[which] @ centre_basis.T
        x += sigma_var * (rng.standard_normal((m, 32), dtype=np.float32) @ var_basis.T)
        x += sigma_noise * rng.standard_normal((m, DIM), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def iid_vectors(n: int, seed: int, centres: int, *, sigma: float = 0.5, space_seed: int = 0):
    """n unit vectors [n, 512] float32: Gaussian clusters in all 512 dimensions."""
    import numpy as np

    centre = np.random.default_rng(space_seed).standard_normal((centres, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 65536):
        m = min(n, start + 65536) - start
        x = centre[rng.integers(0, centres, m)] + sigma * rng.standard_normal((m, DIM), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top_k(matrix, queries, k: int = K):
    """Exact top-k rows of `matrix` by cosine for each query (unit vectors): [q, k] int64, best first."""
    import numpy as np

    out = np.empty((len(queries), k), np.int64)
    best = np.full((len(queries), k), -np.inf, np.float32)
    for start in range(0, len(matrix), 131072):
        sims = queries @ matrix[start:start + 131072].T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        cand = np.concatenate([best, np.take_along_axis(sims, part, 1)], axis=1)
        idx = np.concatenate([out, part + start], axis=1)
        order = np.argsort(-cand, axis=1)[:, :k]
        best, out = np.take_along_axis(cand, order, 1), np.take_along_axis(idx, order, 1)
    return out


def geometry(matrix, queries, truth) -> dict:
    """Nearest-neighbour cosine (median over the queries) and random-pair cosine (median, p99)."""
    import numpy as np

    rng = np.random.default_rng(5)
    nn = np.einsum("ij,ij->i", queries, matrix[truth[:, 0]])
    a, b = rng.integers(0, len(matrix), 20000), rng.integers(0, len(matrix), 20000)
    pairs = np.einsum("ij,ij->i", matrix[a], matrix[b])
    return {"nearest_neighbour_cosine_median": round(float(np.median(nn)), 3),
            "random_pair_cosine_median": round(float(np.median(pairs)), 3),
            "random_pair_cosine_p99": round(float(np.percentile(pairs, 99)), 3)}


def _rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _du_mib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return round(total / 2**20, 1)


def _space(dim: int = DIM, run_id: str = "bench"):
    from clip_pyfunc.search.store import Space

    return Space(model_uri="models:/bench/1", run_id=run_id, models={}, embedding_dim=dim)


def build_edge(path: str, matrix, *, space=None, config=None, batch: int = 1024, collection: str = "bench",
               shops: int = 100) -> dict:
    """Upsert `matrix` (ids "item-<row>", payload shop = row % shops, indexed) into a new Edge store, then
    build; times."""
    from clip_pyfunc.search.store import EdgeStore

    store = EdgeStore(path, collection, config)
    store.ensure(space or _space(matrix.shape[1]))
    ids = [f"item-{i}" for i in range(len(matrix))]
    t0 = time.perf_counter()
    for start in range(0, len(matrix), batch):
        end = min(len(matrix), start + batch)
        store.upsert(ids[start:end], matrix[start:end], [{"shop": f"shop-{i % shops}"} for i in range(start, end)])
    t1 = time.perf_counter()
    store.finish({"shop": "keyword"})
    t2 = time.perf_counter()
    store.close()
    return {"points": len(matrix), "upsert_s": round(t1 - t0, 1), "hnsw_build_s": round(t2 - t1, 1),
            "disk_mib": _du_mib(path)}


def _query_process(path: str, collection: str, queries_file: str, efs: list[int], repeat: int) -> dict:
    """Open the store in this (fresh) process and time queries through the interface, per hnsw_ef."""
    import numpy as np

    from clip_pyfunc.benchmarks.common import percentile
    from clip_pyfunc.search.store import EdgeStore
    from clip_pyfunc.settings import IndexConfig

    base = _rss_mib()
    queries = np.load(queries_file)
    t0 = time.perf_counter()
    store = EdgeStore(path, collection, must_exist=True)
    opened = time.perf_counter() - t0
    after_open = _rss_mib()
    out = {"open_s": round(opened, 3), "rss_python_mib": round(base, 1), "rss_after_open_mib": round(after_open, 1),
           "by_ef": []}
    store.config = IndexConfig(hnsw_ef=max(efs))
    for q in queries:  # one untimed pass: pages the graph and vectors in, as a serving store's would be
        store.query(q, K)
    for ef in efs:
        store.config = IndexConfig(hnsw_ef=ef)
        times, found = [], []
        for _ in range(repeat):
            for q in queries:
                t = time.perf_counter()
                hits = store.query(q, K)
                times.append(time.perf_counter() - t)
                found.append([h.id for h in hits])
        out["by_ef"].append({"hnsw_ef": ef, "p50_ms": round(percentile(times, 50) * 1e3, 3),
                             "p95_ms": round(percentile(times, 95) * 1e3, 3), "ids": found[:len(queries)]})
    out["rss_after_queries_mib"] = round(_rss_mib(), 1)
    store.close()
    return out


def query_in_fresh_process(path: str, queries, truth, efs, collection: str = "bench", repeat: int = 1) -> dict:
    """`_query_process` in a subprocess, with recall@10 of each ef against `truth` (row indices)."""
    import numpy as np

    qfile = os.path.join(path, "queries.npy")
    np.save(qfile, queries)
    code = ("import json,sys; from clip_pyfunc.benchmarks.search import _query_process as q; "
            "print(json.dumps(q(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]))))")
    done = subprocess.run([sys.executable, "-c", code, path, collection, qfile, json.dumps(list(efs)), str(repeat)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for row in result["by_ef"]:
        ids = row.pop("ids")
        hits = [len({f"item-{i}" for i in t} & set(found)) / K for t, found in zip(truth, ids)]
        row["recall_at_10"] = round(float(np.mean(hits)), 4)
    result["rss_store_mib"] = round(result["rss_after_queries_mib"] - result["rss_python_mib"], 1)
    return result


def large(points: int, efs, queries: int, data: str = "low-dim", work: str | None = None, keep: bool = False,
          space=None, quantization: str = "none") -> dict:
    """One million-point (or `points`) run on the embedded store: build, open, RSS, disk, recall and latency."""
    import numpy as np

    from clip_pyfunc.benchmarks.common import percentile
    from clip_pyfunc.settings import IndexConfig

    centres = max(20, points // 50)
    make = low_dim_vectors if data == "low-dim" else iid_vectors
    t = time.perf_counter()
    matrix = make(points, seed=1, centres=centres)
    query_vectors = make(queries, seed=2, centres=centres)
    made = time.perf_counter() - t
    truth = exact_top_k(matrix, query_vectors)
    scan = []
    for q in query_vectors[:50]:
        t = time.perf_counter()
        np.argpartition(-(matrix @ q), K)[:K]
        scan.append(time.perf_counter() - t)
    work = work or tempfile.mkdtemp(prefix="clip-bench-store-")
    path = os.path.join(work, f"{data}-{points}")
    shutil.rmtree(path, ignore_errors=True)
    out = {"data": data, "quantization": quantization, "points": points, "centres": centres,
           "generate_s": round(made, 1),
           **geometry(matrix, query_vectors, truth), "numpy_scan_p50_ms": round(percentile(scan, 50) * 1e3, 2)}
    out.update(build_edge(path, matrix, space=space, config=IndexConfig(quantization=quantization)))
    del matrix
    out.update(query_in_fresh_process(path, query_vectors, truth, efs))
    out["disk_mib"] = _du_mib(path)
    out["path"] = path if keep else None
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    return out


def local_mode(matrix, query_vectors, truth) -> dict:
    """qdrant-client's local mode (the old default) on the same data: upsert, open, query p50/p95, recall@10."""
    import numpy as np
    from qdrant_client import QdrantClient, models

    from clip_pyfunc.benchmarks.common import percentile

    with tempfile.TemporaryDirectory(prefix="clip-bench-local-") as path:
        client = QdrantClient(path=path)
        client.create_collection("b", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))
        t = time.perf_counter()
        for start in range(0, len(matrix), 2048):
            client.upsert("b", points=models.Batch(ids=list(range(start, min(len(matrix), start + 2048))),
                                                   vectors=matrix[start:start + 2048].tolist()))
        upsert = time.perf_counter() - t
        client.close()
        t = time.perf_counter()
        client = QdrantClient(path=path)
        opened = time.perf_counter() - t
        times, recall = [], []
        for q, want in zip(query_vectors, truth):
            t = time.perf_counter()
            hits = client.query_points("b", query=q.tolist(), limit=K).points
            times.append(time.perf_counter() - t)
            recall.append(len({int(h.id) for h in hits} & set(want.tolist())) / K)
        client.close()
    return {"upsert_s": round(upsert, 1), "open_s": round(opened, 2), "p50_ms": round(percentile(times, 50) * 1e3, 2),
            "p95_ms": round(percentile(times, 95) * 1e3, 2), "recall_at_10": round(float(np.mean(recall)), 4)}


def compare(sizes, efs, queries: int, work: str) -> list[dict]:
    """The embedded store beside qdrant-client's local mode at each size (low-dim data)."""
    out = []
    for size in sizes:
        centres = max(20, size // 50)
        matrix = low_dim_vectors(size, seed=1, centres=centres)
        query_vectors = low_dim_vectors(queries, seed=2, centres=centres)
        truth = exact_top_k(matrix, query_vectors)
        path = os.path.join(work, f"compare-{size}")
        shutil.rmtree(path, ignore_errors=True)
        edge = build_edge(path, matrix)
        edge.update(query_in_fresh_process(path, query_vectors, truth, efs))
        shutil.rmtree(path, ignore_errors=True)
        out.append({"points": size, **geometry(matrix, query_vectors, truth), "edge": edge,
                    "local_mode": local_mode(matrix, query_vectors, truth)})
    return out


def variants(size: int, efs, queries: int, work: str, configs: dict, shops: int = 100) -> dict:
    """The embedded store under each named IndexConfig, on the same low-dim data and queries."""
    centres = max(20, size // 50)
    matrix = low_dim_vectors(size, seed=1, centres=centres)
    query_vectors = low_dim_vectors(queries, seed=2, centres=centres)
    truth = exact_top_k(matrix, query_vectors)
    out = {"points": size, "shops": shops}
    for name, config in configs.items():
        path = os.path.join(work, f"variant-{name}-{size}")
        shutil.rmtree(path, ignore_errors=True)
        row = build_edge(path, matrix, config=config, shops=shops)
        row.update(query_in_fresh_process(path, query_vectors, truth, efs))
        shutil.rmtree(path, ignore_errors=True)
        out[name] = row
    return out


def shell_search(size: int, work: str, repeat: int = 5) -> dict:
    """Wall time of one `clip-pyfunc search --like ID` at `size` points, start-up included (median)."""
    from clip_pyfunc.benchmarks.common import percentile

    matrix = low_dim_vectors(size, seed=1, centres=max(20, size // 50))
    path = os.path.join(work, f"shell-{size}")
    shutil.rmtree(path, ignore_errors=True)
    build_edge(path, matrix)
    del matrix
    times = []
    for i in range(repeat):
        t = time.perf_counter()
        done = subprocess.run(["clip-pyfunc", "search", "--index-path", path, "--collection", "bench", "--like",
                               f"item-{i * 997}", "--k", "10"], capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if done.returncode != 0 or len(done.stdout.splitlines()) != K:
            raise RuntimeError(f"clip-pyfunc search failed: {done.stderr[-2000:]}")
    import_only = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import clip_pyfunc.cli"], check=True)
        import_only.append(time.perf_counter() - t)
    shutil.rmtree(path, ignore_errors=True)
    return {"points": size, "search_like_wall_s_median": round(percentile(times, 50), 2),
            "search_like_wall_s_all": [round(x, 2) for x in times],
            "python_import_cli_s_median": round(percentile(import_only, 50), 2)}


def duplicates(size: int, work: str, planted_share: float = 0.01, threshold: float = 0.97, chains: int = 10,
               chain_length: int = 12) -> dict:
    """duplicate_groups over `size` low-dim items with `planted_share` planted near-copies (cosine ~0.99) and
    `chains` planted chains (each item at cosine 0.98 to the next, the ends far apart), by each linkage.

    Per linkage: planted-pair recall (both copies in one group), pair precision (the share of the pairs
    inside reported groups whose exact cosine is at or above the threshold), the largest group, the chains
    reported whole, seconds and RSS growth.
    """
    import numpy as np

    from clip_pyfunc.search.query import LINKAGES, duplicate_groups
    from clip_pyfunc.search.store import EdgeStore

    rng = np.random.default_rng(11)
    matrix = low_dim_vectors(size, seed=1, centres=max(20, size // 50))
    planted = int(size * planted_share)
    originals = rng.choice(size - planted - chains * chain_length, planted, replace=False)
    copies = matrix[originals] + 0.004 * rng.standard_normal((planted, DIM), dtype=np.float32)
    matrix[size - planted:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    step = np.arccos(0.98)
    first_chain = size - planted - chains * chain_length
    for c in range(chains):  # x, then rotating away from x in the plane of (x, u), u orthogonal to x
        x = matrix[first_chain + c * chain_length]
        u = rng.standard_normal(DIM).astype(np.float32)
        u -= (u @ x) * x
        u /= np.linalg.norm(u)
        angles = np.arange(chain_length) * step
        matrix[first_chain + c * chain_length:first_chain + (c + 1) * chain_length] = \
            np.outer(np.cos(angles), x) + np.outer(np.sin(angles), u)
    pair_cos = np.einsum("ij,ij->i", matrix[originals], matrix[size - planted:])
    path = os.path.join(work, f"dups-{size}")
    shutil.rmtree(path, ignore_errors=True)
    built = build_edge(path, matrix)
    out = {"points": size, "planted_pairs": planted, "planted_pair_cosine_min": round(float(pair_cos.min()), 4),
           "chains": chains, "chain_length": chain_length, "chain_step_cosine": 0.98,
           "chain_end_cosine": round(float(np.cos(step * (chain_length - 1))), 4), "threshold": threshold,
           "k": 10, "build": built}
    for linkage in LINKAGES:
        rss0 = _rss_mib()
        t = time.perf_counter()
        with EdgeStore(path, "bench") as store:
            groups = duplicate_groups(store, threshold, linkage=linkage)
        took = time.perf_counter() - t
        group_of = {i: n for n, g in enumerate(groups) for i in g["ids"]}
        found = sum(1 for o, c in zip(originals, range(size - planted, size))
                    if f"item-{o}" in group_of and group_of.get(f"item-{o}") == group_of.get(f"item-{c}"))
        pairs = above = 0
        for g in groups:
            rows = matrix[[int(i.split("-")[1]) for i in g["ids"]]]
            cos = (rows @ rows.T)[np.triu_indices(len(rows), 1)]
            pairs += len(cos)
            above += int((cos >= threshold - 1e-6).sum())
        whole = sum(1 for c in range(chains) if len({group_of.get(f"item-{first_chain + c * chain_length + j}")
                                                      for j in range(chain_length)} - {None}) == 1
                    and f"item-{first_chain + c * chain_length}" in group_of)
        out[linkage] = {"planted_recall": round(found / planted, 4), "pairs_in_groups": pairs,
                        "pair_precision": round(above / max(pairs, 1), 4), "groups": len(groups),
                        "largest_group": max((g["size"] for g in groups), default=0), "chains_reported_whole": whole,
                        "seconds": round(took, 1), "rss_growth_mib": round(_rss_mib() - rss0, 1)}
    del matrix
    shutil.rmtree(path, ignore_errors=True)
    return out


def register_random_vit(tmp: str) -> dict:
    """Random ViT-B/32 weights registered in a temporary registry: {"text": {"uri"}, "image": {"uri"}, ...}."""
    from clip_pyfunc.benchmarks.common import temporary_registry
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.settings import load_settings

    temporary_registry("clip-bench-app-")
    ckpt = save_random_checkpoint(os.path.join(tmp, "vit-b-32"), "vit-b-32")
    return register_models(load_settings(None, {"model": {"source": ckpt}}))["models"]


def app_overhead(path: str, points: int, registered: dict, queries: int, tmp: str) -> dict:
    """The app's /search on the store at `path` against the store's own query and Searcher.search, in parts."""
    import mlflow
    import requests

    from clip_pyfunc.benchmarks.common import free_port, percentile, time_calls, wait_ready
    from clip_pyfunc.search.query import Searcher
    from clip_pyfunc.search.store import EdgeStore

    port = free_port()
    log = open(os.path.join(tmp, "app.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "clip_pyfunc.cli", "app", "--index-path", path, "--collection",
                             "bench", "--no-classifier", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    likes = iter([f"item-{i * 7919 % points}" for i in range(10 * queries)])
    try:
        wait_ready(f"{url}/health", proc)
        session = requests.Session()
        served = {
            "search_like": time_calls(lambda: session.post(f"{url}/search", data={"like": next(likes), "k": "10"},
                                                           timeout=60).raise_for_status(), queries),
            "search_text": time_calls(lambda: session.post(f"{url}/search", data={"text": "a red dress", "k": "10"},
                                                           timeout=60).raise_for_status(), queries),
            "health": time_calls(lambda: session.get(f"{url}/health", timeout=60).raise_for_status(), queries),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = mlflow.pyfunc.load_model(registered["text"]["uri"])
    with EdgeStore(path, "bench", must_exist=True) as store:
        searcher = Searcher(store, text_model=text)
        vector = text.predict(["a red dress"])[0]
        direct = {
            "search_like": time_calls(lambda: searcher.search(like=next(likes), k=10), queries),
            "search_text": time_calls(lambda: searcher.search(text="a red dress", k=10), queries),
            "store_query": time_calls(lambda: store.query(vector, 11), queries),
            "text_forward": time_calls(lambda: text.predict(["a red dress"]), queries),
        }
    p50 = {f"app_{k}": percentile(v, 50) * 1e3 for k, v in served.items()}
    p50.update({f"direct_{k}": percentile(v, 50) * 1e3 for k, v in direct.items()})
    out = {k: round(v, 2) for k, v in p50.items()}
    out["points"] = points
    out["added_ms_search_like"] = round(p50["app_search_like"] - p50["direct_search_like"], 2)
    out["added_ms_search_text"] = round(p50["app_search_text"] - p50["direct_search_text"], 2)
    out["engine"] = text.unwrap_python_model().runtime_summary()
    return out


def run(points: int = 1_000_000, compare_sizes=(20_000, 100_000), efs=(32, 64, 128, 256), queries: int = 200,
        parts=("large", "app", "compare", "shell", "duplicates", "iid"), output: str | None = None,
        quantization: str = "none") -> dict:
    """The parts asked for, with the machine they ran on; `output` gets the JSON after each part."""
    from clip_pyfunc.benchmarks.bench import matmul_gflops
    from clip_pyfunc.benchmarks.common import machine_info

    work = tempfile.mkdtemp(prefix="clip-bench-search-")
    out = {"benchmark": "bench-search", "machine": machine_info(), "matmul_gflops": matmul_gflops(),
           "note": "synthetic random vectors (geometry designed, no meaning) and random ViT-B/32 weights",
           "k": K}
    t0 = time.perf_counter()
    try:
        registered = space = None
        if "app" in parts:  # the large store holds the space of a registered model, so the app can open it
            from clip_pyfunc.search.index import model_space

            registered = register_random_vit(work)
            space = model_space(registered["image"]["uri"])
        for part in parts:
            print(f"bench-search: {part} ...", file=sys.stderr, flush=True)
            if part == "large":
                out["large_low_dim"] = large(points, efs, queries, "low-dim", work, keep="app" in parts, space=space,
                                             quantization=quantization)
            elif part == "app":
                out["app"] = app_overhead(out["large_low_dim"]["path"], points, registered, 50, work)
            elif part == "iid":
                out["large_iid"] = large(points, sorted({*efs, 512, 1024, 2048}), queries // 2, "iid", work)
            elif part == "compare":
                out["compare"] = compare(compare_sizes, efs, queries, work)
            elif part == "shell":
                out["shell"] = shell_search(max(compare_sizes), work)
            elif part == "duplicates":
                out["duplicates"] = duplicates(max(compare_sizes), work)
            elif part == "int8":
                from clip_pyfunc.settings import IndexConfig

                out["int8"] = variants(max(compare_sizes), efs, queries, work,
                                       {"none": IndexConfig(), "int8": IndexConfig(quantization="int8")})
            elif part == "payload_m":  # 10 shops: each value's points exceed the full-scan threshold at 100k
                from clip_pyfunc.settings import IndexConfig

                configs = {"payload_m_0": IndexConfig(), "payload_m_16": IndexConfig(hnsw_payload_m=16)}
                out["payload_m"] = variants(max(compare_sizes), efs, queries, work, configs, shops=10)
            out.setdefault("seconds", {})[part] = round(time.perf_counter() - t0)
            out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            print(f"bench-search: {part} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if output:
                with open(output, "w") as f:
                    json.dump(out, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
