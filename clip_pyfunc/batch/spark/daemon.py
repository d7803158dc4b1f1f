"""Spark's Python daemon for local jobs, with the model's libraries imported before it forks.

Spark forks every Python worker from one daemon process (`spark.python.daemon.module`). The
stock daemon imports nothing, so each worker imports torch, transformers and MLflow itself
before it can load the model: about 4 s of one core, in every worker at once. This daemon
imports them once, then runs pyspark's own daemon loop, and the workers fork with them loaded.

It only imports. A torch op run before the fork leaves OpenMP and MKL thread pools behind
that hang the forked worker at its first parallel op, so no op runs and no weights load here.
A module that fails to import is left for the worker to import (and report) as before.

Spark reads the daemon's port from its stdout: whatever an import prints goes to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys

# What a worker needs before its first batch: Arrow and pandas for mapInPandas, torch,
# transformers' model and image-processing stack, MLflow's pyfunc loader, and this package's
# job and model modules (which the task's pickled function and the model's entry file import).
PRELOAD = (
    "pyarrow", "pandas", "torch", "transformers", "transformers.modeling_utils",
    "transformers.image_processing_utils", "mlflow.pyfunc",
    "clip_pyfunc.batch.spark.embed", "clip_pyfunc.models.image", "clip_pyfunc.models.text",
    "clip_pyfunc.models.classifier", "clip_pyfunc.models.combined",
)


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


if __name__ == "__main__":  # started by Spark as `python -m clip_pyfunc.batch.spark.daemon`
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # a CUDA check before fork must not init CUDA
    preload()
    from pyspark import daemon

    daemon.manager()
