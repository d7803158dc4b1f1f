"""`clip-pyfunc serve`: a thin edge over `mlflow models serve` (same URIs, same server).

The package is already installed where this runs, so the environment manager defaults to
`local`; workers and the request timeout pass straight through.
"""

from __future__ import annotations

import os
import sys

from clip_pyfunc.config import ServeConfig


def serve_command(model_uri: str, config: ServeConfig) -> list[str]:
    """The `mlflow models serve` command line for a model URI and serve settings."""
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "--model-uri", model_uri,
        "--host", config.host, "--port", str(config.port), "--workers", str(config.workers),
        "--timeout", str(config.timeout), "--env-manager", config.env_manager,
    ]


def serve(model_uri: str, config: ServeConfig) -> None:
    """Replace this process with the MLflow scoring server (signals reach it directly)."""
    cmd = serve_command(model_uri, config)
    os.execv(cmd[0], cmd)
