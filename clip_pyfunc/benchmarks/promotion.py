"""A promotion measured: the app's availability through one, and the switch at catalogue scale.

`availability`: two random-weight checkpoints of one architecture (ViT-B/32 shapes; random weights:
the hits mean nothing, only their space is checked) registered as the champion and the candidate,
a catalogue of generated photo-like JPEGs, the real `clip-pyfunc promote` (embed-table on local
Spark, index) while `clients` threads search the real `clip-pyfunc app` by words and by photo.
Then a rollback, under the same load. Reported: failed requests, answers whose models and
collection are not one pair, latency before, during the promotion, around the swap and around the
rollback's swap, the app's RSS serving one pair and its peak through both swaps, and where the
promotion's time went.

`switch`: two embedded collections of `points` vectors each (`benchmarks.search.low_dim_vectors`,
seeded, made once) stand for the champion's and the candidate's. Timed, in interleaved rounds in
one run: `EdgeAliases.switch` (the atomic rename), what the app does to swap its collection (open
it, answer a first query, `Current.swap`, close the old one), and the registry side of `promote`'s
switch (the journal's commit, two alias moves, the journal marked done) on a sqlite registry.

    clip-pyfunc bench-promotion --parts availability switch --output docs/bench-promotion.json
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time


def _fill(path: str, name: str, points: int, dim: int, seed: int) -> float:
    """A collection of `points` generated unit vectors (seeded), HNSW built; seconds taken."""
    from clip_pyfunc.search.store import EdgeStore, Space

    from clip_pyfunc.benchmarks.search import low_dim_vectors

    start = time.perf_counter()
    vectors = low_dim_vectors(points, seed, centres=max(1, points // 50), space_seed=seed)
    with EdgeStore(path, name) as store:
        store.ensure(Space(model_uri=f"models:/bench/{seed}", run_id=str(seed), models={}, embedding_dim=dim,
                           embedding_space=f"sha256:{seed}/{dim}"))
        for first in range(0, points, 5000):
            n = min(5000, points - first)
            store.upsert(list(range(first, first + n)), vectors[first:first + n], [{}] * n)
        store.finish({})
        store.record("indexed", {"points": points})
    return time.perf_counter() - start


def switch(points: int = 100_000, rounds: int = 6) -> dict:
    """Time the switch and its parts (see the module docstring); medians and every round, in seconds."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from clip_pyfunc.registry.journal import DONE, new_entry, read_journal, set_alias, write_journal
    from clip_pyfunc.search.aliases import EdgeAliases
    from clip_pyfunc.search.store import EdgeStore
    from clip_pyfunc.serving.follow import Current

    dim = 512  # low_dim_vectors' size, ViT-B/32's
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
            "note": "generated vectors (seeded, clustered); model loading not included: see availability"}


def _status_mib(pid: int, field: str) -> float:
    """A field of /proc/<pid>/status in MiB (VmRSS: resident now; VmHWM: the peak)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def _percentiles(latencies: list[float]) -> dict:
    import numpy as np

    if not latencies:
        return {"requests": 0}
    a = np.asarray(latencies) * 1000
    return {"requests": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def availability(images: int = 2000, clients: int = 8, arch: str = "vit-b-32", baseline_seconds: float = 20,
                 log=print) -> dict:
    """The app's answers through a promotion of an `images`-photo catalogue (see the module docstring)."""
    import subprocess
    import threading

    import mlflow
    import requests
    from mlflow import MlflowClient

    from clip_pyfunc.benchmarks.common import free_port
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.dev.samples import photo_jpeg
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.settings import load_settings

    root = tempfile.mkdtemp(prefix="clip-bench-availability-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    names = {"text_name": "avail_text", "image_name": "avail_image"}
    versions = {}
    for label, seed in (("A", 0), ("B", 1)):
        log(f"registering checkpoint {label} ({arch}, random weights)")
        ckpt = save_random_checkpoint(os.path.join(root, f"ckpt-{label}"), arch, seed=seed)
        summary = register_models(load_settings(None, {"model": {"source": ckpt},
                                                       "registry": {**names, "alias": f"reg-{label}"}}))
        versions[label] = {k: str(summary["models"][k]["version"]) for k in ("text", "image")}
    folder = os.path.join(root, "catalogue")
    os.makedirs(folder)
    for i in range(images):
        with open(os.path.join(folder, f"photo-{i:05d}.jpg"), "wb") as f:
            f.write(photo_jpeg(640, 480, seed=i))
    index = os.path.join(root, "index")
    flags = ["--text-name", names["text_name"], "--image-name", names["image_name"], "--collection", "shop",
             "--index-path", index]

    def candidate(label):
        for kind, version in versions[label].items():
            MlflowClient().set_registered_model_alias(f"avail_{kind}", "candidate", version)

    def promote(*extra) -> dict:
        out = subprocess.run(["clip-pyfunc", "promote", *flags, "--master", "local[2]", *extra],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout)

    candidate("A")
    log(f"first promotion: embedding {images} photos with A")
    first = promote("--table", folder, "--input-format", "images")
    collections = {"A": first["collection"]["after"]}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app_log = open(os.path.join(root, "app.log"), "w")
    app = subprocess.Popen(["clip-pyfunc", "app", *flags, "--no-classifier", "--follow-seconds", "1", "--port",
                            str(port)], stdout=subprocess.DEVNULL, stderr=app_log)
    texts = ["a red dress", "two dogs on a beach", "a city at night", "a bowl of fruit"]
    photos = [photo_jpeg(640, 480, seed=10_000 + i) for i in range(4)]
    records: list[tuple] = []  # (start, seconds, status, served_by)
    stop = threading.Event()

    def client(n: int) -> None:
        session, i = requests.Session(), n
        while not stop.is_set():
            t0 = time.time()
            try:
                r = (session.post(f"{url}/search", data={"text": texts[i % 4], "k": "10"}, timeout=120) if i % 2 else
                     session.post(f"{url}/search", files={"image": ("q.jpg", photos[i % 4], "image/jpeg")},
                                  data={"k": "10"}, timeout=120))
                by = r.json().get("served_by") if r.status_code == 200 else None
                records.append((t0, time.time() - t0, r.status_code, by))
            except requests.RequestException as e:
                records.append((t0, time.time() - t0, None, str(e)))
            i += 1

    def serving() -> str | None:
        health = requests.get(f"{url}/health", timeout=30).json()
        return health["index"]["collection"] if health.get("index") else None

    try:
        deadline = time.time() + 300
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline or app.poll() is not None:
                raise RuntimeError(open(os.path.join(root, "app.log")).read()[-3000:])
            time.sleep(0.5)
        rss_one_pair = _status_mib(app.pid, "VmRSS")
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
        for t in threads:
            t.start()
        time.sleep(baseline_seconds)
        candidate("B")
        log(f"second promotion under load: embedding {images} photos with B, then the switch")
        promote_start = time.time()
        second = promote()
        promote_end = time.time()
        collections["B"] = second["collection"]["after"]
        while serving() != collections["B"] and time.time() < promote_end + 120:
            time.sleep(0.1)
        swapped = time.time()
        time.sleep(10)
        peak = _status_mib(app.pid, "VmHWM")
        rss_after = _status_mib(app.pid, "VmRSS")
        log("rollback under load")
        rollback_start = time.time()
        out = subprocess.run(["clip-pyfunc", "rollback", *flags], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        while serving() != collections["A"] and time.time() < rollback_start + 120:
            time.sleep(0.1)
        rolled_back = time.time()
        time.sleep(10)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        peak_after_rollback = _status_mib(app.pid, "VmHWM")
        rss_after_rollback = _status_mib(app.pid, "VmRSS")
    finally:
        stop.set()
        app.terminate()
        app.wait(timeout=60)
    pairs = {(f"models:/avail_text/{versions[k]['text']}", f"models:/avail_image/{versions[k]['image']}",
              collections[k]) for k in collections}
    failed = [r for r in records if r[2] != 200]
    mixed = [r for r in records if r[2] == 200 and (r[3]["text"], r[3]["image"], r[3]["collection"]) not in pairs]
    ok = [r for r in records if r[2] == 200]
    return {
        "images": images, "clients": clients, "arch": arch, "weights": "random (the hits mean nothing)",
        "requests": len(records), "failed": len(failed), "failed_examples": [str(r)[:300] for r in failed[:5]],
        "mixed_space_answers": len(mixed),
        "answers_by_collection": {k: sum(1 for r in ok if r[3]["collection"] == c) for k, c in collections.items()},
        "latency_before": _percentiles([r[1] for r in ok if r[0] < promote_start]),
        "latency_during_promotion": _percentiles([r[1] for r in ok if promote_start <= r[0] <= swapped]),
        "latency_around_the_swap": _percentiles([r[1] for r in ok if swapped - 3 <= r[0] <= swapped + 3]),
        "latency_after": _percentiles([r[1] for r in ok if swapped + 3 < r[0] < rollback_start]),
        "latency_around_the_rollback": _percentiles([r[1] for r in ok if rolled_back - 3 <= r[0] <= rolled_back + 3]),
        "rollback_seconds": {"command_and_app_swap": round(rolled_back - rollback_start, 1)},
        "app_rss_mib": {"one_pair": round(rss_one_pair), "peak": round(peak), "after_the_swap": round(rss_after),
                        "peak_over_one_pair": round(peak / rss_one_pair, 2),
                        "peak_after_the_rollback": round(peak_after_rollback),
                        "after_the_rollback": round(rss_after_rollback)},
        "promotion_seconds": {"total": round(promote_end - promote_start, 1),
                              "embed": second["steps"].get("embed", {}).get("seconds"),
                              "index": second["steps"]["index"].get("seconds"),
                              "switch": second["steps"]["switch"]["seconds"],
                              "app_swap_after_the_switch": round(swapped - promote_end, 1)},
        "first_promotion": {"embed": first["steps"].get("embed"), "index": first["steps"]["index"]},
    }


def run(parts=("availability", "switch"), *, images: int = 2000, points: int = 100_000, rounds: int = 6,
        output: str | None = None, log=print) -> dict:
    """The parts asked for, each written to `output` (JSON) as soon as it is done."""
    result: dict = {}
    for part in parts:
        result[part] = availability(images, log=log) if part == "availability" else switch(points, rounds)
        if output:
            with open(output, "w") as f:
                json.dump(result, f, indent=1)
    return result
