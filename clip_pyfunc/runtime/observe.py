"""What a loaded model reports about its work, for a front end that exports metrics.

The models and the engine call an `Observer`; the base class does nothing, so a model that
nobody watches (Spark, a notebook, plain `mlflow models serve`) pays one method call per
batch. `clip-pyfunc serve` and the app set a Prometheus one (serving.metrics). The models
room does not import prometheus_client: a logged model's requirements stay as they are.

Stages are "decode" (bytes or base64 to an image; text cells to strings), "preprocess"
(resize and normalise; tokenize) and "forward". Times are seconds (time.perf_counter).
"""

from __future__ import annotations


class Observer:
    """No-op hooks; a subclass records them. Every method may be called from several threads at once."""

    def stage(self, stage: str, seconds: float, rows: int) -> None:
        """One stage of one micro-batch: its name ("decode", "preprocess"), seconds and rows."""

    def forward(self, rows: int, requests: int, seconds: float) -> None:
        """One forward pass: rows in it, how many calls shared it, and its seconds."""

    def queue_wait(self, seconds: float) -> None:
        """Seconds one call's arrays waited for a forward (0 when it found the engine idle)."""

    def rows(self, embedded: int, refused: int, bad_kinds: list[str]) -> None:
        """One call's rows: embedded, good but refused with a request that had bad rows, and the kind of
        each bad row (errors.InvalidInput.kind)."""

    def failure(self, error: BaseException) -> None:
        """A call failed for a reason that is not the caller's (an engine error, out of memory)."""

    def success(self) -> None:
        """A call finished without such a failure (bad rows are the caller's, not the model's)."""
