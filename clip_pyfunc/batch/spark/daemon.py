"""Spark's Python daemon for local jobs, with the model's libraries imported before it forks.

Spark forks every Python worker from one daemon process (`spark.python.daemon.module`). The
stock daemon imports nothing, so each worker imports MLflow, the engine and the model's code
itself before it can load the model: seconds of one core, in every worker at once. This daemon
imports them once, then runs pyspark's own daemon loop, and the workers fork with them loaded.

What it imports: BASE always, then what the job's model needs beyond it. A driver that knows
the model (embed_table) names it in a plan file (session.PLAN_ENV, write_plan): TORCH_STACK where
a tower will run on torch, nothing more where every tower runs on a torch-free engine (OpenVINO);
those 4-5 CPU-seconds of torch and transformers imports would delay every worker's start for a
job that never calls them. The daemon imports BASE, then waits for the plan while the driver
looks the model up. Without a plan (a session started by hand) it imports TORCH_STACK too, as any
model may need it.

It only imports. A torch op run before the fork leaves OpenMP and MKL thread pools behind
that hang the forked worker at its first parallel op, so no op runs and no weights load here.
A module that fails to import is left for the worker to import (and report) as before.

Spark reads the daemon's port from its stdout: whatever an import prints goes to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

# What a worker needs before its first batch, whatever the model: Arrow and pandas for
# mapInPandas, MLflow's pyfunc loader, the stages' libraries, and this package's job and model
# modules (which the task's pickled function and the model's entry file import). None of them
# imports torch. OpenVINO is left to the workers (0.1-0.3 s each): `import openvino` starts a
# thread (its telemetry sender), and a process should not fork while another thread runs.
BASE = (
    "pyarrow", "pandas", "mlflow.pyfunc", "tokenizers", "PIL.Image",
    "clip_pyfunc.batch.spark.embed", "clip_pyfunc.models.image", "clip_pyfunc.models.text",
    "clip_pyfunc.models.classifier", "clip_pyfunc.models.combined",
)
# What a tower on the torch engine adds: torch, transformers' model and image-processing stack.
TORCH_STACK = ("torch", "transformers", "transformers.modeling_utils", "transformers.image_processing_utils")
PRELOAD = BASE + TORCH_STACK  # without a plan

PLAN_WAIT_S = 900.0  # the longest wait for the plan (the driver copies the model meanwhile)


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import `modules` with stdout pointed at stderr; returns those that failed, with why."""
    from clip_pyfunc.stdio import stdout_to_stderr

    failed = []
    with stdout_to_stderr():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - the worker imports it again and reports it
                failed.append(f"{name}: {type(e).__name__}: {e}")
    for line in failed:
        print(f"clip-pyfunc spark daemon: could not preload {line}", file=sys.stderr, flush=True)
    return failed


def write_plan(path: str, modules: tuple[str, ...]) -> None:
    """Write the plan the daemon waits for: the modules its workers need beyond BASE.

    Written to a temporary file and renamed, so the daemon never reads half of it.

    Args:
        path: Where session.spark_session's `worker_plan` said it would be.
        modules: Module names (TORCH_STACK, or nothing for a model whose towers need no torch).

    Raises:
        OSError: It could not be written.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"modules": list(modules)}, f)
    os.replace(temporary, path)


def read_plan(path: str, wait_s: float = PLAN_WAIT_S, poll_s: float = 0.02) -> tuple[str, ...]:
    """The modules a plan file names, once the driver has written it.

    Args:
        path: The plan file (write_plan).
        wait_s: The longest wait for it, in seconds.
        poll_s: Seconds between looks.

    Returns:
        Its modules; TORCH_STACK where it never comes within `wait_s` or cannot be read (every
        model's needs, as without a plan).

    Raises:
        SystemExit: The process that started this one (Spark's JVM) is gone: nobody will fork a worker.
    """
    deadline = time.monotonic() + wait_s
    parent = os.getppid()
    while not os.path.exists(path):
        if os.getppid() != parent:
            raise SystemExit(0)
        if time.monotonic() > deadline:
            print(f"clip-pyfunc spark daemon: no worker plan at {path} after {wait_s:.0f}s; importing torch too",
                  file=sys.stderr, flush=True)
            return TORCH_STACK
        time.sleep(poll_s)
    try:
        with open(path, encoding="utf-8") as f:
            return tuple(str(name) for name in json.load(f)["modules"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"clip-pyfunc spark daemon: unreadable worker plan {path} ({e}); importing torch too",
              file=sys.stderr, flush=True)
        return TORCH_STACK


if __name__ == "__main__":  # started by Spark as `python -m clip_pyfunc.batch.spark.daemon`
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # a CUDA check before fork must not init CUDA
    from clip_pyfunc.batch.spark.session import PLAN_ENV

    preload(BASE)
    plan = os.environ.get(PLAN_ENV)
    preload(read_plan(plan) if plan else TORCH_STACK)
    from pyspark import daemon

    daemon.manager()
