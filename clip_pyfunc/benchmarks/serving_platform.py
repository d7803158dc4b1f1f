"""`clip-pyfunc serve` under what platforms do to it, the baseline code tree against the current one.

Four measurements, each made on both trees in one run so that the ratios compare like with like
(the machine drifts by 10% between minutes, so where a ratio is asked for, rounds alternate:
baseline, current, baseline, current):

1. cold start: process start to the first 200 on GET /ping, the first request, then the steady p50;
2. throughput with 8 clients sending one 640x480 JPEG a request back to back;
3. overload: many clients sending two 2-megapixel JPEGs a request, honouring Retry-After on 429
   (and 503), against what the model embeds in process when nothing else runs;
4. gone clients: 8 clients send 24 large PNGs each and give up after 1 s; how long a lone request
   then takes, and how many of the abandoned rows the server still embedded.

Each tree's server is `python -m clip_pyfunc.cli serve` run with that tree first on PYTHONPATH and as
its working directory, so it imports that tree's package (serving, runtime and models alike: a
logged model's code copy only adds a path behind the package already imported). One random-weight
checkpoint of ViT-B/32's shapes is registered once, by the current tree, and both serve its image
model. A server that fails to start, or a measurement that fails, is recorded with its error and
the run goes on.

    python -m clip_pyfunc.benchmarks.serving_platform --out docs/bench-serving-platform.json \\
        --baseline /work/base [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from clip_pyfunc.benchmarks.common import b64, free_port, machine_info, percentile, photo_jpeg, temporary_registry

_HEADERS = {"Content-Type": "application/json"}
_RETRY_AFTER_CAP_S = 2.0
_GONE_CLIENTS, _GONE_ROWS, _GONE_AFTER_S, _LONE_AT_S = 8, 24, 1.0, 1.2
_IDLE_FOR_S, _IDLE_CPU_CORES, _IDLE_WAIT_MAX_S = 2.0, 0.25, 60.0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _records(images: list[str]) -> str:
    """MLflow's dataframe_records body with one `input` row per base64 image."""
    return json.dumps({"dataframe_records": [{"input": image} for image in images]})


def _noisy_png(seed: int, size: int = 2000, noise_share: float = 0.1) -> bytes:
    """A size x size PNG: smooth gradients with uniform noise over the top `noise_share` of its rows,
    which PNG cannot compress: about 0.9 MB at 2000 px and 0.1, and decoding costs what any 4 MP image does.

    More noise makes 8 such 24-row requests too large to reach the server within the 1 s before their
    clients give up (at 2 MB a PNG, 88% arrived), and a body that never arrives whole is never embedded.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, (x + y + seed * 97) * 255 // (2 * size) % 256], -1)
    pixels = pixels.astype(np.int16)
    rows = int(size * noise_share)
    pixels[:rows] += rng.integers(-8, 9, size=(rows, size, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tree_env(root: str) -> dict[str, str]:
    """This process's environment with `root` alone on PYTHONPATH and the server's thread count left to serve."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = root
    return env


def _describe_tree(root: str) -> dict:
    """Where the tree's server imports clip_pyfunc from, and the tree's commit (read-only git)."""
    def run(cmd):
        done = subprocess.run(cmd, cwd=root, env=_tree_env(root), capture_output=True, text=True, timeout=60)
        return done.stdout.strip() if done.returncode == 0 else None

    status = run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    return {"root": root,
            "package": run([sys.executable, "-c", "import clip_pyfunc; print(clip_pyfunc.__file__)"]),
            "commit": run(["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"]),
            "modified_files": None if status is None else len(status.splitlines())}


class _Server:
    """`python -m clip_pyfunc.cli serve` of one model from one code tree, in a subprocess of its own session.

    Args:
        model_uri: The model to serve.
        root: The code tree (its clip_pyfunc package is imported: PYTHONPATH and working directory).
        log_path: Where the server's stdout and stderr go.
    """

    def __init__(self, model_uri: str, root: str, log_path: str, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.port, self.log_path = free_port(), log_path
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "clip_pyfunc.cli", "serve", "--model-uri", model_uri, "--port", str(self.port),
               *args]
        self.started = time.perf_counter()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, env={**_tree_env(root), **(env or {})}, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, seconds: float = 300.0) -> float:
        """Poll GET /ping every 50 ms; seconds from process start to its first 200."""
        import requests

        deadline = self.started + seconds
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}) before /ping answered; "
                                   f"log: {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/ping", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"/ping did not answer 200 within {seconds:.0f} s; log: {self.log_tail()}")

    def __enter__(self):
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 600) -> str:
        with open(self.log_path, errors="replace") as f:
            return " | ".join(f.read()[-chars:].splitlines())

    def embedded_rows(self) -> float:
        """clip_pyfunc_rows_total{outcome="embedded"} summed over models, from the server's /metrics."""
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=30).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "clip_pyfunc_rows_total" and s.labels.get("outcome") == "embedded")

    def forward_seconds(self) -> tuple[float, float]:
        """(sum of seconds, count) of the server's forwards so far, from its /metrics."""
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=30).text
        got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("clip_pyfunc_stage_seconds_") and s.labels.get("stage") == "forward"
               and s.name.endswith(("_sum", "_count"))}
        return got.get("clip_pyfunc_stage_seconds_sum", 0.0), got.get("clip_pyfunc_stage_seconds_count", 0.0)

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) used so far by the server's process tree."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
        return total

    def rss_mib(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
        except psutil.NoSuchProcess:
            return 0.0


def _attempt(what: str, fn: Callable[[], dict], log: Callable[[str], None]) -> dict:
    """fn()'s result, or {"error": ...} when it raises: one failed tree or round does not stop the run."""
    try:
        return fn()
    except Exception as e:  # a benchmark records any failure and goes on
        log(f"[{what}] failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"[:1500]}


def _median(values: list[float]) -> float | None:
    return round(percentile(values, 50), 3) if values else None


def _ratio(a, b, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


# ---------------------------------------------------------------- clients


def _hammer(url: str, body: str, clients: int, seconds: float, timeout: float,
            honour_retry_after: bool = False) -> dict:
    """`clients` threads, each with its own requests.Session, posting `body` back to back for `seconds`.

    A 429 or 503 with Retry-After makes that client sleep that many seconds (at most 2) before its next
    request when `honour_retry_after`. Requests in flight when the time is up are waited for (`timeout`).

    Returns:
        {"answers": [(seconds from start to the answer, status or None for a client error, latency s,
        Retry-After present, client error name)], "window_s": seconds, "drain_s": seconds after the window}.
    """
    import requests

    answers: list[tuple] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def client():
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                status, retry_after, error = None, None, None
                try:
                    r = session.post(url, data=body, headers=_HEADERS, timeout=timeout)
                    status, retry_after = r.status_code, r.headers.get("Retry-After")
                except requests.RequestException as e:
                    error = type(e).__name__
                done = time.perf_counter()
                with lock:
                    answers.append((done - start, status, done - t, retry_after is not None, error))
                if error:
                    time.sleep(0.1)  # a refused connection would otherwise spin
                elif honour_retry_after and status in (429, 503) and retry_after is not None:
                    try:
                        time.sleep(min(max(float(retry_after), 0.0), _RETRY_AFTER_CAP_S))
                    except ValueError:  # an HTTP date: cap it
                        time.sleep(_RETRY_AFTER_CAP_S)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"answers": answers, "window_s": seconds, "drain_s": max(0.0, time.perf_counter() - deadline)}


def _summarise(run: dict, images_per_request: int) -> dict:
    """Statuses, p50/p95/p99 of the 200s (ms), and images/s answered 200 from the start until the last
    answer: requests still in flight when the window closes count, with the time they took (a batched
    server answers many at once, so a count cut at the window's edge would jump by a batch)."""
    answers, elapsed = run["answers"], run["window_s"] + run["drain_s"]
    ok = [a for a in answers if a[1] == 200]
    counts = {"200": 0, "429": 0, "503": 0, "504": 0, "other": {}, "client_error": {}}
    for _, status, _, _, error in answers:
        if error:
            counts["client_error"][error] = counts["client_error"].get(error, 0) + 1
        elif str(status) in counts:
            counts[str(status)] += 1
        else:
            counts["other"][str(status)] = counts["other"].get(str(status), 0) + 1
    lat = [a[2] for a in ok]
    ms = lambda q: round(1000 * percentile(lat, q), 1) if lat else None  # noqa: E731
    return {"requests": len(answers), "statuses": counts,
            "refused_share": round(1 - len(ok) / len(answers), 4) if answers else None,
            "p50_ms": ms(50), "p95_ms": ms(95), "p99_ms": ms(99),
            "img_per_s": round(images_per_request * len(ok) / elapsed, 2),
            "drain_s": round(run["drain_s"], 2)}


def _timed_post(session, url: str, body: str, timeout: float = 120.0) -> tuple[int, float]:
    t = time.perf_counter()
    status = session.post(url, data=body, headers=_HEADERS, timeout=timeout).status_code
    return status, time.perf_counter() - t


# ---------------------------------------------------------------- 1. cold start


def cold_start(uri: str, trees: dict[str, str], tmp: str, starts: int = 2, requests_n: int = 30,
               log: Callable[[str], None] = _stderr) -> dict:
    """Per tree, `starts` starts (alternating trees): start to the first 200 on /ping, the first request
    (one 640x480 JPEG, a new connection) right after, then `requests_n` sequential ones on one session."""
    import requests

    body = _records([b64(photo_jpeg(640, 480, seed=1))])
    out: dict = {label: {"starts": []} for label in trees}

    def one_start(label: str, root: str, n: int) -> dict:
        server = _Server(uri, root, os.path.join(tmp, f"cold-{label}-{n}.log"))
        try:
            ready = server.wait_ready()
            url = f"{server.url}/invocations"
            with requests.Session() as session:
                first_status, first = _timed_post(session, url, body)
                steady = [_timed_post(session, url, body) for _ in range(requests_n)]
        finally:
            server.stop()
        ok = [s for status, s in steady if status == 200]
        p50 = percentile(ok, 50) if ok else None
        return {"ready_s": round(ready, 2), "first_status": first_status, "first_request_s": round(first, 3),
                "steady_p50_ms": round(1000 * p50, 1) if p50 else None, "steady_non_200": len(steady) - len(ok),
                "first_over_steady_p50": _ratio(first, p50, 2)}

    for n in range(starts):
        for label, root in trees.items():
            got = _attempt(f"cold {label} {n + 1}", lambda: one_start(label, root, n), log)
            out[label]["starts"].append(got)
            log(f"[cold {label} {n + 1}] {got}")
    for label, result in out.items():
        good = [s for s in result["starts"] if "error" not in s]
        for key in ("ready_s", "first_request_s", "steady_p50_ms", "first_over_steady_p50"):
            result[f"median_{key}"] = _median([s[key] for s in good if s[key] is not None])
    return out


# ---------------------------------------------------------------- 2. throughput, 8 clients


def throughput(uri: str, trees: dict[str, str], tmp: str, seconds: float, rounds: int = 2, clients: int = 8,
               log: Callable[[str], None] = _stderr) -> dict:
    """Per tree, `rounds` rounds (alternating trees, both servers up) of `clients` clients sending one
    640x480 JPEG a request back to back for `seconds`; medians of images/s, p50 and p95."""
    body = _records([b64(photo_jpeg(640, 480, seed=1))])
    out: dict = {label: {"rounds": []} for label in trees}
    servers: dict[str, _Server] = {}
    try:
        for label, root in trees.items():
            server = _Server(uri, root, os.path.join(tmp, f"throughput-{label}.log"))
            got = _attempt(f"throughput {label} start", lambda: {"ready_s": server.wait_ready()}, log)
            if "error" in got:
                server.stop()
                out[label]["error"] = got["error"]
                continue
            servers[label] = server
            _hammer(f"{server.url}/invocations", body, clients, 3.0, 120)  # warm up at this concurrency
        for n in range(rounds):
            for label, server in servers.items():
                got = _attempt(f"throughput {label} {n + 1}", lambda: _summarise(
                    _hammer(f"{server.url}/invocations", body, clients, seconds, 120), 1), log)
                out[label]["rounds"].append(got)
                log(f"[throughput {label} {n + 1}] {got}")
    finally:
        for server in servers.values():
            server.stop()
    for label, result in out.items():
        good = [r for r in result["rounds"] if "error" not in r]
        for key in ("img_per_s", "p50_ms", "p95_ms"):
            result[f"median_{key}"] = _median([r[key] for r in good if r[key] is not None])
    return out


# ---------------------------------------------------------------- 3. overload


def unloaded_batch_rate(uri: str, image: str, rows: int = 32, repeat: int = 3) -> dict:
    """Images/s of one in-process predict of `rows` copies of `image` (median of `repeat`, after one
    untimed), at the torch threads one server worker uses (cores // 1 worker); run while no server runs."""
    import gc

    import mlflow
    import pandas as pd
    import torch

    threads = max(1, os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = mlflow.pyfunc.load_model(uri)
        frame = pd.DataFrame({"input": [image] * rows})
        model.predict(frame)
        rates = []
        for _ in range(repeat):
            t = time.perf_counter()
            model.predict(frame)
            rates.append(rows / (time.perf_counter() - t))
        del model
        gc.collect()
    finally:
        torch.set_num_threads(before)
    return {"rows": rows, "torch_threads": threads, "img_per_s": round(percentile(rates, 50), 2),
            "runs_img_per_s": [round(r, 2) for r in rates]}


def overload(uri: str, trees: dict[str, str], tmp: str, clients: int, seconds: float, image: str,
             unloaded_img_per_s: float | None, log: Callable[[str], None] = _stderr) -> dict:
    """Per tree, a fresh server and `clients` clients posting two 2-megapixel JPEGs a request back to
    back for `seconds` (client timeout 120 s), honouring Retry-After on 429/503 (capped at 2 s).

    The same server's rate with 8 such clients, just before (`served_unloaded_img_per_s`, 15 s), is
    the unloaded rate through the same path; `over_served_unloaded` compares the overloaded rate with
    it. The clients run on the same cores as the server: every refused request's 2.6 MB body is
    sent and read, on the server's cores too."""
    body = _records([image, image])
    out: dict = {}

    def one(label: str, root: str) -> dict:
        with _Server(uri, root, os.path.join(tmp, f"overload-{label}.log")) as server:
            import requests

            with requests.Session() as session:  # one request first: the model's lazy set-up is not overload
                _timed_post(session, f"{server.url}/invocations", body)
            unloaded = _summarise(_hammer(f"{server.url}/invocations", body, 8, 15.0, 120,
                                          honour_retry_after=True), 2)
            peak, stop = [server.rss_mib()], threading.Event()

            def watch_rss():
                while not stop.wait(0.5):
                    peak[0] = max(peak[0], server.rss_mib())

            watcher = threading.Thread(target=watch_rss, daemon=True)
            watcher.start()
            try:
                run = _hammer(f"{server.url}/invocations", body, clients, seconds, 120, honour_retry_after=True)
            finally:
                stop.set()
                watcher.join()
            alive = server.proc.poll() is None
        got = _summarise(run, 2)
        got.pop("p95_ms")
        got["retry_after_on_429"] = _header_share(run["answers"], 429)
        got["retry_after_on_503"] = _header_share(run["answers"], 503)
        got["over_unloaded_batch_rate"] = _ratio(got["img_per_s"], unloaded_img_per_s)
        got["served_unloaded_img_per_s"] = unloaded["img_per_s"]
        got["served_unloaded_p99_ms"] = unloaded["p99_ms"]
        got["over_served_unloaded"] = _ratio(got["img_per_s"], unloaded["img_per_s"])
        got["rss_peak_mib"] = round(peak[0])
        got["server_alive_after"] = alive
        return got

    for label, root in trees.items():
        out[label] = _attempt(f"overload {label}", lambda: one(label, root), log)
        log(f"[overload {label}] {out[label]}")
    return out


def _header_share(answers: list[tuple], status: int) -> float | None:
    """Share of the answers with `status` that carried Retry-After (None when there were none)."""
    seen = [a[3] for a in answers if a[1] == status]
    return round(sum(seen) / len(seen), 3) if seen else None


# ---------------------------------------------------------------- 4. gone clients


def _give_up_after(port: int, request: bytes, seconds: float, sent: list, index: int) -> None:
    """Send `request` on a raw socket and close it `seconds` after starting, sent or not (a client timing out)."""
    deadline = time.perf_counter() + seconds
    count = 0
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        try:
            view = memoryview(request)
            while count < len(view) and time.perf_counter() < deadline:
                s.settimeout(max(0.001, deadline - time.perf_counter()))
                count += s.send(view[count:count + 2**20])
        except (socket.timeout, OSError):
            pass
        sent[index] = count / len(request)
        time.sleep(max(0.0, deadline - time.perf_counter()))


def gone_clients(uri: str, trees: dict[str, str], tmp: str, log: Callable[[str], None] = _stderr,
                 noise_share: float = 0.1) -> dict:
    """Per tree, a fresh server: 8 clients each send 24 2000x2000 PNGs and close the connection after 1 s;
    at 1.2 s a lone 640x480 JPEG request is timed; then the server is watched until idle (no embedded row
    and under 0.25 cores of CPU for 2 s, at most 60 s) to count the abandoned rows it embedded anyway.

    `noise_share` of each PNG's rows carry noise: 0 gives small bodies (smooth gradients), 0.1 bodies of
    30 MiB whose JSON MLflow parses for 0.2 s each, holding the GIL, before any model code runs. A full
    forward's time (32 rows, measured in the same server before the burst) is reported beside the lone
    request's, since the goal is a wait of at most one forward."""
    import requests

    pngs = [_noisy_png(seed, noise_share=noise_share) for seed in range(_GONE_ROWS)]
    full = _records([b64(photo_jpeg(640, 480, seed=1))] * 32)
    payload = _records([b64(png) for png in pngs]).encode()
    request = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)) + payload
    lone = _records([b64(photo_jpeg(640, 480, seed=1))])
    out: dict = {}

    def one(label: str, root: str) -> dict:
        with _Server(uri, root, os.path.join(tmp, f"gone-{label}.log")) as server, requests.Session() as session:
            url = f"{server.url}/invocations"
            _timed_post(session, url, lone)  # the model's lazy set-up
            idle_lone = sorted(_timed_post(session, url, lone)[1] for _ in range(3))[1]
            _timed_post(session, url, full)
            forward_s, forwards = server.forward_seconds()
            _timed_post(session, url, full)
            full_forward_s = server.forward_seconds()[0] - forward_s  # one forward of 32 rows
            assert server.forward_seconds()[1] == forwards + 1
            before = server.embedded_rows()
            sent = [0.0] * _GONE_CLIENTS
            start = time.perf_counter()
            threads = [threading.Thread(target=_give_up_after, args=(server.port, request, _GONE_AFTER_S, sent, i))
                       for i in range(_GONE_CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(max(0.0, start + _LONE_AT_S - time.perf_counter()))
            lone_at = time.perf_counter() - start
            with requests.Session() as fresh:
                lone_status, lone_s = _timed_post(fresh, url, lone)
            busy_until, count, cpu = time.perf_counter(), server.embedded_rows(), server.cpu_seconds()
            last, waited_out = time.perf_counter(), False
            while time.perf_counter() - busy_until < _IDLE_FOR_S:
                if time.perf_counter() - start > _IDLE_WAIT_MAX_S:
                    waited_out = True
                    break
                time.sleep(0.25)
                now_count, now_cpu, now = server.embedded_rows(), server.cpu_seconds(), time.perf_counter()
                if now_count != count or (now_cpu - cpu) / (now - last) > _IDLE_CPU_CORES:
                    busy_until = now
                count, cpu, last = now_count, now_cpu, now
            embedded = count - before - (1 if lone_status == 200 else 0)
        return {"body_mib": round(len(payload) / 2**20, 1),
                "png_mib": round(sum(map(len, pngs)) / len(pngs) / 2**20, 2),
                "sent_share_by_client": [round(s, 3) for s in sent],
                "idle_lone_ms": round(1000 * idle_lone, 1), "lone_sent_at_s": round(lone_at, 2),
                "lone_status": lone_status, "lone_ms": round(1000 * lone_s, 1),
                "lone_over_idle": _ratio(lone_s, idle_lone, 2), "full_forward_ms": round(1000 * full_forward_s, 1),
                "lone_over_full_forward": _ratio(lone_s, full_forward_s, 2),
                "abandoned_rows": _GONE_CLIENTS * _GONE_ROWS, "abandoned_rows_embedded": int(embedded),
                "busy_s": round(busy_until - start, 2), "idle_wait_timed_out": waited_out}

    for label, root in trees.items():
        out[label] = _attempt(f"gone {label}", lambda: one(label, root), log)
        log(f"[gone {label}] {out[label]}")
    return out


# ---------------------------------------------------------------- 5. SIGTERM, 6. a hanging forward


def drain(uri: str, trees: dict[str, str], tmp: str, log: Callable[[str], None] = _stderr,
          clients: int = 8, before_s: float = 3.0) -> dict:
    """Per tree and for 1 and 2 workers: `clients` clients send one 640x480 JPEG a request back to back;
    after `before_s` SIGTERM goes to the server's main process only (as a container runtime sends it).
    Counts the requests sent before the signal and how many of them failed, the seconds to exit, and
    what readiness (GET /ping every 0.1 s) answered after the signal."""
    import requests

    body = _records([b64(photo_jpeg(640, 480, seed=1))])
    out: dict = {}

    def one(label: str, root: str, workers: int) -> dict:
        server = _Server(uri, root, os.path.join(tmp, f"drain-{label}-{workers}.log"),
                         args=("--workers", str(workers)))
        with server:
            stop, answers = threading.Event(), []

            def client():
                with requests.Session() as session:
                    while not stop.is_set():
                        sent = time.perf_counter()
                        try:
                            status = session.post(f"{server.url}/invocations", data=body, headers=_HEADERS,
                                                  timeout=120).status_code
                        except requests.RequestException as e:
                            status = type(e).__name__
                            time.sleep(0.05)
                        answers.append((sent, status))

            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            time.sleep(before_s)
            signalled = time.perf_counter()
            os.kill(server.proc.pid, signal.SIGTERM)
            ready: dict[str, int] = {}
            while server.proc.poll() is None and time.perf_counter() - signalled < 120:
                try:
                    key = str(requests.get(f"{server.url}/ping", timeout=1).status_code)
                except requests.RequestException:
                    key = "refused"
                ready[key] = ready.get(key, 0) + 1
                time.sleep(0.1)
            exited = time.perf_counter() - signalled
            stop.set()
            for t in threads:
                t.join()
        before = [status for sent, status in answers if sent < signalled]
        return {"workers": workers, "sent_before_signal": len(before),
                "failed_before_signal": sum(status != 200 for status in before),
                "exit_s": round(exited, 2), "readiness_after_signal": ready}

    for label, root in trees.items():
        for workers in (1, 2):
            out[f"{label}_{workers}_workers"] = _attempt(f"drain {label} {workers}", lambda: one(label, root, workers),
                                                         log)
            log(f"[drain {label} {workers}] {out[f'{label}_{workers}_workers']}")
    return out


def hang(uri: str, root: str, tmp: str, log: Callable[[str], None] = _stderr, hang_s: float = 20.0) -> dict:
    """The current tree only (CLIP_PYFUNC_FAULTS is new): the first forward hangs `hang_s`; a second request
    queues behind it, a third arrives later. Seconds (from the hanging request's start) until /health
    answers 503, until each other request is answered and with what, and until health is 200 again.
    Serve defaults (stall_seconds 10), without warm-up, which would take the fault."""
    import requests

    body = _records([b64(photo_jpeg(640, 480, seed=1))])
    env = {"CLIP_PYFUNC_FAULTS": json.dumps({"hang": 1, "hang_s": hang_s})}
    out: dict = {"hang_s": hang_s}
    with _Server(uri, root, os.path.join(tmp, "hang.log"), args=("--no-warmup",), env=env) as server:
        start = time.perf_counter()
        answers: dict = {}

        def post(name: str, delay: float):
            time.sleep(delay)
            r = requests.post(f"{server.url}/invocations", data=body, headers=_HEADERS, timeout=120)
            answers[name] = {"status": r.status_code, "answered_at_s": round(time.perf_counter() - start, 2),
                             "sent_at_s": round(delay, 2)}

        threads = [threading.Thread(target=post, args=args) for args in
                   (("hanging", 0.0), ("queued_behind", 0.5), ("arriving_later", 12.0))]
        for t in threads:
            t.start()
        unhealthy_at = healthy_again_at = None
        while time.perf_counter() - start < hang_s + 10:
            status = requests.get(f"{server.url}/health", timeout=5).status_code
            now = round(time.perf_counter() - start, 2)
            if status == 503 and unhealthy_at is None:
                unhealthy_at = now
            if status == 200 and unhealthy_at is not None and healthy_again_at is None:
                healthy_again_at = now
                break
            time.sleep(0.1)
        for t in threads:
            t.join()
    out.update({"health_503_at_s": unhealthy_at, "health_200_again_at_s": healthy_again_at, **answers})
    return out


# ---------------------------------------------------------------- the run


def run(baseline: str | None, quick: bool = False, seconds: float = 20.0,
        log: Callable[[str], None] = _stderr) -> dict:
    """Cold start, 8-client throughput, overload and gone clients for the baseline tree and the current one.

    A random-weight checkpoint of ViT-B/32's shapes is registered once, in a temporary registry, and
    its image model is served by `python -m clip_pyfunc.cli serve` from each tree (1 worker, the
    serve defaults). Trees alternate within each measurement; cold start and throughput alternate
    two rounds (baseline, current, baseline, current) and report medians.

    Args:
        baseline: Root of the baseline tree (a git worktree of the old code), or None to measure the
            current tree alone.
        quick: Shorter overload (32 clients for 10 s instead of 128 for 30 s) and throughput rounds
            (5 s), for checking that the benchmark runs; not for figures.
        seconds: Seconds per 8-client throughput round.
        log: Where progress lines go (stderr).

    Returns:
        A JSON-ready dict. Times in seconds where a key ends in `_s`, milliseconds in `_ms`;
        throughputs in images/s (`img_per_s`); memory in MiB; ratios and shares dimensionless;
        load averages as os.getloadavg() (1, 5, 15 minutes) before and after.
    """
    import clip_pyfunc

    load_before = [round(x, 2) for x in os.getloadavg()]
    current = os.path.dirname(os.path.dirname(os.path.abspath(clip_pyfunc.__file__)))
    if baseline and os.path.realpath(baseline) == os.path.realpath(current):
        raise ValueError(f"--baseline {baseline} is the current tree; give a worktree of the old code")
    trees = {"baseline": os.path.abspath(baseline), "current": current} if baseline else {"current": current}
    if quick:
        seconds = min(seconds, 5.0)

    tmp = temporary_registry("clip-pyfunc-platform-")
    try:
        return _measure(trees, tmp, quick, seconds, log, load_before)
    finally:  # the weights (1.7 GB with the registered copies) go; the servers' logs stay
        for heavy in ("checkpoint", "artifacts"):
            shutil.rmtree(os.path.join(tmp, heavy), ignore_errors=True)


def _measure(trees: dict[str, str], tmp: str, quick: bool, seconds: float, log: Callable[[str], None],
             load_before: list[float]) -> dict:
    """run()'s body, in the temporary registry `tmp`."""
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.settings import load_settings

    overload_clients, overload_s = (32, 10.0) if quick else (128, 30.0)
    log(f"registering a random-weight ViT-B/32 in {tmp}")
    ckpt = save_random_checkpoint(os.path.join(tmp, "checkpoint"), "vit-b-32")
    uri = register_models(load_settings(None, {"model": {"source": ckpt}}))["models"]["image"]["uri"]
    image_2mp = b64(photo_jpeg(1732, 1155, seed=2))
    out: dict = {
        "benchmark": "serving-platform", "quick": quick,
        "checkpoint": "vit-b-32 shapes, random weights (figures say nothing about embedding quality)",
        "model_uri": uri, "server": "python -m clip_pyfunc.cli serve, 1 worker, serve defaults",
        "trees": {label: _describe_tree(root) for label, root in trees.items()},
        "machine": machine_info(), "loadavg_before": load_before,
    }
    log(f"trees: {out['trees']}")

    log("1. cold start")
    out["cold_start"] = cold_start(uri, trees, tmp, log=log)
    log("2. throughput, 8 clients")
    out["throughput_8_clients"] = {"seconds_per_round": seconds, "request": "one 640x480 JPEG, base64",
                                   **throughput(uri, trees, tmp, seconds, log=log)}
    log("3. overload: the in-process batch rate, then the servers")
    unloaded = _attempt("unloaded batch rate", lambda: unloaded_batch_rate(uri, image_2mp), log)
    log(f"[unloaded batch rate] {unloaded}")
    out["overload"] = {"clients": overload_clients, "seconds": overload_s, "client_timeout_s": 120,
                       "request": "two 1732x1155 JPEGs, base64",
                       "retry_after": f"honoured on 429 and 503, capped at {_RETRY_AFTER_CAP_S:g} s",
                       "unloaded_batch_rate": {"what": "in-process predict of 32 rows of the same 2 MP JPEG, "
                                               "current tree's model code, no server running", **unloaded},
                       **overload(uri, trees, tmp, overload_clients, overload_s, image_2mp,
                                  unloaded.get("img_per_s"), log=log)}
    log("4. gone clients")
    out["gone_clients"] = {
        f"noise_{share:g}": {"clients": _GONE_CLIENTS, "rows_per_request": _GONE_ROWS,
                             "request": f"2000x2000 PNGs (gradients, noise over {share:g} of the rows), base64",
                             "gives_up_after_s": _GONE_AFTER_S, "lone_request": "one 640x480 JPEG",
                             **gone_clients(uri, trees, tmp, log=log, noise_share=share)}
        for share in (0.0, 0.1)}
    log("5. SIGTERM during traffic")
    out["drain"] = drain(uri, trees, tmp, log=log)
    log("6. a hanging forward")
    out["hang"] = _attempt("hang", lambda: hang(uri, trees["current"], tmp, log=log), log)
    log(f"[hang] {out['hang']}")
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["ratios"] = _ratios(out) if "baseline" in trees else {}
    out["server_logs"] = tmp
    return out


def _ratios(out: dict) -> dict:
    """Current over baseline, for the figures the issue asks to compare."""
    def pair(section: str, key: str):
        part = out
        for name in section.split("/"):
            part = part[name]
        base, cur = part.get("baseline", {}), part.get("current", {})
        return _ratio(cur.get(key), base.get(key))

    return {
        "throughput_img_per_s_current_over_baseline": pair("throughput_8_clients", "median_img_per_s"),
        "throughput_p95_current_over_baseline": pair("throughput_8_clients", "median_p95_ms"),
        "cold_ready_current_over_baseline": pair("cold_start", "median_ready_s"),
        "cold_first_request_current_over_baseline": pair("cold_start", "median_first_request_s"),
        "overload_img_per_s_current_over_baseline": pair("overload", "img_per_s"),
        "overload_p99_current_over_baseline": pair("overload", "p99_ms"),
        "gone_lone_ms_current_over_baseline_small_bodies": pair("gone_clients/noise_0", "lone_ms"),
        "gone_lone_ms_current_over_baseline_30_mib_bodies": pair("gone_clients/noise_0.1", "lone_ms"),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; the JSON result goes to --out and stdout, progress to stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--baseline", help="root of the baseline code tree (a git worktree of the old code)")
    parser.add_argument("--quick", action="store_true", help="short rounds, to check that it runs")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per 8-client throughput round")
    args = parser.parse_args(argv)
    result = run(args.baseline, quick=args.quick, seconds=args.seconds)
    text = json.dumps(result, indent=1)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
