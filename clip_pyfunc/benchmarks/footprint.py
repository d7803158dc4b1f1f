"""Footprint where a model is deployed: cold start and resident memory of each way of serving it, in one run.

One random-weight checkpoint (real ViT-B/32 shapes, meaningless vectors) is registered with the default
settings in a temporary registry. For each server, started as its command is (process start to the
first answered request; the model's files already on this disk):

- `clip-pyfunc serve` of the image model, and of the text model;
- plain `mlflow models serve --env-manager local` of the image model;
- `clip-pyfunc app --no-index` with the text and image models;

it measures the cold start (median of `starts`), the peak RSS of the server's process tree during start
and over the whole run (sampled every 20 ms), RSS after 100 and after `requests` mixed requests
(images of five sizes, one to four a request; texts of 1 to 60 words, 1 to 32 a request, so that
their shapes differ nearly every time), and the throughput of batch-32 requests after them (16 rows for the app, whose forms take 16 fields).

With `baseline_pythonpath` (a checkout of an earlier clip-pyfunc, e.g. `git worktree add /tmp/base
<commit>`), the same checkpoint is registered a second time by that package and every server is run
on it too, the two sides alternating start by start (cold starts) and server by server (the requests), so
that the ratios are taken in one run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from clip_pyfunc.benchmarks.common import free_port, machine_info, photo_jpeg

MIB = 2**20
WORDS = ("red blue black white green leather cotton denim summer winter sale men women kids sport running "
         "shoe boot dress shirt jacket bag watch hat scarf lamp chair table vintage new classic slim fit").split()
SIZES = ((640, 480), (320, 240), (1200, 900), (480, 640), (224, 224))
SERVERS = ("serve-image", "serve-text", "mlflow-image", "app")


def _images() -> list[bytes]:
    return [photo_jpeg(w, h, seed=i) for i, (w, h) in enumerate(SIZES * 4)]


def _texts(rng: random.Random, rows: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(rows)]


def _tree_rss(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / MIB
    except psutil.Error:
        return 0.0


class _Server:
    """A server process, its RSS sampled every 20 ms, and how to send it one request of each kind."""

    def __init__(self, kind: str, env: dict, workdir: str):
        self.kind, self.port = kind, free_port()
        port = str(self.port)
        cmd = {"serve-image": ["clip-pyfunc", "serve", "-m", "models:/clip_image_embedding@champion", "-p", port],
               "serve-text": ["clip-pyfunc", "serve", "-m", "models:/clip_text_embedding@champion", "-p", port],
               "mlflow-image": [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                "models:/clip_image_embedding@champion", "-p", port, "--env-manager", "local"],
               "app": ["clip-pyfunc", "app", "--no-index", "--no-classifier", "--port", port]}[kind]
        self.log = open(os.path.join(workdir, f"{kind}.log"), "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env, cwd=workdir)
        self.peak, self._stop = 0.0, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(self.proc.pid))
            time.sleep(0.02)

    def rss(self) -> float:
        return _tree_rss(self.proc.pid)

    def post(self, session, images: list[bytes], texts: list[str]):
        """One request: the images (base64 cells, or form files for the app) or else the texts."""
        if self.kind == "app":
            files = ({f"i{j}": (f"p{j}.jpg", data, "image/jpeg") for j, data in enumerate(images)} if images else
                     {f"t{j}": (None, text) for j, text in enumerate(texts)})
            return session.post(f"http://127.0.0.1:{self.port}/embeddings", files=files, timeout=120)
        cells = [base64.b64encode(data).decode() for data in images] if images else texts
        return session.post(f"http://127.0.0.1:{self.port}/invocations", data=json.dumps({"inputs": {"input": cells}}),
                            headers={"Content-Type": "application/json"}, timeout=120)

    def wait_first_answer(self, session, images, texts, seconds: float = 300.0) -> float:
        """Seconds from process start to the first 200."""
        import requests

        deadline = self.started + seconds
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited before answering; see {self.log.name}")
            try:
                if self.post(session, images, texts).status_code == 200:
                    return time.perf_counter() - self.started
            except requests.RequestException:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.kind} did not answer within {seconds:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _request(kind: str, index: int, images: list[bytes], rng: random.Random) -> tuple[list[bytes], list[str]]:
    """The index-th mixed request: images for the image servers, texts for the text one, both in turn for the app."""
    image_turn = kind in ("serve-image", "mlflow-image") or (kind == "app" and index % 2 == 0)
    if image_turn:
        return [images[(index + j) % len(images)] for j in range(1 + index % 4)], []
    return [], _texts(rng, rng.randint(1, _rows(kind)))


def _rows(kind: str) -> int:
    """Rows a request may carry: the app's form takes 16 fields at most (app.max_fields)."""
    return 16 if kind == "app" else 32


@contextlib.contextmanager
def _started(kind: str, env: dict, workdir: str, images: list[bytes]):
    """Start a server and time its first answer: yields (server, session, seconds from process start to the first
    answered request); the first request is built before the clock starts. Stops the server after."""
    import requests

    first_images, first_texts = _request(kind, 0, images, random.Random(0))
    server = _Server(kind, env, workdir)
    try:
        with requests.Session() as session:
            yield server, session, server.wait_first_answer(session, first_images, first_texts)
    finally:
        server.stop()


def cold_start(kind: str, env: dict, workdir: str, images: list[bytes]) -> tuple[float, float]:
    """One start of a server: (seconds from process start to the first answered request, peak RSS in MiB of
    its process tree meanwhile)."""
    with _started(kind, env, workdir, images) as (server, _, seconds):
        return seconds, server.peak


def measure_server(kind: str, env: dict, workdir: str, requests_n: int, images: list[bytes]) -> dict:
    """One start of a server, then its RSS through `requests_n` mixed requests and its batch-32 throughput; the
    start's cold start is one sample beside `cold_start`'s (`cold_start_s`, `rss_peak_during_start_mib`)."""
    with _started(kind, env, workdir, images) as (server, session, seconds):
        out = {"cold_start_s": seconds, "rss_peak_during_start_mib": server.peak,
               "rss_at_start_mib": round(server.rss())}
        rng = random.Random(1)
        for index in range(requests_n):
            answer = server.post(session, *_request(kind, index, images, rng))
            if answer.status_code != 200:
                raise RuntimeError(f"{kind} answered {answer.status_code}: {answer.text[:300]}")
            if index + 1 == min(100, requests_n):
                out["rss_after_100_mib"] = round(server.rss())
        out[f"rss_after_{requests_n}_mib"] = round(server.rss())
        out["rss_peak_mib"] = round(server.peak)
        out.update(_throughput(server, session, kind, images))
    return out


def measure_servers(kind: str, envs: dict, requests_n: int, starts: int, order: list[str], log) -> dict:
    """Each side's server of one kind: `starts` cold starts (their median), the sides alternating start by start,
    so that the machine's drift between minutes falls on both; then, side by side, the RSS and throughput run
    (`measure_server`, whose start is the last cold start)."""
    images = _images()  # once: building them takes about 0.9 s of CPU
    colds: dict[str, list[float]] = {side: [] for side in order}
    peaks: dict[str, list[float]] = {side: [] for side in order}
    for start in range(starts - 1):
        for side in order if start % 2 == 0 else order[::-1]:
            log(f"{kind} ({side}), start {start + 1}")
            seconds, peak = cold_start(kind, *envs[side], images)
            colds[side].append(seconds)
            peaks[side].append(peak)
    out = {}
    for side in order if starts % 2 == 1 else order[::-1]:
        env, workdir = envs[side]
        log(f"{kind} ({side}), start {starts}, {requests_n} requests")
        row = measure_server(kind, env, workdir, requests_n, images)
        colds[side].append(row.pop("cold_start_s"))
        peaks[side].append(row.pop("rss_peak_during_start_mib"))
        row.update({"cold_start_s": round(statistics.median(colds[side]), 2),
                    "cold_starts_s": [round(c, 2) for c in colds[side]],
                    "rss_peak_during_start_mib": round(max(peaks[side]))})
        out[side] = row
    return out


def _throughput(server: _Server, session, kind: str, images: list[bytes], batches: int = 8) -> dict:
    """Rows per second of `batches` sequential requests of 32 rows (16 for the app): images, texts, or both."""
    rng, size = random.Random(2), _rows(kind)
    out = {}
    for side in ("image", "text") if kind == "app" else ("text",) if kind == "serve-text" else ("image",):
        texts = [_texts(rng, size) for _ in range(batches)]
        rows = [[images[(b + j) % len(images)] for j in range(size)] if side == "image" else [] for b in range(batches)]
        server.post(session, rows[0], texts[0])  # the batch's shapes once before timing
        started = time.perf_counter()
        for b in range(batches):
            answer = server.post(session, rows[b], texts[b])
            if answer.status_code != 200:
                raise RuntimeError(f"{kind} answered {answer.status_code}: {answer.text[:300]}")
        out[f"{side}s_per_s"] = round(size * batches / (time.perf_counter() - started), 1)
    out["rows_per_request"] = size
    return out


def _register(workdir: str, checkpoint: str, env: dict) -> dict:
    """`clip-pyfunc register` of the checkpoint with the default settings, by the package `env` runs."""
    answer = subprocess.run(["clip-pyfunc", "register", "--model", checkpoint], cwd=workdir, env=env,
                            capture_output=True, text=True, check=False)
    if answer.returncode != 0:
        raise RuntimeError(f"registration failed: {answer.stderr[-1500:]}")
    return json.loads(answer.stdout)


def _artifact_mib(workdir: str) -> float:
    """MiB of every registered model's files under a side's store."""
    total = 0
    for folder, _, files in os.walk(os.path.join(workdir, "mlruns")):
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return round(total / MIB)


def run(requests_n: int = 1000, starts: int = 3, baseline_pythonpath: str | None = None,
        servers: tuple[str, ...] = SERVERS, output: str | None = None, shapes: bool = True,
        log=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """Measure every server of `servers` (see the module docstring); with a baseline, both sides alternating.
    With `output`, the JSON so far is written there after each server. With `shapes`, the registered text
    tower's OpenVINO RSS growth over `requests_n` forwards of random shapes is measured under each padding
    policy (text_shape_growth), in processes of their own.

    Returns:
        {"machine", "sides": {side: {"registration": ..., "artifacts_mib": ..., server: {...}}}, "ratios"}.
    """
    root = tempfile.mkdtemp(prefix="clip-footprint-")
    try:
        return _run(root, requests_n, starts, baseline_pythonpath, servers, output, shapes, log)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(root: str, requests_n: int, starts: int, baseline_pythonpath: str | None, servers, output, shapes,
         log) -> dict:
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint

    checkpoint = save_random_checkpoint(os.path.join(root, "vit-b-32"), arch="vit-b-32")
    sides = {"now": None}
    if baseline_pythonpath:
        sides["baseline"] = os.path.abspath(baseline_pythonpath)
    from clip_pyfunc.benchmarks.bench import matmul_gflops

    envs, out = {}, {"machine": machine_info(), "requests": requests_n, "starts": starts, "sides": {},
                     "matmul_ceiling_before": matmul_gflops()}
    for side, pythonpath in sides.items():
        workdir = os.path.join(root, side)
        os.makedirs(workdir)
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CLIP_PYFUNC_CONF")}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
        env["PYTHONUNBUFFERED"] = "1"
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        log(f"registering ({side})")
        summary = _register(workdir, checkpoint, env)
        envs[side] = (env, workdir)
        out["sides"][side] = {"registration": {k: summary.get(k) for k in ("engines", "engine_files")},
                              "artifacts_mib": _artifact_mib(workdir)}
    order = list(sides)
    for position, kind in enumerate(servers):
        for side, row in measure_servers(kind, envs, requests_n, starts, order if position % 2 == 0 else order[::-1],
                                         log).items():
            out["sides"][side][kind] = row
        if output:
            with open(output, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=2)
    if shapes:
        _, workdir = envs["now"]
        import glob

        folders = glob.glob(os.path.join(workdir, "mlruns", "**", "artifacts", "text_tower"), recursive=True)
        if len(folders) != 1:
            raise RuntimeError(f"expected one registered text tower under {workdir}, found {len(folders)}")
        folder = folders[0]
        precision = _default_precision_here(folder)
        log(f"text shapes ({precision})")
        out["text_shapes"] = {"precision": precision, "forwards": requests_n,
                              "policies": text_shape_growth(folder, requests_n, precision)}
    if baseline_pythonpath:
        out["ratios"] = _ratios(out["sides"]["now"], out["sides"]["baseline"], servers)
    out["matmul_ceiling_after"] = matmul_gflops()
    out["note"] = "random ViT-B/32 weights: the vectors are meaningless; only the work is real"
    return out


def _default_precision_here(text_tower: str) -> str:
    """The precision OpenVINO's default takes on this machine for a registered text tower (as registry.weights)."""
    from clip_pyfunc.artifacts.towers import CheckpointInfo
    from clip_pyfunc.registry.weights import default_precision

    info = CheckpointInfo.read(text_tower)
    return default_precision(info.fidelity.get("openvino", {}), info.speeds_here("text"))


def _ratios(now: dict, before: dict, servers) -> dict:
    """now / baseline for each server's cold start, RSS after the requests, peak, and throughput."""
    ratios = {"artifacts": round(now["artifacts_mib"] / before["artifacts_mib"], 3)}
    for kind in servers:
        row = {}
        for key in now[kind]:
            if key.endswith(("_s", "_mib", "_per_s")) and isinstance(now[kind][key], (int, float)) and before[kind].get(key):
                row[key] = round(now[kind][key] / before[kind][key], 3)
        ratios[kind] = row
    return ratios


def table(result: dict) -> str:
    """The figures as a plain-text table (stderr)."""
    lines = []
    for side, values in result["sides"].items():
        lines.append(f"{side}: artifacts {values['artifacts_mib']} MiB")
        for kind in SERVERS:
            if kind in values:
                row = values[kind]
                lines.append(f"  {kind:13s} " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "cold_starts_s"))
    return "\n".join(lines)


SHAPE_POLICIES = ("unpadded", "length_step", "length_step_and_rows")


def text_shapes_child(artifact_dir: str, policy: str, forwards: int, precision: str) -> dict:
    """In this process: `forwards` OpenVINO text forwards of random shapes (1 to 32 rows of 3 to 77 tokens) under
    one padding policy; RSS after 100 and after all of them, and the distinct shapes the engine met."""
    import numpy as np
    import psutil

    from clip_pyfunc.runtime.engines.openvino_engine import OpenVINOEngine, bucket_rows
    from clip_pyfunc.settings import RuntimeConfig

    runtime = OpenVINOEngine.make_runtime(RuntimeConfig(engine="openvino", precision=precision), precision, False)
    engine = OpenVINOEngine.load(artifact_dir, "text", runtime)
    rng, shapes, out = random.Random(0), set(), {}
    started = time.perf_counter()
    for index in range(forwards):
        rows, length = rng.randint(1, 32), rng.randint(3, 77)
        if policy != "unpadded":
            length = min(77, -(-length // 8) * 8)
        if policy == "length_step_and_rows":
            rows = bucket_rows(rows)
        shapes.add((rows, length))
        ids = np.ones((rows, length), dtype=np.int64)
        engine._infer({"input_ids": ids, "attention_mask": ids})  # the shape as given: no padding of its own
        if index + 1 in (100, forwards):
            out[f"rss_after_{index + 1}_mib"] = round(psutil.Process().memory_info().rss / MIB)
    out.update({"policy": policy, "distinct_shapes": len(shapes), "seconds": round(time.perf_counter() - started, 1),
                "growth": round(out[f"rss_after_{forwards}_mib"] / out["rss_after_100_mib"], 3)})
    return out


def text_shape_growth(artifact_dir: str, forwards: int = 1000, precision: str = "fp32") -> list[dict]:
    """text_shapes_child for each policy, each in a fresh process (its RSS is its own)."""
    results = []
    for policy in SHAPE_POLICIES:
        code = ("import json, sys; from clip_pyfunc.benchmarks.footprint import text_shapes_child; "
                "print(json.dumps(text_shapes_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])))")
        answer = subprocess.run([sys.executable, "-c", code, artifact_dir, policy, str(forwards), precision],
                                capture_output=True, text=True, check=False)
        if answer.returncode != 0:
            raise RuntimeError(f"text shapes ({policy}) failed: {answer.stderr[-1500:]}")
        results.append(json.loads(answer.stdout.strip().splitlines()[-1]))
    return results
