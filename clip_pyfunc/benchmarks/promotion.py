"""The switch of a promotion at catalogue scale: the collection alias, the app's swap, and the registry moves.

Two embedded collections of `points` random unit vectors each (made once, seeded, reused; random
vectors: the hits mean nothing) stand for the champion's and the candidate's. Timed, in
interleaved rounds in one run: `EdgeAliases.switch` (the atomic rename), what the app does to
swap (open the new collection, answer a first query, `Current.swap`, close the old one), and the
registry side of `promote`'s switch (the journal's commit, two alias moves, the journal marked
done) on a sqlite MLflow registry. Model loading is not timed here: it does not depend on the
catalogue (tests/test_promotion.py measures the app through a whole promotion).

    python -m clip_pyfunc.benchmarks.promotion --points 100000 --output docs/bench-promotion.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def _fill(path: str, name: str, points: int, dim: int, seed: int) -> float:
    """A collection of `points` seeded random unit vectors, HNSW built; seconds taken."""
    import numpy as np

    from clip_pyfunc.search.store import EdgeStore, Space

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    with EdgeStore(path, name) as store:
        store.ensure(Space(model_uri=f"models:/bench/{seed}", run_id=str(seed), models={}, embedding_dim=dim,
                           embedding_space=f"sha256:{seed}/{dim}"))
        for first in range(0, points, 5000):
            n = min(5000, points - first)
            v = rng.standard_normal((n, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            store.upsert(list(range(first, first + n)), v, [{}] * n)
        store.finish({})
        store.record("indexed", {"points": points})
    return time.perf_counter() - start


def run(points: int = 100_000, dim: int = 512, rounds: int = 5) -> dict:
    """Time the switch and its parts (see the module docstring); medians and every round, in seconds."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from clip_pyfunc.registry.journal import DONE, new_entry, read_journal, set_alias, write_journal
    from clip_pyfunc.search.aliases import EdgeAliases
    from clip_pyfunc.search.store import EdgeStore
    from clip_pyfunc.serving.follow import Current

    root = tempfile.mkdtemp(prefix="clip-bench-promotion-")
    path = os.path.join(root, "index")
    built = {name: round(_fill(path, name, points, dim, seed), 1) for name, seed in (("shop-a", 1), ("shop-b", 2))}
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    for name in ("bench_text", "bench_image"):
        client.create_registered_model(name)
        for _ in range(2):
            client.create_model_version(name, source=root)
    aliases = EdgeAliases(path)
    aliases.switch("shop", "shop-a")
    query = np.ones(dim, dtype=np.float32) / np.sqrt(dim)
    current = Current(EdgeStore(path, "shop-a"), on_retire=lambda store: store.close())
    times: dict[str, list[float]] = {"alias_switch": [], "app_swap": [], "registry_moves": [], "switch_total": []}
    target = "shop-b"
    for r in range(rounds):
        version = "2" if target == "shop-b" else "1"
        start = time.perf_counter()
        entry = new_entry("promote", "champion", {"bench_text": [None, version], "bench_image": [None, version]},
                          {"alias": "shop", "before": None, "after": target})
        write_journal(client, "bench_text", [*read_journal(client, "bench_text"), entry])
        for name in ("bench_text", "bench_image"):
            set_alias(client, name, "champion", version)
        entries = read_journal(client, "bench_text")
        entries[-1]["state"] = DONE
        write_journal(client, "bench_text", entries)
        moved = time.perf_counter()
        aliases.switch("shop", target)
        switched = time.perf_counter()
        store = EdgeStore(path, aliases.resolve("shop"))  # what the app's reload opens (models aside)
        store.query(query, 10)
        current.swap(store)
        swapped = time.perf_counter()
        times["registry_moves"].append(moved - start)
        times["alias_switch"].append(switched - moved)
        times["app_swap"].append(swapped - switched)
        times["switch_total"].append(swapped - start)
        target = "shop-a" if target == "shop-b" else "shop-b"  # every other round is a rollback's switch
    current.service.close()
    return {"points_per_collection": points, "dim": dim, "rounds": rounds, "build_seconds": built,
            "median_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "max_seconds": {k: round(max(v), 4) for k, v in times.items()},
            "rounds_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "note": "random unit vectors (seeded); model loading not included (see docs/SEARCH.md)"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--output")
    args = parser.parse_args()
    result = run(args.points, args.dim, args.rounds)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
