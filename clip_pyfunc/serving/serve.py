"""`clip-pyfunc serve`: MLflow's scoring server, with a body limit, honest health and Prometheus metrics.

With `env_manager: local` (the default: the package is installed where this runs) the server
is MLflow's own scoring app (`mlflow.pyfunc.scoring_server.init`, what `mlflow models serve`
runs), under uvicorn, wrapped by serving.edge.Edge:

- `/invocations`, `/version` and every payload form pass through byte for byte, once the edge has
  answered what MLflow would get wrong (serving.edge: headers, gzip, unknown params, non-string text);
- a body over `serve.max_body_bytes` is answered 413 without being read;
- `/ping` and `/health` answer 503 after `serve.unhealthy_after` predictions in a row failed for
  reasons that are not the caller's, and 200 again once one succeeds; also while a forward runs
  past its limit (`serve.stall_seconds`), and from SIGTERM on;
- the queue is bounded (`serve.max_queue_seconds`): past it, 429 with `Retry-After` at once;
- rows of a request whose client went away, or that was answered 504, are not embedded;
- SIGTERM drains: accepted requests finish within `serve.drain_seconds`, then the process exits;
- each worker runs warm-up forwards before it answers (`serve.warmup`);
- `GET /metrics` answers Prometheus' text format (serving.metrics).

With another environment manager (uv, virtualenv, conda), the model's own environment holds
only the model's requirements, so the command runs plain `mlflow models serve` there, without
the edge (a warning says so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys

from clip_pyfunc.settings import ServeConfig

log = logging.getLogger(__name__)
# Where the uvicorn workers find what `serve` resolved (the factory runs in each worker).
_MODEL_PATH_ENV = "CLIP_PYFUNC_SERVE_MODEL_PATH"
_CONFIG_ENV = "CLIP_PYFUNC_SERVE_CONFIG"
_SCORING_PATHS = ("/invocations", "/version")


def serve_command(model_uri: str, config: ServeConfig) -> list[str]:
    """The `mlflow models serve` command line for a model URI and serve settings (other env managers)."""
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


def scoring_app(model, config: ServeConfig, executor=None, lifecycle=None):
    """MLflow's scoring app for a loaded pyfunc model, behind the edge (ASGI).

    Args:
        model: A loaded mlflow.pyfunc.PyFuncModel.
        config: Serve settings (max_body_bytes, unhealthy_after, metrics, warmup...).
        executor: The thread pool that runs the requests' `predict` (for the warm-up; see `warm_up`).
        lifecycle: The worker's serving.edge.Lifecycle (readiness 503 while draining); None: never drains.
    """
    from mlflow.pyfunc import scoring_server

    from clip_pyfunc.serving.edge import Edge, Scoring
    from clip_pyfunc.serving.metrics import Health, Metrics, watch

    python_model = model.unwrap_python_model()
    app = scoring_server.init(model)
    if config.warmup:
        warm_up(model, app, executor)  # before metrics watch the model: its forwards are not requests
    metrics = Metrics() if config.metrics else None
    health = Health(config.unhealthy_after, metrics)
    watch(python_model, metrics, health, _model_label(model), serving_limits(config))
    if metrics is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        health.keep_fresh()
    schema = model.metadata.get_params_schema()
    scoring = Scoring(paths=("/invocations",), params=frozenset(p.name for p in schema.params) if schema else
                      frozenset(), text_column=_text_column(python_model))
    engines = health.engines  # the model's shared engines (watch found them)
    return Edge(app, max_body_bytes=config.max_body_bytes, metrics=metrics, health=health,
                paths=_SCORING_PATHS, scoring=scoring, max_requests=config.request_threads, lifecycle=lifecycle,
                admission=lambda: next((r for e in engines if (r := e.refusal()) is not None), None))


def _text_column(python_model) -> str | None:
    """The column a model embeds as text: a text model's input, the combined model's `text`; None else."""
    from clip_pyfunc.models.combined import TEXT_COLUMN
    from clip_pyfunc.models.request import INPUT_COLUMN

    tower = getattr(python_model, "tower", "")  # the combined model has none: it holds both towers
    if tower == "text":
        return INPUT_COLUMN
    return TEXT_COLUMN if not tower and getattr(python_model, "text", None) is not None else None


def serving_limits(config: ServeConfig):
    """The guards a server puts on each model's engine (runtime.batching.ServingLimits) from its settings."""
    from clip_pyfunc.runtime.batching import ServingLimits

    return ServingLimits(max_queue_s=float(config.max_queue_seconds), stall_floor_s=float(config.stall_seconds))


def _supervise(config) -> None:
    """uvicorn's multiprocess supervisor (what uvicorn.run starts for workers > 1), passing SIGTERM on to the
    workers at once: its own loop looks at signals every 0.5 s, and readiness must answer 503 from the
    signal on."""
    import inspect

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    sockets = [config.bind_socket()]
    if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn before 0.55 takes the worker's target
        supervisor = Multiprocess(config, target=uvicorn.Server(config).run, sockets=sockets)
    else:
        supervisor = Multiprocess(config, sockets=sockets)
    queued = signal.getsignal(signal.SIGTERM)  # the supervisor's own: it queues the signal for its loop

    def handle(sig, frame):
        # Exiting first: the supervisor's loop must not take a draining worker for a dead one and start
        # another. Then the signal itself, not Process.terminate(), which also closes the health pipes.
        supervisor.should_exit.set()
        for process in supervisor.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)  # each worker drains (readiness answers 503 from now on)
        queued(sig, frame)

    signal.signal(signal.SIGTERM, handle)
    supervisor.run()


def warm_up(model, app=None, executor=None) -> None:
    """Run the model on the inputs it serves (one 640x480 JPEG and a short text, one row and a few), so that
    the first request finds its code paths, allocations and the engine's kernels for those shapes ready.

    Args:
        model: The loaded pyfunc model.
        app: MLflow's scoring app (ASGI) for it: one request then goes through it whole (routing,
            middleware, parsing, the answer's JSON), as an HTTP request would.
        executor: The thread pool that will run `predict` for the server's requests: the model's warm-up
            runs in it, since an engine's first call on a thread sets up that thread (torch's and
            OpenVINO's thread pools: 2-8 ms on the tiny test model), and the pool reuses an idle thread
            for the next request.

    A failure is logged, not raised: health reports a failing model.
    """
    import base64
    import time

    from mlflow.pyfunc import scoring_server

    from clip_pyfunc.dev.samples import photo_jpeg

    python_model = model.unwrap_python_model()
    tower = getattr(python_model, "tower", "")  # the combined model has none: it holds both towers
    kinds = [tower] if tower else [k for k in ("image", "text") if getattr(python_model, k, None) is not None]
    image = base64.b64encode(photo_jpeg(640, 480, seed=0)).decode()
    rows = {"image": [image], "text": ["a photo of a cat"]}
    started = time.perf_counter()

    def body(n: int) -> str:
        return json.dumps({"inputs": rows[kinds[0]] * n} if len(kinds) == 1 else
                          {"dataframe_records": [{k: rows[k][0] for k in kinds}] * n})

    def score(n: int) -> tuple[int, str]:
        result = scoring_server.invocations(body(n), "application/json", model, model.metadata.get_input_schema())
        return result.status, str(result.response)

    try:
        answers = [_asgi_post(app, "/invocations", body(1).encode())] if app is not None else []
        for n in (1, 2, 1):  # one row and a batch; one again, as the first request will be
            answers.append(executor.submit(score, n).result() if executor is not None else score(n))
        for status, answer in answers:
            if status != 200:
                raise RuntimeError(f"{status}: {answer[:200]}")
        logging.getLogger("uvicorn.error").info("warm-up forwards done in %.2f s", time.perf_counter() - started)
    except Exception as e:  # noqa: BLE001 - the server still starts; failing requests make health say so
        log.warning("warm-up failed (%s: %s); serving anyway", type(e).__name__, e)


def _asgi_post(app, path: str, body: bytes) -> tuple[int, str]:
    """POST `body` (JSON) to an ASGI app in memory, on an event loop of its own in another thread (uvicorn's
    loop is running where the factory is called): (status, body of the answer)."""
    import asyncio
    import threading

    answer = {"status": 0, "body": b""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    errors: list = []

    def run():
        try:
            asyncio.run(app(scope, receive, send))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, name="clip-warmup")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return answer["status"], answer["body"].decode("utf-8", "replace")


def _model_label(model) -> str:
    """The `model` label: the python model's tower ("image", "text"), or its class name."""
    python_model = model.unwrap_python_model()
    return getattr(python_model, "tower", "") or type(python_model).__name__


def create_app():
    """uvicorn's factory (one call per worker): load the model `serve` resolved and wrap it."""
    from mlflow.pyfunc import scoring_server

    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from clip_pyfunc.serving.edge import Lifecycle

    config = ServeConfig(**json.loads(os.environ[_CONFIG_ENV]))
    # MLflow runs each predict in asyncio's default executor (asyncio.to_thread): min(32, cores + 4)
    # threads, 6 on 2 cores, would cap how many requests can share a forward. uvicorn calls this
    # factory inside its running loop.
    executor = ThreadPoolExecutor(max_workers=config.request_threads, thread_name_prefix="clip-predict")
    asyncio.get_running_loop().set_default_executor(executor)
    lifecycle = Lifecycle()
    lifecycle.drain_on_sigterm()  # uvicorn installed its handler before calling this factory
    # MLflow's own loader: it honours SERVING_MODEL_CONFIG, as `mlflow models serve` does.
    model = scoring_server.load_model_with_mlflow_config(os.environ[_MODEL_PATH_ENV])
    return scoring_app(model, config, executor, lifecycle)


class Locating:
    """The model's folder (`registry.lookup.model_folder`), found by a forked child of this process.

    The registry lookup imports MLflow's SQLAlchemy stores and ORM models when the registry is a
    database: about 1.1 s, and 55 MiB of the serving process's memory for the whole life of the server,
    measured on a 2-core Xeon (docs/BENCHMARKS.md, issue 39). Forked once MLflow is imported (the
    server needs it anyway), the child starts with it and only adds the lookup; that memory ends with
    the child, and this process imports the rest of what it serves with meanwhile. The child ends
    with this process (a SIGTERM while it looks). Off Linux, or where the fork fails, the lookup runs
    here.

    Args:
        model_uri: The model URI to find.
        what: The flag that gave it, for the message.
    """

    def __init__(self, model_uri: str, what: str):
        import warnings

        self.model_uri, self.what = model_uri, what
        self.pid, self.pipe, self.found = None, None, None
        if sys.platform != "linux":  # macOS: a forked child may not use the system's frameworks (proxies, TLS)
            self.found = self._answer()
            return
        parent = os.getpid()
        read, write = os.pipe()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns of fork() with threads: here numpy's BLAS pool and pyarrow's jemalloc
                # thread, which both prepare for fork; the child uses neither.
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                self.pid = os.fork()
        except OSError:  # e.g. a container's process limit: the lookup runs here
            os.close(read)
            os.close(write)
            self.found = self._answer()
            return
        if self.pid == 0:  # the child: answer, and never return into the server's code
            try:
                os.close(read)
                _die_with(parent)
                with os.fdopen(write, "w", encoding="utf-8") as out:
                    out.write(json.dumps(self._answer()))
            finally:
                os._exit(0)
        os.close(write)
        self.pipe = read

    def _answer(self) -> dict:
        from clip_pyfunc.errors import ClipPyfuncError, one_line
        from clip_pyfunc.registry.lookup import model_folder

        try:
            return {"path": model_folder(self.model_uri, self.what)}
        except ClipPyfuncError as e:
            return {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - a platform fault: the server cannot start, said in one line
            log.debug("finding the model failed", exc_info=True)
            return {"error": f"finding {self.what} {self.model_uri} failed: {type(e).__name__}: {one_line(e)}"}

    def path(self) -> str:
        """The folder (absolute path).

        Raises:
            ModelLoadError: No model at the URI, or the lookup failed; one line, as the CLI prints it.
        """
        from clip_pyfunc.errors import ModelLoadError

        answer = self.found
        if answer is None:
            with os.fdopen(self.pipe, encoding="utf-8") as pipe:
                text = pipe.read()
            _, status = os.waitpid(self.pid, 0)
            try:
                answer = json.loads(text)
            except ValueError:
                raise ModelLoadError(f"finding {self.what} {self.model_uri} failed: the lookup process ended "
                                     f"({_ended(status)}) without an answer") from None
        if "error" in answer:
            raise ModelLoadError(answer["error"])
        return answer["path"]


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this (child) process when its parent ends (Linux prctl PR_SET_PDEATHSIG), so that
    a lookup or download outlives no server that was stopped while waiting for it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG (linux/prctl.h)
    if os.getppid() != parent:  # it ended before the call above
        os._exit(0)


def _ended(status: int) -> str:
    """How a child ended, from os.waitpid's status: "exit status N" or "signal NAME"."""
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def serve(model_uri: str, config: ServeConfig, what: str = "--model-uri") -> None:
    """Serve `model_uri` until stopped: MLflow's scoring app behind the edge (local), else `mlflow models serve`.

    Args:
        model_uri: The model to serve.
        config: Serve settings.
        what: The flag that gave `model_uri`, for the one-line error when MLflow finds no model there.

    Raises:
        ModelLoadError: No model at `model_uri`, before anything listens.
    """
    env = serve_env(config)
    if config.env_manager != "local":
        from clip_pyfunc.registry.lookup import model_info

        model_info(model_uri, what)  # before this process becomes the server
        log.warning("env_manager %s: serving with plain `mlflow models serve` in the model's own environment, "
                    "without /metrics, the body limit or health failures", config.env_manager)
        cmd = serve_command(model_uri, config)
        os.execve(cmd[0], cmd, env)
    from mlflow.pyfunc import scoring_server  # noqa: F401 - the server's; the lookup's child starts with it

    locating = Locating(model_uri, what)  # once, not once per worker; in place where the store is on this disk
    import tempfile

    import uvicorn
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    from clip_pyfunc.serving import edge, metrics  # noqa: F401 - what each worker wraps the model in, meanwhile

    path = locating.path()
    os.environ.update(env)
    os.environ[_MODEL_PATH_ENV] = path
    os.environ[_CONFIG_ENV] = json.dumps(config.to_dict())
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(config.timeout)
    from clip_pyfunc.serving.metrics import clear_multiprocess_dir

    made = None
    clear_multiprocess_dir()  # the operator's folder: what an earlier run left is not this run's
    if config.workers > 1 and config.metrics and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clip-pyfunc-metrics-")
    try:
        if config.workers > 1:
            _supervise(uvicorn.Config("clip_pyfunc.serving.serve:create_app", factory=True, host=config.host,
                                      port=config.port, workers=config.workers, log_level="info",
                                      timeout_graceful_shutdown=config.drain_seconds))
        else:
            uvicorn.run("clip_pyfunc.serving.serve:create_app", factory=True, host=config.host, port=config.port,
                        log_level="info", timeout_graceful_shutdown=config.drain_seconds)
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
