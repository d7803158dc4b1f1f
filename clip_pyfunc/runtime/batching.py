"""Batching across requests: concurrent callers of one engine share its forward passes.

MLflow's scoring server runs each request's `predict` in a thread of its own
(`asyncio.to_thread`), the app runs each request in starlette's thread pool, and managed
platforms do the same. Each of those threads decodes and preprocesses its own rows; only the
forward is shared. `SharedForwards` stands where the engine stood (the same three calls), so
the stages do not know it is there:

- A call that finds the engine idle and nobody queued runs at once, in its own thread: a lone
  request, a Spark batch or a notebook waits for nothing.
- A call that finds a forward running queues its arrays. When the forward ends, one of the
  waiting threads takes everything queued with the same input shapes, oldest first, up to
  `max_rows` rows, and runs it as one forward; each caller gets exactly its own rows back.
- `wait_s` (the model_config's `batch_wait_ms`) lets that thread wait a little before it starts
  a batch that is not full: for callers that are inside the model but still decoding, and, while
  the engine is busy (its recent forwards were each shared by several calls), for the requests
  on their way (clients whose answer just went out send their next one within milliseconds).
  A lone caller (a single client, a Spark task, a notebook) never waits: nobody is decoding
  beside it and its forwards hold one call each.
- Arrays of different shapes (text padded to different lengths, NaFlex grids) never share a
  forward, so no caller's input is padded or cut to fit another's.
- A shared forward that raises is run again one caller at a time, so an error reaches only
  the caller whose rows raise it.

Params such as `normalize` act after the forward (stages.postprocess), on each caller's own
rows: requests whose params differ share forwards without changing each other's vectors.

The pattern is the one Triton's dynamic batcher and Infinity's batch handler use (a queue, a
maximum batch size and a maximum queue delay); here the waiting threads take turns to run the
forward, so no thread of our own runs in the background.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

from clip_pyfunc.runtime.observe import Observer


@dataclass(eq=False)
class _Job:
    """One caller's arrays for one engine call, and what came back."""

    method: str
    key: tuple
    arrays: tuple
    rows: int
    queued: float = field(default_factory=time.perf_counter)
    result: object = None
    error: BaseException | None = None
    done: bool = False


# Calls per forward, on a moving average, above which the engine counts as busy: requests are arriving
# together, and the next batch waits (up to wait_s) for the ones on their way. A lone caller's
# forwards hold 1 call, so it never waits.
_BUSY = 1.5


# batch_wait_ms when the model_config leaves it unset, by engine: what a bigger batch buys its forward.
# Measured on ViT-B/32 (2-core AVX2 EPYC, docs/SERVING.md): torch fp32 serves 5.7 images/s at 1 row and
# 10.7 at 6, so waiting for the requests on their way pays; OpenVINO 11.9 at 1 and 13.1 at 32, so it
# does not. 40 ms is what merged two groups of 4 requests into one of 8 there (20 ms did not).
DEFAULT_WAIT_MS = {"torch": 40.0, "openvino": 0.0}


def batch_wait_s(wait_ms: float | None, engine: str) -> float:
    """Seconds a batch may wait: the model_config's `batch_wait_ms`, or the engine's default when None."""
    return (DEFAULT_WAIT_MS.get(engine, 0.0) if wait_ms is None else float(wait_ms)) / 1000


class SharedForwards:
    """An engine whose concurrent callers share forward passes (see the module docstring).

    Args:
        engine: The engine to run (runtime.TorchEngine or runtime.OpenVINOEngine).
        max_rows: Most rows in one shared forward (the model_config's `batch_size`).
        wait_s: Most seconds a batch that is not full waits for callers still decoding or, while the
            engine is busy, on their way (0: none).
        observer: Told each forward's rows, callers and time, and each call's queue wait.
        faults: Forwards that raise an engine error on purpose, counted from load (the
            model_config's `inject_engine_failures`), so that health checks can be tested.
    """

    def __init__(self, engine, *, max_rows: int, wait_s: float = 0.0, observer: Observer | None = None,
                 faults: int = 0):
        self.engine, self.runtime, self.name = engine, engine.runtime, engine.name
        self.max_rows, self.wait_s = max(1, int(max_rows)), max(0.0, float(wait_s))
        self.observer = observer or Observer()
        self._faults = int(faults)
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._running = False
        self._forming = False
        self._free_since = time.perf_counter()  # when the last forward ended
        self._shared = 1.0  # calls per forward lately (a moving average): above 1, requests arrive together
        self._callers = 0  # callers inside the model (see `caller`)
        self.forwards = 0  # forwards run, and the calls they answered: for tests and benchmarks
        self.calls = 0

    @contextlib.contextmanager
    def caller(self):
        """Count a request as inside the model for as long as it is (decoding, queued or in its forward).

        A queued batch that is not full waits up to `wait_s` while some counted caller has not
        queued yet, or while the engine is busy (see `_form`).
        """
        with self._cond:
            self._callers += 1
        try:
            yield
        finally:
            with self._cond:
                self._callers -= 1
                self._cond.notify_all()

    def text_features(self, input_ids, attention_mask=None):
        """As the engine's: token ids int64 (n, L) and mask (n, L) or None -> vectors float32 (n, dim)."""
        arrays = (input_ids,) if attention_mask is None else (input_ids, attention_mask)
        return self._call("text_features", arrays)

    def image_features(self, pixels):
        """As the engine's: pixels float32 (n, 3, H, W) -> vectors float32 (n, dim)."""
        return self._call("image_features", (pixels,))

    def patch_features(self, patches, mask, shapes):
        """As the engine's: NaFlex patches (n, P, D), mask (n, P), grid shapes (n, 2) -> vectors (n, dim)."""
        return self._call("patch_features", (patches, mask, shapes))

    def _call(self, method: str, arrays: tuple):
        key = (method,) + tuple((a.shape[1:], a.dtype.str) for a in arrays)
        job = _Job(method, key, arrays, len(arrays[0]))
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()  # a thread forming a batch may be waiting for this one
        while True:
            batch = self._next_batch(job)
            if batch is None:  # another thread ran ours
                break
            self._run(batch)
            if job.done:
                break
        if job.error is not None:
            raise job.error
        return job.result

    def _next_batch(self, job: _Job) -> list[_Job] | None:
        """Wait until `job` is answered (None) or this thread may run the next batch (that batch)."""
        with self._cond:
            while True:
                if job.done:
                    return None
                if not self._running and not self._forming and self._queue:
                    batch = self._form()
                    if batch is not None:
                        return batch
                    continue
                self._cond.wait()

    def _form(self) -> list[_Job] | None:
        """Under the lock: take the oldest queued call and those that fit with it; wait for more first
        (up to wait_s) when the batch is not full and a caller is still decoding or the engine is busy.
        None when the queue emptied meanwhile."""
        self._forming = True
        try:
            while self._queue:
                head = self._queue[0]
                batch, rows = [], 0
                for queued in self._queue:
                    if queued.key == head.key and rows + queued.rows <= self.max_rows or not batch:
                        batch.append(queued)
                        rows += queued.rows
                # Counted from when the engine could take the batch, not from when the oldest call queued
                # (it may have waited through a whole forward already).
                left = max(head.queued, self._free_since) + self.wait_s - time.perf_counter()
                decoding = self._callers > len(self._queue)
                busy = self._shared > _BUSY
                if rows >= self.max_rows or left <= 0 or not (decoding or busy):
                    for taken in batch:
                        self._queue.remove(taken)
                    self._running = True
                    return batch
                self._cond.wait(left)
            return None
        finally:
            self._forming = False

    def _run(self, batch: list[_Job]) -> None:
        """Run one forward for the batch (outside the lock) and hand each caller its rows; whatever
        happens, every caller in it is answered and the engine is free again."""
        started = time.perf_counter()
        outputs: list = [RuntimeError("the shared forward did not run")] * len(batch)
        try:
            for job in batch:
                self.observer.queue_wait(started - job.queued)
            outputs = self._outputs(batch)
            self.observer.forward(sum(job.rows for job in batch), len(batch), time.perf_counter() - started)
        except BaseException as e:  # KeyboardInterrupt, or an observer's own error: reaches every caller
            outputs = [e] * len(batch)
        finally:
            with self._cond:
                self.forwards += 1
                self.calls += len(batch)
                self._shared += (len(batch) - self._shared) / 2
                for job, out in zip(batch, outputs):
                    if isinstance(out, BaseException):
                        job.error = out
                    else:
                        job.result = out
                    job.done = True
                self._running = False
                self._free_since = time.perf_counter()
                self._cond.notify_all()

    def _outputs(self, batch: list[_Job]) -> list:
        """Each caller's vectors, or the exception its own rows raise."""
        import numpy as np

        if len(batch) == 1:
            try:
                return [self._forward(batch[0].method, batch[0].arrays)]
            except Exception as e:
                return [e]
        joined = tuple(np.concatenate(parts) for parts in zip(*(job.arrays for job in batch)))
        try:
            vectors = self._forward(batch[0].method, joined)
            return np.split(vectors, np.cumsum([job.rows for job in batch])[:-1])
        except Exception:  # run each caller apart: an error reaches only the caller whose rows raise it
            outputs = []
            for job in batch:
                try:
                    outputs.append(self._forward(job.method, job.arrays))
                except Exception as e:
                    outputs.append(e)
            return outputs

    def _forward(self, method: str, arrays: tuple):
        if self._faults > 0:
            with self._cond:
                self._faults -= 1
            raise EngineFailure("injected engine failure (inject_engine_failures in the model_config)")
        return getattr(self.engine, method)(*arrays)


class EngineFailure(RuntimeError):
    """A forward failed on purpose (`inject_engine_failures`), as an engine error would."""
