"""Model environment cost: the image model's torch environment against its torch-free (OpenVINO) one.

One random-weight checkpoint is registered twice in a temporary registry: once with the default
settings (`engine: auto`, requirements with torch) and once with `engine: openvino` (requirements
without torch or transformers). For each IMAGE model, in one run:

1. its environment is built from the model alone (`mlflow models predict --env-manager uv` on one
   2 MP photo, with an empty uv cache): wall time of that first build+predict;
2. `mlflow models serve --env-manager uv` builds its own copy in a fresh MLFLOW_ENV_ROOT (mlflow 3.x's
   `models predict` ignores MLFLOW_ENV_ROOT: it builds in a temporary folder it deletes on exit), which
   gives the installed size; then the cold start on that built environment: seconds from process
   start to the first successful POST /invocations (median of several starts, the models interleaved);
3. resident memory of the whole server process tree after sequential single-image requests.

The ratios torch-free / torch are taken within the run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from clip_pyfunc.benchmarks.common import b64, free_port, machine_info, photo_jpeg, temporary_registry

MIB = 2**20
LAYOUTS = (("torch", "auto"), ("torch_free", "openvino"))
# The torch layout ships every engine's files, so its requirements hold torch as a default registration's did
# before issue 39 (one engine's files by default, torch-free on CPU); the torch-free one ships OpenVINO's alone.
ENGINE_FILES = {"torch": "all", "torch_free": "chosen"}


def _dir_bytes(path: str) -> int:
    """Apparent size of everything under `path` (`du -sb`), in bytes."""
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _env_vars(env_root: str, uv_cache: str | None) -> dict:
    env = dict(os.environ)
    env["MLFLOW_ENV_ROOT"] = env_root
    if os.path.isdir("/opt/wheels"):  # uv ignores pip's find-links; without it torch resolves to the CUDA build
        env["UV_FIND_LINKS"] = "/opt/wheels"
    if uv_cache:
        env["UV_CACHE_DIR"] = uv_cache
    env.pop("OMP_NUM_THREADS", None)
    return env


def _venvs(env_root: str) -> list[str]:
    """The virtual environments under an MLFLOW_ENV_ROOT (`models serve` puts them at its top level)."""
    return sorted(os.path.dirname(os.path.dirname(p)) for p in glob.glob(os.path.join(env_root, "**", "bin", "activate"),
                                                                         recursive=True))


def _site_packages(env_root: str) -> list[str]:
    """site-packages folders under `env_root`, each once (lib64 is a link to lib)."""
    found = glob.glob(os.path.join(env_root, "**", "site-packages"), recursive=True)
    return sorted({os.path.realpath(p) for p in found})


def _env_contents(env_root: str) -> dict:
    """Which of torch / transformers / openvino are installed in the built environment(s) under `env_root`."""
    sites = _site_packages(env_root)
    has = lambda name: any(os.path.isdir(os.path.join(s, name)) for s in sites)  # noqa: E731
    dists = sorted({os.path.basename(d).split("-")[0].lower()
                    for s in sites for d in glob.glob(os.path.join(s, "*.dist-info"))})
    venvs = _venvs(env_root)
    return {"site_packages": sites, "venvs": venvs, "has_torch": has("torch"), "has_transformers": has("transformers"),
            "has_openvino": has("openvino"), "distributions": len(dists),
            "largest_packages_mib": _largest(sites)}


def _largest(sites: list[str], n: int = 6) -> dict:
    sizes = {}
    for s in sites:
        for entry in os.listdir(s):
            path = os.path.join(s, entry)
            if os.path.isdir(path) and not entry.endswith((".dist-info", "__pycache__")):
                sizes[entry] = sizes.get(entry, 0) + _dir_bytes(path)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:n]
    return {k: round(v / MIB, 1) for k, v in top}


def _build(uri: str, work: str, env: dict, image: str) -> dict:
    """Build the model's environment with uv by predicting one image (`mlflow models predict`); time it."""
    in_path, out_path = os.path.join(work, "in.json"), os.path.join(work, "out.json")
    with open(in_path, "w") as f:
        json.dump({"dataframe_records": [{"input": image}]}, f)
    tmpdir = os.path.join(work, "predict-tmp")  # where `models predict` puts (and then deletes) its environment
    os.makedirs(tmpdir)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mlflow", "models", "predict", "-m", uri, "--env-manager", "uv",
                           "-i", in_path, "--content-type", "json", "-o", out_path],
                          capture_output=True, text=True, timeout=3600, env={**env, "TMPDIR": tmpdir})
    seconds = time.perf_counter() - start
    with open(os.path.join(work, "build.log"), "w") as f:
        f.write(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"mlflow models predict exited {proc.returncode}", "stderr_tail": proc.stderr[-6000:],
                "build_and_predict_s": round(seconds, 2)}
    with open(out_path) as f:
        predictions = json.load(f)["predictions"]
    return {"build_and_predict_s": round(seconds, 2),
            "prediction_shape": [len(predictions), len(predictions[0]) if predictions else 0]}


def _env_size(env_root: str) -> dict:
    venvs = _venvs(env_root)
    return {"env_root_mib": round(_dir_bytes(env_root) / MIB, 1),
            "env_mib": round(sum(_dir_bytes(v) for v in venvs) / MIB, 1) if venvs else None,
            **_env_contents(env_root)}


def _tree_rss(pid: int) -> dict:
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    out = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            out.append({"pid": p.pid, "rss_mib": round(p.memory_info().rss / MIB, 1), "cmd": cmd[:160]})
        except psutil.Error:
            pass
    return {"total_mib": round(sum(p["rss_mib"] for p in out), 1),
            "largest_process_mib": max((p["rss_mib"] for p in out), default=0.0), "processes": out}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def _serve(uri: str, env: dict, log_path: str, body: str, requests_n: int) -> dict:
    """Start `mlflow models serve` on the built environment; seconds to the first answered POST /invocations,
    then (if requests_n) the process tree's RSS after requests_n sequential requests."""
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}/invocations"
    headers = {"Content-Type": "application/json"}
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "uv",
                                 "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        session = requests.Session()
        deadline = start + 900
        while True:
            if proc.poll() is not None:
                with open(log_path) as f:
                    return {"error": f"server exited {proc.returncode} before answering", "log_tail": f.read()[-6000:]}
            if time.perf_counter() > deadline:
                return {"error": "no answer within 900 s"}
            try:
                r = session.post(url, data=body, headers=headers, timeout=(1, 300))
                if r.ok:
                    cold = time.perf_counter() - start
                    break
            except requests.RequestException:
                pass
            time.sleep(0.05)
        out = {"cold_start_s": round(cold, 3)}
        if requests_n:
            latencies = []
            for _ in range(requests_n):
                t = time.perf_counter()
                session.post(url, data=body, headers=headers, timeout=300).raise_for_status()
                latencies.append(time.perf_counter() - t)
            out["requests"] = requests_n
            out["request_p50_ms"] = round(1000 * statistics.median(latencies), 1)
            out["rss"] = _tree_rss(proc.pid)
        return out
    finally:
        _kill(proc)


def run(random_init: str = "vit-b-32", requests: int = 100, cold_starts: int = 3, fresh_uv_cache: bool = True,
        keep: bool = False) -> dict:
    """Measure the image model's torch environment against its torch-free one, in one run.

    Args:
        random_init: Architecture of the random-weight checkpoint (clip_pyfunc.dev.random_checkpoint).
        requests: Sequential single-image (640x480 JPEG) requests before the resident memory is read.
        cold_starts: Server starts per model; the cold start reported is their median.
        fresh_uv_cache: Give each build its own empty UV_CACHE_DIR, so neither build reuses the other's
            (or an earlier run's) downloads and unpacked wheels.
        keep: Keep the temporary registry and environments (their folder is in the result).

    Returns:
        A JSON-ready dict. Per model ("torch", "torch_free"): `requirements` (requirements.txt lines),
        `build.build_and_predict_s` (seconds, first uv build plus one 2 MP prediction, `models predict`),
        `build.serve_build_and_first_answer_s` (seconds, `models serve` building its environment with the
        uv cache already filled, up to its first answer), `build.env_mib` (MiB, installed size of the virtual environment, `du -sb`),
        `build.env_root_mib` (MiB, the whole MLFLOW_ENV_ROOT), `cold_start_s` (seconds, median, process
        start to first answered POST /invocations) and `cold_starts_s` (each start, seconds),
        `rss_mib` (MiB, summed RSS of the server process tree after `requests` requests),
        `rss_largest_process_mib` (MiB) and `request_p50_ms` (milliseconds). `ratios`: torch-free / torch
        of env size, cold start, RSS and first build time (dimensionless). `torch_free_lacks_torch`:
        no torch (nor transformers) package in the torch-free environment. `machine`: machine_info().
    """
    import mlflow

    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.settings import load_settings

    tmp = temporary_registry("clip-pyfunc-model-env-")
    ckpt = save_random_checkpoint(os.path.join(tmp, "checkpoint"), random_init)
    models = {}
    for label, engine in LAYOUTS:
        summary = register_models(load_settings(None, {
            "model": {"source": ckpt}, "runtime": {"engine": engine},
            "registry": {"text_name": f"env_{label}_text", "image_name": f"env_{label}_image",
                         "engine_files": ENGINE_FILES[label]}}))
        uri = summary["models"]["image"]["uri"]
        with open(os.path.join(mlflow.artifacts.download_artifacts(uri), "requirements.txt")) as f:
            reqs = [line.strip() for line in f if line.strip()]
        models[label] = {"engine": engine, "uri": uri, "requirements": reqs}

    build_image = b64(photo_jpeg(1632, 1224, seed=2))  # 2.0 MP
    body = json.dumps({"dataframe_records": [{"input": b64(photo_jpeg(640, 480, seed=1))}]})
    envs = {}
    for label, _ in LAYOUTS:
        work = os.path.join(tmp, label)
        os.makedirs(work)
        envs[label] = _env_vars(os.path.join(work, "envs"),
                                os.path.join(work, "uv-cache") if fresh_uv_cache else None)
        m = models[label]
        m["build"] = _build(m["uri"], work, envs[label], build_image)
        if "error" in m["build"]:
            continue
        # The server's own environment (MLFLOW_ENV_ROOT), built now with the uv cache the predict filled.
        got = _serve(m["uri"], envs[label], os.path.join(work, "serve-build.log"), body, 0)
        if "error" in got:
            m["serve_error"] = got
            continue
        m["build"]["serve_build_and_first_answer_s"] = got["cold_start_s"]
        m["build"].update(_env_size(envs[label]["MLFLOW_ENV_ROOT"]))
        if fresh_uv_cache and not keep:
            shutil.rmtree(os.path.join(work, "uv-cache"), ignore_errors=True)

    # Starts interleaved (torch, torch-free, torch, ...) so drift on the machine hits both alike.
    for label, _ in LAYOUTS:
        models[label]["cold_starts_s"] = []
    for i in range(cold_starts):
        for label, _ in LAYOUTS:
            m = models[label]
            if "error" in m["build"] or "serve_error" in m:
                continue
            last = i == cold_starts - 1
            got = _serve(m["uri"], envs[label], os.path.join(tmp, label, f"serve{i}.log"), body,
                         requests if last else 0)
            if "error" in got:
                m["serve_error"] = got
                continue
            m["cold_starts_s"].append(got["cold_start_s"])
            if last:
                m["rss_mib"] = got["rss"]["total_mib"]
                m["rss_largest_process_mib"] = got["rss"]["largest_process_mib"]
                m["rss_processes"] = got["rss"]["processes"]
                m["request_p50_ms"] = got["request_p50_ms"]
                m["requests"] = got["requests"]
    for m in models.values():
        if m["cold_starts_s"]:
            m["cold_start_s"] = round(statistics.median(m["cold_starts_s"]), 3)

    def ratio(*path):
        vals = []
        for label in ("torch_free", "torch"):
            v = models[label]
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            vals.append(v)
        return round(vals[0] / vals[1], 3) if all(isinstance(v, (int, float)) and v for v in vals) else None

    free_build = models["torch_free"]["build"]
    result = {
        "benchmark": "model-env",
        "checkpoint": f"random {random_init}",
        "model": "image",
        "build_input": "one 1632x1224 (2.0 MP) photo-like JPEG, base64",
        "request": "one 640x480 photo-like JPEG, base64, dataframe_records",
        "fresh_uv_cache_per_build": fresh_uv_cache,
        "uv_find_links": envs["torch"].get("UV_FIND_LINKS"),
        "machine": machine_info(),
        "models": models,
        "torch_free_lacks_torch": (None if "has_torch" not in free_build
                                   else not free_build["has_torch"] and not free_build["has_transformers"]),
        "ratios": {
            "env_size_torch_free_over_torch": ratio("build", "env_mib"),
            "cold_start_torch_free_over_torch": ratio("cold_start_s"),
            "rss_torch_free_over_torch": ratio("rss_mib"),
            "first_build_torch_free_over_torch": ratio("build", "build_and_predict_s"),
        },
    }
    if keep:
        result["folder"] = tmp
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def table(result: dict) -> str:
    """A plain-text table of a run() result: both environments side by side, and the ratios."""
    m = result["models"]
    r = result["ratios"]

    def get(label, *path):
        v = m[label]
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        return "-" if v is None else str(v)

    rows = [("metric", "torch", "torch-free", "torch-free/torch"),
            ("first uv build + 2 MP predict (s)", get("torch", "build", "build_and_predict_s"),
             get("torch_free", "build", "build_and_predict_s"), str(r["first_build_torch_free_over_torch"])),
            ("serve: build env (uv cache filled) + first answer (s)",
             get("torch", "build", "serve_build_and_first_answer_s"),
             get("torch_free", "build", "serve_build_and_first_answer_s"), ""),
            ("environment size (MiB)", get("torch", "build", "env_mib"), get("torch_free", "build", "env_mib"),
             str(r["env_size_torch_free_over_torch"])),
            ("cold start, median (s)", get("torch", "cold_start_s"), get("torch_free", "cold_start_s"),
             str(r["cold_start_torch_free_over_torch"])),
            ("cold starts (s)", get("torch", "cold_starts_s"), get("torch_free", "cold_starts_s"), ""),
            (f"server tree RSS after {get('torch', 'requests')} requests (MiB)", get("torch", "rss_mib"),
             get("torch_free", "rss_mib"), str(r["rss_torch_free_over_torch"])),
            ("largest server process RSS (MiB)", get("torch", "rss_largest_process_mib"),
             get("torch_free", "rss_largest_process_mib"), ""),
            ("request p50 (ms)", get("torch", "request_p50_ms"), get("torch_free", "request_p50_ms"), ""),
            ("torch installed", get("torch", "build", "has_torch"), get("torch_free", "build", "has_torch"), "")]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
