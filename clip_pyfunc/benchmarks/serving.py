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

from clip_pyfunc.benchmarks.common import (b64, free_port, machine_info, percentile, photo_jpeg, time_calls,
                                           wait_ready)


def _throughput(call, clients: int, seconds: float) -> float:
    """Completed calls per second with `clients` threads calling back to back for `seconds`."""
    done = [0] * clients
    deadline = time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < deadline:
            call()
            done[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


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
