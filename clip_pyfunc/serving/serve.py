"""`clip-pyfunc serve`: a thin edge over `mlflow models serve` (same URIs, same server).

The package is already installed where this runs, so the environment manager defaults to
`local`; workers and the request timeout pass straight through.
"""

from __future__ import annotations

import os
import sys

from clip_pyfunc.settings import ServeConfig


def serve_command(model_uri: str, config: ServeConfig) -> list[str]:
    """The `mlflow models serve` command line for a model URI and serve settings."""
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "--model-uri", model_uri,
        "--host", config.host, "--port", str(config.port), "--workers", str(config.workers),
        "--timeout", str(config.timeout), "--env-manager", config.env_manager,
    ]


def serve_env(config: ServeConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: torch threads per worker so that workers x threads <= cores.

    A model whose model_config sets `num_threads` keeps its own; OMP_NUM_THREADS already set by
    the operator is kept too.
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.workers)))
    return env


def serve(model_uri: str, config: ServeConfig) -> None:
    """Replace this process with the MLflow scoring server (signals reach it directly)."""
    cmd = serve_command(model_uri, config)
    os.execve(cmd[0], cmd, serve_env(config))
