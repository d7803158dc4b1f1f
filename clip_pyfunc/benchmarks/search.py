"""`clip-pyfunc bench-search`: search latency in Qdrant's local mode, and what the app adds over predict.

1. Local-mode search at 1k, 10k and 20k points (random unit vectors of ViT-B/32's 512 dims: the
   latency depends on the count and size, not on the values). Each size is timed next to a
   numpy brute-force scan of the same matrix, the floor for an exact search on this machine.
2. The app (`clip-pyfunc app`, uvicorn, one process) against calling the same functions
   in-process: one JPEG through POST /embeddings vs the image model's predict, and one text query
   through POST /search vs `Searcher.search`. Random ViT-B/32 weights (real shapes), 1k points.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

DIM = 512


def _unit(rows: int, seed: int):
    import numpy as np

    v = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def search_latency(sizes=(1000, 10000, 20000), queries: int = 50, k: int = 10) -> list[dict]:
    """p50/p95 ms of a k-NN query in local mode per size, with the numpy scan floor of the same run."""
    import numpy as np
    from qdrant_client import QdrantClient, models

    from clip_pyfunc.benchmarks.common import percentile, time_calls

    out = []
    for size in sizes:
        matrix = _unit(size, seed=size)
        with tempfile.TemporaryDirectory(prefix="clip-bench-q-") as path:
            client = QdrantClient(path=path)
            client.create_collection("b", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))
            for start in range(0, size, 2000):
                client.upsert("b", points=models.Batch(ids=list(range(start, min(size, start + 2000))),
                                                       vectors=matrix[start:start + 2000].tolist()))
            qs = iter(_unit(queries + 4, seed=1).tolist() * 2)
            qdrant = time_calls(lambda: client.query_points("b", query=next(qs), limit=k), queries)
            qs2 = iter(_unit(queries + 4, seed=1).tolist() * 2)
            floor = time_calls(lambda: np.argpartition(-(matrix @ np.asarray(next(qs2), np.float32)), k)[:k], queries)
            client.close()
        out.append({"points": size, "p50_ms": round(percentile(qdrant, 50) * 1e3, 2),
                    "p95_ms": round(percentile(qdrant, 95) * 1e3, 2),
                    "numpy_scan_p50_ms": round(percentile(floor, 50) * 1e3, 3),
                    "ratio_to_numpy_scan": round(percentile(qdrant, 50) / max(percentile(floor, 50), 1e-9), 1)})
    return out


def app_overhead(requests_n: int = 30) -> dict:
    """p50 ms of the app's /embeddings and /search against the same calls in-process."""
    import mlflow
    import pandas as pd
    import requests

    from clip_pyfunc.benchmarks.common import free_port, percentile, photo_jpeg, temporary_registry, time_calls, wait_ready
    from clip_pyfunc.settings import load_settings
    from clip_pyfunc.search.index import index_table, open_client
    from clip_pyfunc.search.query import Searcher
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models

    tmp = temporary_registry("clip-bench-app-")
    ckpt = save_random_checkpoint(os.path.join(tmp, "vit-b-32"), "vit-b-32")
    models_ = register_models(load_settings(None, {"model": {"source": ckpt}}))["models"]
    vectors = _unit(1000, seed=3)
    table = os.path.join(tmp, "t.parquet")
    pd.DataFrame({"id": [f"item-{i}" for i in range(1000)], "embedding": list(vectors),
                  "error": [None] * 1000}).to_parquet(table)
    client = open_client(os.path.join(tmp, "q"))
    index_table(client, "bench", table, models_["image"]["uri"], progress=False)
    client.close()

    port = free_port()
    log = open(os.path.join(tmp, "app.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "clip_pyfunc.cli", "app", "--index-path", os.path.join(tmp, "q"),
                             "--collection", "bench", "--no-classifier", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/health", proc)
        jpeg = photo_jpeg(640, 480)
        session = requests.Session()
        served = {
            "embeddings_image": time_calls(lambda: session.post(f"{url}/embeddings", files={
                "photo": ("p.jpg", jpeg, "image/jpeg")}, timeout=60).raise_for_status(), requests_n),
            "search_text": time_calls(lambda: session.post(f"{url}/search", data={"text": "a red dress", "k": "10"},
                                                           timeout=60).raise_for_status(), requests_n),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    client = open_client(os.path.join(tmp, "q"))
    searcher = Searcher(client, "bench")
    image = mlflow.pyfunc.load_model(models_["image"]["uri"])
    direct = {
        "embeddings_image": time_calls(lambda: image.predict([jpeg]), requests_n),
        "search_text": time_calls(lambda: searcher.search(text="a red dress", k=10), requests_n),
    }
    client.close()
    out = {}
    for name in served:
        s, d = percentile(served[name], 50) * 1e3, percentile(direct[name], 50) * 1e3
        out[name] = {"app_p50_ms": round(s, 2), "direct_p50_ms": round(d, 2), "added_ms": round(s - d, 2),
                     "ratio": round(s / d, 3)}
    return out


def run(sizes=(1000, 10000, 20000), requests_n: int = 30) -> dict:
    """Both measurements, with the machine they ran on."""
    from clip_pyfunc.benchmarks.bench import matmul_gflops
    from clip_pyfunc.benchmarks.common import machine_info

    return {"benchmark": "bench-search", "machine": machine_info(), "matmul_gflops": matmul_gflops(),
            "search_local_mode": search_latency(tuple(sizes)),
            "app_vs_direct": app_overhead(requests_n),
            "note": "random unit vectors and random ViT-B/32 weights: latency only, no meaning"}
