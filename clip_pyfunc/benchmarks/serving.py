"""Serving overhead: the same single-image request served over REST vs predicted in-process.

Reports p50/p95 latency of a single-image request both ways, and throughput with 1, 2 and
4 concurrent clients vs in-process throughput, all in one run on one registered model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from clip_pyfunc.benchmarks.common import (b64, free_port, machine_info, percentile, photo_jpeg, temporary_registry,
                                           time_calls, wait_ready)


def _throughput(call, clients: int, seconds: float) -> float:
    """Completed calls per second with `clients` threads calling back to back for `seconds`."""
    return _clients_run(call, clients, seconds)["img_per_s"]


def run(model_uri: str, requests_n: int = 40, seconds: float = 15.0) -> dict:
    """Measure served vs in-process latency and throughput for one model URI."""
    import mlflow
    import pandas as pd
    import requests

    image = b64(photo_jpeg(640, 480, seed=1))
    frame = pd.DataFrame({"input": [image]})
    body = json.dumps({"dataframe_records": [{"input": image}]})
    local = mlflow.pyfunc.load_model(model_uri)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clip_pyfunc.cli", "serve", "--model-uri", model_uri,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/invocations"
    headers = {"Content-Type": "application/json"}
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping", proc)
        session = requests.Session()

        def post():
            session.post(url, data=body, headers=headers, timeout=120).raise_for_status()

        # Latency interleaved (local, served, local, ...) so machine drift hits both sides alike.
        for _ in range(3):
            local.predict(frame)
            post()
        local_lat, served_lat = [], []
        for _ in range(requests_n):
            local_lat += time_calls(lambda: local.predict(frame), 1, warmup=0)
            served_lat += time_calls(post, 1, warmup=0)
        local_tput = _throughput(lambda: local.predict(frame), 1, seconds)
        served_tput = {}
        for clients in (1, 2, 4):
            sessions = threading.local()

            def post_own():
                s = getattr(sessions, "s", None) or requests.Session()
                sessions.s = s
                s.post(url, data=body, headers=headers, timeout=120).raise_for_status()

            served_tput[clients] = _throughput(post_own, clients, seconds)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    ms = lambda xs, q: round(1000 * percentile(xs, q), 2)  # noqa: E731
    return {
        "benchmark": "serving",
        "model_uri": model_uri,
        "request": "one 640x480 JPEG, base64, dataframe_records",
        "machine": machine_info(),
        "in_process": {"p50_ms": ms(local_lat, 50), "p95_ms": ms(local_lat, 95), "img_per_s": round(local_tput, 2)},
        "served": {"p50_ms": ms(served_lat, 50), "p95_ms": ms(served_lat, 95),
                   "img_per_s": {str(k): round(v, 2) for k, v in served_tput.items()}},
        "ratios": {
            "added_p50_ms": round(ms(served_lat, 50) - ms(local_lat, 50), 2),
            "added_p95_ms": round(ms(served_lat, 95) - ms(local_lat, 95), 2),
            **{f"served_{k}_clients_over_in_process": round(v / local_tput, 3) for k, v in served_tput.items()},
        },
    }


def compare_workers(model_uri: str, seconds: float = 20.0, clients: int = 4, requests_n: int = 30) -> dict:
    """1 worker x all cores' threads against one worker per core x 1 thread, same model, same run.

    Each layout is served by `clip-pyfunc serve`'s own command and environment (serve_env sets
    the threads per worker), then measured: throughput with `clients` concurrent clients, p50 of
    single requests one at a time, and the resident memory of the whole server process tree.
    """
    import psutil
    import requests

    from clip_pyfunc.settings import ServeConfig
    from clip_pyfunc.serving.serve import serve_command, serve_env

    cores = os.cpu_count() or 1
    body = json.dumps({"dataframe_records": [{"input": b64(photo_jpeg(640, 480, seed=1))}]})
    headers = {"Content-Type": "application/json"}
    out = {}
    for workers in (1, cores):
        port = free_port()
        config = ServeConfig(port=port, workers=workers, timeout=120)
        env = serve_env(config, {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
        proc = subprocess.Popen(serve_command(model_uri, config), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        url = f"http://127.0.0.1:{port}/invocations"
        try:
            wait_ready(f"http://127.0.0.1:{port}/ping", proc)
            sessions = threading.local()

            def post():
                s = getattr(sessions, "s", None) or requests.Session()
                sessions.s = s
                s.post(url, data=body, headers=headers, timeout=120).raise_for_status()

            for _ in range(2 * workers + 2):  # every worker loads and warms up
                _throughput(post, clients, 1.0)
            single = time_calls(post, requests_n, warmup=2)
            tput = _throughput(post, clients, seconds)
            tree = [proc] + psutil.Process(proc.pid).children(recursive=True)
            rss = sum(p.memory_info().rss for p in (psutil.Process(t.pid) for t in tree) if p.is_running())
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        out[f"{workers}x{env['OMP_NUM_THREADS']}"] = {
            "workers": workers, "threads_per_worker": int(env["OMP_NUM_THREADS"]),
            "img_per_s": round(tput, 2), "single_p50_ms": round(1000 * percentile(single, 50), 2),
            "rss_mib": round(rss / 2**20)}
    from clip_pyfunc.benchmarks.bench import matmul_gflops

    return {"benchmark": "serving-workers", "model_uri": model_uri, "clients": clients,
            "request": "one 640x480 JPEG, base64, dataframe_records", "machine": machine_info(), "layouts": out,
            "matmul_gflops": matmul_gflops()}


# ---------------------------------------------------------------- batching across requests (issue 27)


def _clients_run(call, clients: int, seconds: float) -> dict:
    """`clients` threads calling back to back for `seconds`: img/s (one image a call) and latency percentiles."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    deadline = time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            call()
            lat[i].append(time.perf_counter() - t)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [x for xs in lat for x in xs]
    return {"clients": clients, "img_per_s": round(len(every) / (time.perf_counter() - start), 2),
            "p50_ms": round(1000 * percentile(every, 50), 1), "p95_ms": round(1000 * percentile(every, 95), 1),
            "requests": len(every)}


class _Server:
    """`clip-pyfunc serve` of one model in a subprocess: its own command, defaults and environment."""

    def __init__(self, model_uri: str, *, workers: int | None = None, model_config: dict | None = None,
                 metrics: bool = True, log_path: str | None = None):
        self.port, self.metrics = free_port(), metrics
        cmd = [sys.executable, "-m", "clip_pyfunc.cli", "serve", "--model-uri", model_uri, "--port", str(self.port)]
        cmd += ["--workers", str(workers)] if workers else []
        cmd += [] if metrics else ["--no-metrics"]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if model_config:
            env["SERVING_MODEL_CONFIG"] = json.dumps(model_config)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(log_path, "w") if log_path else subprocess.DEVNULL,
                                     start_new_session=True, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        try:
            wait_ready(f"{self.url}/ping", self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)

    def rss_mib(self) -> float:
        import psutil

        root = psutil.Process(self.proc.pid)
        return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20, 1)

    def poster(self, body: str):
        """A call that posts `body` to /invocations on a session of the calling thread's own."""
        import requests

        sessions = threading.local()
        url, headers = f"{self.url}/invocations", {"Content-Type": "application/json"}

        def post():
            s = getattr(sessions, "s", None) or requests.Session()
            sessions.s = s
            s.post(url, data=body, headers=headers, timeout=300).raise_for_status()

        return post

    def forward_sizes(self) -> dict:
        """Mean rows and calls per forward so far, from the server's own /metrics."""
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=30).text
        got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith(("clip_pyfunc_forward_rows_", "clip_pyfunc_forward_requests_"))
               and s.name.endswith(("_sum", "_count"))}
        count = got.get("clip_pyfunc_forward_rows_count", 0) or 1
        return {"forwards": int(got.get("clip_pyfunc_forward_rows_count", 0)),
                "mean_rows_per_forward": round(got.get("clip_pyfunc_forward_rows_sum", 0) / count, 2),
                "mean_requests_per_forward": round(got.get("clip_pyfunc_forward_requests_sum", 0) / count, 2)}


def _hostile_bodies(image: str) -> list[tuple[str, bytes]]:
    """Requests that must be refused (name, JSON body): the fuzz cases a public endpoint sees."""
    import base64
    import io
    import struct
    import zlib

    from PIL import Image

    def png_header(w: int, h: int) -> bytes:  # a valid header announcing w x h, no pixel data worth the name
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +  # noqa: E731
                                    struct.pack(">I", zlib.crc32(kind + data)))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
            chunk(b"IEND", b"")

    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny, format="PNG")
    raw = base64.b64decode(image)
    rows = lambda cells: json.dumps({"dataframe_records": [{"input": c} for c in cells]}).encode()  # noqa: E731
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return [
        ("bad base64", rows(["%%%not base64%%%"])),
        ("not an image", rows([enc(b"hello, not an image" * 50)])),
        ("truncated jpeg", rows([enc(raw[: len(raw) // 3])])),
        ("pixel bomb header", rows([enc(png_header(30000, 30000))])),
        ("1x1 image", rows([enc(tiny.getvalue())])),
        ("null", rows([None])),
        ("random bytes 2 MB", rows([enc(os.urandom(2 * 2**20))])),
        ("good and bad rows", rows([image, "%%%", image])),
        ("malformed json", b'{"dataframe_records": [{"input": "'),
        ("wrong column", json.dumps({"dataframe_records": [{"a": 1, "b": 2}]}).encode()),
    ]


def _mixed_load(server: _Server, image: str, requests_n: int, clients: int = 4) -> dict:
    """`requests_n` requests, 70% one good image and 30% hostile (including bodies declared over the limit),
    from `clients` threads: RSS of the server tree every 100 requests, and the statuses seen."""
    import random

    import requests

    good = json.dumps({"dataframe_records": [{"input": image}]}).encode()
    hostile = _hostile_bodies(image)
    lock = threading.Lock()
    done, statuses, rss = [0], {}, []
    url = f"{server.url}/invocations"

    def over_limit():  # declared 400 MB, 64 KiB sent: the edge answers 413 without reading it
        import socket

        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 400000000\r\n\r\n" + b"A" * 65536)
            return int(s.recv(4096).split(b" ", 2)[1])

    def client(seed):
        rng = random.Random(seed)
        with requests.Session() as s:
            while True:
                with lock:
                    if done[0] >= requests_n:
                        return
                    done[0] += 1
                    n = done[0]
                pick = rng.random()
                if pick < 0.7:
                    name, status = "good", s.post(url, data=good, headers={"Content-Type": "application/json"},
                                                  timeout=300).status_code
                elif pick < 0.75:
                    name, status = "over the body limit", over_limit()
                else:
                    name, body = hostile[rng.randrange(len(hostile))]
                    status = s.post(url, data=body, headers={"Content-Type": "application/json"},
                                    timeout=300).status_code
                with lock:
                    statuses.setdefault(name, {}).setdefault(str(status), 0)
                    statuses[name][str(status)] += 1
                    if n % 100 == 0:
                        rss.append({"requests": n, "rss_mib": server.rss_mib()})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": requests_n, "clients": clients, "statuses": statuses, "rss_every_100": rss}


def metrics_cost(requests_n: int = 20000) -> float:
    """Microseconds the metrics add to a one-image request: every call a served request makes into
    serving.metrics (the edge's request count and latency, the model's stages, forward, queue wait,
    rows and health), timed in process over `requests_n` requests."""
    from clip_pyfunc.serving.metrics import Health, Metrics, ModelMetrics

    metrics = Metrics()
    observer = ModelMetrics(metrics, Health(3, metrics), "image", "openvino", "fp32")
    started = time.perf_counter()
    for _ in range(requests_n):
        observer.stage("decode", 0.004, 1)
        observer.stage("preprocess", 0.001, 1)
        observer.queue_wait(0.05)
        observer.forward(4, 4, 0.3)
        observer.success()
        observer.rows(1, 0, [])
        metrics.requests.labels("/invocations", "200").inc()
        metrics.request_seconds.labels("/invocations").observe(0.1)
    return (time.perf_counter() - started) / requests_n * 1e6


def batching(random_init: str = "vit-b-32", seconds: float = 12.0, clients: tuple[int, ...] = (1, 2, 4, 8, 16),
             waits: tuple[float, ...] = (10, 20), lone_requests: int = 40, mixed_requests: int = 1000,
             log=print) -> dict:
    """Batching across requests, served against in-process, in one run on one registered model.

    A random-weight checkpoint of `random_init`'s shapes is registered with the default settings
    in a temporary registry. The machine's speed drifts by 10% and more between minutes, so every
    served throughput is paired with an in-process batch-32 throughput measured just before it
    (`seconds` each, the server idle meanwhile), and the ratio is taken within the pair.

    For the default engine and for torch fp32, served by `clip-pyfunc serve` with its defaults
    (1 worker): a lone request's p50 against in-process (interleaved), and throughput, p50 and p95
    with `clients` concurrent clients, each sending one 640x480 JPEG a request, with the rows per
    forward. For the default engine also: `batch_wait_ms` values `waits` and 2 workers, at 8 and
    16 clients; metrics off against on (twice each, alternated, 8 clients); and the server's RSS
    after its first request and every 100 of `mixed_requests` requests mixing good and hostile bodies.

    Returns:
        A JSON-ready dict; throughputs in images/s, latencies in ms, memory in MiB, ratios dimensionless.
    """
    import mlflow
    import pandas as pd

    from clip_pyfunc.benchmarks.bench import matmul_gflops
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.settings import load_settings

    tmp = temporary_registry("clip-pyfunc-batching-")
    ckpt = save_random_checkpoint(os.path.join(tmp, "checkpoint"), random_init)
    # every engine's files: the torch fp32 layout loads the same registration on torch
    summary = register_models(load_settings(None, {"model": {"source": ckpt}, "registry": {"engine_files": "all"}}))
    uri = summary["models"]["image"]["uri"]
    image = b64(photo_jpeg(640, 480, seed=1))
    body = json.dumps({"dataframe_records": [{"input": image}]})
    one, batch32 = pd.DataFrame({"input": [image]}), pd.DataFrame({"input": [image] * 32})
    out: dict = {"benchmark": "serving-batching", "checkpoint": f"{random_init} shapes, random weights",
                 "request": "one 640x480 JPEG, base64, dataframe_records", "seconds_per_point": seconds,
                 "machine": machine_info(), "matmul_gflops": matmul_gflops(), "engines": {}}

    def paired(local, server, post, n) -> dict:
        """In-process batch-32 throughput, then the served one with `n` clients: one pair."""
        base = round(_clients_run(lambda: local.predict(batch32), 1, seconds)["img_per_s"] * 32, 2)
        before = server.forward_sizes() if server.metrics else None
        got = _clients_run(post, n, seconds)
        if before is not None:
            forwards = server.forward_sizes()["forwards"] - before["forwards"]
            got["mean_rows_per_forward"] = round(got["requests"] / forwards, 2) if forwards else None
        got["in_process_batch32_img_per_s"] = base
        got["over_in_process_batch32"] = round(got["img_per_s"] / base, 3)
        return got

    layouts = (("default", {}), ("torch_fp32", {"engine": "torch", "precision": "fp32"}))
    locals_ = {}
    for label, config in layouts:
        local = locals_[label] = mlflow.pyfunc.load_model(uri, model_config=config or None)
        local.predict(batch32)
        result = out["engines"][label] = {"runtime": local.unwrap_python_model().runtime_summary()}
        with _Server(uri, model_config=config, log_path=os.path.join(tmp, f"{label}.log")) as server:
            post = server.poster(body)
            for _ in range(3):
                post()
                local.predict(one)
            result["rss_after_first_requests_mib"] = server.rss_mib()
            local_lat, served_lat = [], []
            for _ in range(lone_requests):  # interleaved, so drift hits both alike
                local_lat += time_calls(lambda: local.predict(one), 1, warmup=0)
                served_lat += time_calls(post, 1, warmup=0)
            lone = {"in_process_p50_ms": round(1000 * percentile(local_lat, 50), 1),
                    "served_p50_ms": round(1000 * percentile(served_lat, 50), 1)}
            lone["added_p50_ms"] = round(lone["served_p50_ms"] - lone["in_process_p50_ms"], 1)
            result["lone"] = lone
            log(f"[{label}] lone {lone}")
            result["served_1_worker"] = []
            for n in clients if label == "default" else (1, 8, 16):
                _clients_run(post, n, 2.0)  # warm up at this concurrency
                result["served_1_worker"].append(paired(local, server, post, n))
                log(f"[{label}] {result['served_1_worker'][-1]}")
        if label != "default":
            locals_.pop(label)
    local = locals_["default"]
    default = out["engines"]["default"]

    def points(ns, label, **server_args):
        with _Server(uri, **server_args) as server:
            post = server.poster(body)
            got = []
            for n in ns:
                _clients_run(post, n, 2.0)
                got.append(paired(local, server, post, n))
                got[-1]["rss_mib"] = server.rss_mib()
            log(f"[{label}] {got}")
            return got

    default["batch_wait_ms"] = {str(wait): points((8, 16), f"wait {wait}", model_config={"batch_wait_ms": wait})
                                for wait in waits}
    default["served_2_workers"] = points((8, 16), "2 workers", workers=2)
    default["metrics_on_off"] = [{"metrics": on, **points((8,), f"metrics {on}", metrics=on)[0]}
                                 for on in (True, False, True, False)]
    on = [p["over_in_process_batch32"] for p in default["metrics_on_off"] if p["metrics"]]
    off = [p["over_in_process_batch32"] for p in default["metrics_on_off"] if not p["metrics"]]
    with _Server(uri) as server:
        server.poster(body)()
        first = server.rss_mib()
        mixed = _mixed_load(server, image, mixed_requests)
        mixed["rss_after_first_request_mib"] = first
        mixed["last_over_first"] = round(mixed["rss_every_100"][-1]["rss_mib"] / first, 3) if mixed[
            "rss_every_100"] else None
        default["mixed_requests"] = mixed
    log(f"[mixed] {mixed}")
    cost_us = metrics_cost()
    per_image_us = 1e6 / max(p["img_per_s"] for p in default["served_1_worker"])
    default["metrics_cost_us_per_request"] = round(cost_us, 1)
    out["ratios"] = {
        "metrics_on_over_off": round(sum(on) / sum(off), 3),
        "metrics_cost_over_request_time": round(cost_us / per_image_us, 6),
        **{f"{label}_{p['clients']}_clients_over_in_process_batch32": p["over_in_process_batch32"]
           for label, r in out["engines"].items() for p in r["served_1_worker"] if p["clients"] in (8, 16)},
        **{f"{label}_lone_added_p50_ms": r["lone"]["added_p50_ms"] for label, r in out["engines"].items()},
        "rss_after_mixed_over_first": mixed["last_over_first"],
    }
    return out


def plot_batching(result: dict, path: str) -> None:
    """Throughput and p95 latency against concurrent clients, one line per engine (docs/SERVING.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in result["engines"].items():
        xs = [p["clients"] for p in r["served_1_worker"]]
        left.plot(xs, [p["img_per_s"] for p in r["served_1_worker"]], marker="o", label=f"{label}, served")
        left.plot(xs, [p["in_process_batch32_img_per_s"] for p in r["served_1_worker"]], linestyle="--",
                  linewidth=1, color=left.lines[-1].get_color(), label=f"{label}, in process, batch 32 (paired)")
        right.plot(xs, [p["p95_ms"] for p in r["served_1_worker"]], marker="o", label=label)
    for ax, title, unit in ((left, "throughput", "images/s"), (right, "p95 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (one image per request)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    machine = result["machine"]
    fig.suptitle(f"clip-pyfunc serve, 1 worker, {result['checkpoint']}; {machine['cpu']}, {machine['cores']} cores",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
