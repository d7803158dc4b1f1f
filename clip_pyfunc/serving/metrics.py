"""Prometheus metrics and honest health for `clip-pyfunc serve` and the app.

`ModelMetrics` is a runtime.observe.Observer: a loaded model reports into it (stages, forwards,
queue waits, rows by outcome, bad rows by kind, failures), and it records them with
prometheus_client, labelled with the model (`image`, `text`, ...), its engine and precision.
`Health` counts the model's failures that are not the caller's (an engine error, out of
memory): after `unhealthy_after` in a row, `/health` and `/ping` answer 503 until a
prediction succeeds again. The HTTP edge (serving.edge) counts requests and their latency.

A forward that runs past its limit (runtime.batching.ServingLimits) makes the server unhealthy
too, for as long as it runs.

Metric names follow Prometheus' conventions (a `clip_pyfunc_` prefix, `_seconds` and
`_total` suffixes). With several uvicorn workers, prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by `clip-pyfunc serve`) sums them in every worker's answer.
prometheus_client keeps a dead worker's files (client_python#495): every scrape first marks the
workers that are gone dead (their `healthy` gauge, a live-mode gauge, is then left out; their
counters keep counting, as a counter must), and `clear_multiprocess_dir` empties the folder before
a server run, so that a run never reports another's requests.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading

from clip_pyfunc.runtime.observe import Observer

# Seconds: from a text row's tokenization (~50 us) to a large image batch's forward (seconds).
_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0)
_ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_MODEL_LABELS = ("model", "engine", "precision")


class Metrics:
    """The metric families of one process (one per registry: a server makes one at start).

    Args:
        registry: A prometheus_client CollectorRegistry; None makes a new one (tests, several apps
            in one process).
    """

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("clip_pyfunc_requests", "HTTP requests by path and status", ("path", "status"),
                                registry=r)
        self.request_seconds = Histogram("clip_pyfunc_request_seconds", "HTTP request latency, seconds",
                                         ("path",), buckets=_TIME_BUCKETS, registry=r)
        self.rows = Counter("clip_pyfunc_rows", "Rows by outcome: embedded, refused (good rows of a request "
                            "refused for its bad rows) or bad", _MODEL_LABELS + ("outcome",), registry=r)
        self.bad_rows = Counter("clip_pyfunc_bad_rows", "Bad rows by kind (base64, not_an_image, over_limit, ...)",
                                _MODEL_LABELS + ("kind",), registry=r)
        self.stage_seconds = Histogram("clip_pyfunc_stage_seconds", "Seconds per stage: decode and preprocess "
                                       "per row (images) or per call (text); forward per forward pass",
                                       _MODEL_LABELS + ("stage",), buckets=_TIME_BUCKETS, registry=r)
        self.forward_rows = Histogram("clip_pyfunc_forward_rows", "Rows per forward pass",
                                      _MODEL_LABELS, buckets=_ROW_BUCKETS, registry=r)
        self.forward_requests = Histogram("clip_pyfunc_forward_requests", "Calls (requests) sharing a forward pass",
                                          _MODEL_LABELS, buckets=_ROW_BUCKETS, registry=r)
        self.queue_wait = Histogram("clip_pyfunc_queue_wait_seconds", "Seconds a call waited for a forward pass",
                                    _MODEL_LABELS, buckets=_TIME_BUCKETS, registry=r)
        self.failures = Counter("clip_pyfunc_model_failures", "Predictions that failed for reasons that are not "
                                "the caller's (engine errors, out of memory)", _MODEL_LABELS, registry=r)
        # livemin: with several workers, the least healthy live worker's (a dead worker's is left out)
        self.healthy = Gauge("clip_pyfunc_healthy", "1 while /health answers 200, 0 while it answers 503",
                             registry=r, multiprocess_mode="livemin")

    def render(self) -> tuple[bytes, str]:
        """(the text exposition of every metric, its content type); every worker's when multiprocess."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_DB_FILE = re.compile(r"^(?P<kind>[a-z_]+?)_(?P<pid>\d+)\.db$")


def forget_dead_workers(folder: str) -> list[int]:
    """Mark the workers whose processes are gone dead in a multiprocess folder; returns their pids.

    prometheus_client's `mark_process_dead` removes a dead process's live-mode gauge files (the
    `healthy` gauge); its counters and histograms stay, so totals never go down.
    """
    from prometheus_client import multiprocess

    gone = set()
    for name in os.listdir(folder):
        match = _DB_FILE.match(name)
        if match and match["kind"].startswith("gauge_live") and not _alive(int(match["pid"])):
            gone.add(int(match["pid"]))
    for pid in gone:
        with contextlib.suppress(FileNotFoundError):  # another worker's scrape removed them first
            multiprocess.mark_process_dead(pid, folder)
    return sorted(gone)


def clear_multiprocess_dir() -> None:
    """Remove every metrics file of an earlier run from the PROMETHEUS_MULTIPROC_DIR the operator set, if any
    (prometheus_client's own rule: the folder is wiped between runs). Only its `*.db` files: an operator's
    folder may hold others."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    for name in os.listdir(folder):
        if _DB_FILE.match(name):
            os.remove(os.path.join(folder, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid: alive
        return True
    return True


class Health(Observer):
    """Healthy until `unhealthy_after` predictions in a row fail for reasons that are not the caller's, or
    while a watched engine's forward runs past its limit (runtime.batching.SharedForwards.stalled).

    Args:
        unhealthy_after: Failures in a row that make the server unhealthy (serve.unhealthy_after).
    """

    def __init__(self, unhealthy_after: int, metrics: Metrics | None = None):
        self.unhealthy_after = unhealthy_after
        self.metrics = metrics
        self._lock = threading.Lock()
        self.failures_in_a_row = 0
        self.last_error: str | None = None
        self.engines: list = []  # SharedForwards whose stalls count (see `watch`)
        self._healthy = True
        if metrics is not None:
            metrics.healthy.set(1)

    def failure(self, error: BaseException) -> None:
        with self._lock:
            self.failures_in_a_row += 1
            self.last_error = f"{type(error).__name__}: {error}"[:300]
        self.refresh()

    def success(self) -> None:
        if self.failures_in_a_row:  # read without the lock: the common case costs nothing
            with self._lock:
                self.failures_in_a_row = 0
            self.refresh()

    def _stalled(self) -> str | None:
        return next((why for engine in self.engines if (why := engine.stalled())), None)

    @property
    def ok(self) -> bool:
        """Whether /health answers 200 now (the `healthy` gauge follows)."""
        healthy = self.failures_in_a_row < self.unhealthy_after and self._stalled() is None
        if healthy != self._healthy:
            self._healthy = healthy
            if self.metrics is not None:
                self.metrics.healthy.set(int(healthy))
        return healthy

    def refresh(self) -> None:
        """Bring the `healthy` gauge up to date (a stall starts and ends with time, not with a call)."""
        _ = self.ok

    def keep_fresh(self, seconds: float = 1.0) -> None:
        """Refresh the gauge every `seconds` from a daemon thread. With several workers a scrape reads every
        worker's gauge, and a stalled worker whose own /health nobody asks would not update its own."""
        def loop():
            while not stop.wait(seconds):
                self.refresh()

        stop = threading.Event()
        threading.Thread(target=loop, name="clip-health", daemon=True).start()

    def reason(self) -> str:
        """Why the server is unhealthy (for the 503's body)."""
        if stalled := self._stalled():
            return stalled
        return (f"the last {self.failures_in_a_row} predictions failed for reasons that are not the caller's "
                f"(serve.unhealthy_after is {self.unhealthy_after}); last error: {self.last_error}")


class ModelMetrics(Observer):
    """One model's observer: its reports recorded in `metrics` with its labels, failures told to `health`."""

    def __init__(self, metrics: Metrics, health: Health, model: str, engine: str, precision: str):
        labels = (model, engine, precision)
        self.metrics, self.health, self.labels = metrics, health, labels
        self._stages = {name: metrics.stage_seconds.labels(*labels, name)
                        for name in ("decode", "preprocess", "forward")}
        self._forward_rows = metrics.forward_rows.labels(*labels)
        self._forward_requests = metrics.forward_requests.labels(*labels)
        self._queue_wait = metrics.queue_wait.labels(*labels)
        self._rows = {name: metrics.rows.labels(*labels, name) for name in ("embedded", "refused", "bad")}
        self._failures = metrics.failures.labels(*labels)

    def stage(self, stage, seconds, rows):
        self._stages[stage].observe(seconds)

    def forward(self, rows, requests, seconds):
        self._stages["forward"].observe(seconds)
        self._forward_rows.observe(rows)
        self._forward_requests.observe(requests)

    def queue_wait(self, seconds):
        self._queue_wait.observe(seconds)

    def rows(self, embedded, refused, bad_kinds):
        if embedded:
            self._rows["embedded"].inc(embedded)
        if refused:
            self._rows["refused"].inc(refused)
        if bad_kinds:
            self._rows["bad"].inc(len(bad_kinds))
            for kind in bad_kinds:
                self.metrics.bad_rows.labels(*self.labels, kind).inc()

    def failure(self, error):
        self._failures.inc()
        self.health.failure(error)

    def success(self):
        self.health.success()


def watch(python_model, metrics: Metrics | None, health: Health, name: str, limits=None) -> list[str]:
    """Set a ModelMetrics on a loaded clip-pyfunc model (and on each tower of the combined model), make its
    engine's stalls count in `health`, and guard the engine with the server's `limits`.

    Args:
        python_model: What `PyFuncModel.unwrap_python_model()` returns.
        metrics: Where to record; None: only `health` observes the model (metrics off).
        name: The `model` label ("image", "text", "classifier"; the combined model's towers add
            "/image" and "/text").
        limits: runtime.batching.ServingLimits for the model's engine; None leaves it unguarded.

    Returns:
        The labels set; empty for a model that is not clip-pyfunc's (it is served without model metrics).
    """
    if hasattr(python_model, "set_observer"):
        runtime = python_model.runtime
        python_model.set_observer(health if metrics is None else
                                  ModelMetrics(metrics, health, name, runtime.engine, runtime.precision))
        engine = python_model.engine
        if engine not in health.engines:
            health.engines.append(engine)
        if limits is not None:
            engine.set_limits(limits)
        return [name]
    towers = [(f"{name}/{kind}", getattr(python_model, kind, None)) for kind in ("image", "text")]
    return [label for label, tower in towers if tower is not None
            for label in watch(tower, metrics, health, label, limits)]
