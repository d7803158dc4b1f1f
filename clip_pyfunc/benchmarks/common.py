"""Shared benchmark helpers: machine description, timing, percentiles, synthetic photos."""

from __future__ import annotations

import base64
import os
import platform
import tempfile
import time
from typing import Callable

from clip_pyfunc.dev.samples import photo_jpeg  # noqa: F401 - the benchmarks' photos


def machine_info() -> dict:
    """CPU model, core count, SIMD flags that matter for torch, torch's CPU capability, GPU."""
    import torch

    from clip_pyfunc.runtime import cpu_has_native_bf16, cpu_info

    model, flags = cpu_info()
    if model == "unknown":
        model = platform.processor() or "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": [f for f in wanted if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def temporary_registry(prefix: str) -> str:
    """A new temporary folder holding an MLflow sqlite store, made this process's (and its children's)
    tracking and registry URI, with the experiment "clip-pyfunc"; returns the folder."""
    import mlflow

    tmp = tempfile.mkdtemp(prefix=prefix)
    uri = f"sqlite:///{tmp}/bench.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("clip-pyfunc", artifact_location=os.path.join(tmp, "artifacts"))
    return tmp


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 2) -> list[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, seconds: float = 300) -> None:
    """Wait until GET `url` answers 2xx; fail if `proc` exits first or the time runs out."""
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited before {url} answered")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")
