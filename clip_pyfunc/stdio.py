"""Keep stdout for a command's JSON: everything else written there goes to stderr."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout while the command runs to stderr instead.

    MLflow writes "View run ... at: http://..." to stdout with an HTTP tracking server, and
    subprocesses (the Spark JVM, environment builders) inherit file descriptor 1, so both
    `sys.stdout` and the descriptor itself are pointed at stderr; only the JSON result is
    written to the real stdout afterwards.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
