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

A server adds three guards (`ServingLimits`, set by `clip-pyfunc serve` and the app; in-process
calls, Spark and plain `mlflow models serve` run without them):

- **Bounded queue.** A call is admitted only while the rows inside the model (decoding, queued
  or in a forward) would be done within `max_queue_s` at the measured forward rate; past it the
  call raises `Overloaded` before it decodes anything, with the seconds to retry after. A call
  that finds the model empty is always admitted.
- **Stalled forwards.** A forward running past its limit (`stall_factor` times what its rows
  took before, at least `stall_floor_s`) makes `stalled()` true (health answers 503), and every
  caller waiting behind it, or arriving, raises `ForwardStalled` at once. It clears by itself
  when the forward returns.
- **Abandoned requests.** A front end marks each request with a `RequestState` (the context
  variable `current_request`, which the threads that run `predict` inherit). When its client
  disconnects or it was answered already (a 504), its queued rows are dropped before their
  forward, and its decoding stops at the next row (`check_request`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field

from clip_pyfunc.errors import ForwardStalled, ModelLoadError, Overloaded, RequestCancelled
from clip_pyfunc.runtime.observe import Observer

# Faults injected on purpose, to test health probes and the guards: JSON, e.g. {"fail": 3} (the first
# 3 forwards raise EngineFailure), {"hang": 1, "hang_s": 30} (the next forward sleeps 30 s first),
# {"delay_s": 0.2} (every forward sleeps 0.2 s first). Read from the environment at load, so that no
# logged model carries it.
FAULTS_ENV = "CLIP_PYFUNC_FAULTS"


@dataclass(eq=False)
class RequestState:
    """One served request's fate, shared by the front end (event loop) and the threads that run it.

    `cancel(reason)` is called by the front end when the client disconnected or the request was
    answered already; the model then drops the request's work that has not started.
    """

    reason: str | None = None
    retry_after: int | None = None  # set by the model when it refused the request as Overloaded

    def cancel(self, reason: str) -> None:
        """Mark the request abandoned (the first reason stays)."""
        if self.reason is None:
            self.reason = reason

    @property
    def cancelled(self) -> bool:
        return self.reason is not None


# The request a thread works for; asyncio.to_thread and anyio's worker threads copy the context, so the
# thread that runs `predict` sees what the front end set. None: not a served request.
current_request: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar(
    "clip_pyfunc_request", default=None)


def check_request(state: RequestState | None = None) -> None:
    """Raise RequestCancelled when the current request (or `state`) was abandoned; cheap, call it per row."""
    state = state if state is not None else current_request.get()
    if state is not None and state.reason is not None:
        raise _dropped(state)


def _dropped(state: RequestState) -> RequestCancelled:
    return RequestCancelled(f"request dropped: {state.reason}")


@dataclass(frozen=True, kw_only=True)
class ServingLimits:
    """A server's guards on a shared engine (see the module docstring).

    Attributes:
        max_queue_s: Most seconds of work (at the measured forward rate) admitted behind the running
            forward; None: no bound.
        stall_floor_s: A forward is stalled after max(stall_floor_s, stall_factor x its rows' measured
            seconds); None: never.
        stall_factor: See stall_floor_s.
    """

    max_queue_s: float | None = None
    stall_floor_s: float | None = None
    stall_factor: float = 10.0


@dataclass(frozen=True)
class Faults:
    """Faults injected on purpose (FAULTS_ENV): failing, hanging and slow forwards."""

    fail: int = 0
    hang: int = 0
    hang_s: float = 0.0
    delay_s: float = 0.0

    @classmethod
    def from_env(cls, environ=None) -> "Faults":
        """The faults FAULTS_ENV asks for (none when unset).

        Raises:
            ModelLoadError: FAULTS_ENV is not a JSON object of these fields with numbers >= 0.
        """
        raw = (os.environ if environ is None else environ).get(FAULTS_ENV, "").strip()
        if not raw:
            return cls()
        try:
            values = json.loads(raw)
            faults = cls(**values)
            numbers = [faults.fail, faults.hang, faults.hang_s, faults.delay_s]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in numbers):
                raise ValueError("every value must be a number >= 0")
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{FAULTS_ENV} must be a JSON object with fail, hang, hang_s and delay_s "
                                 f"(numbers >= 0), got {raw[:80]!r} ({e})") from e
        return faults


@dataclass(eq=False)
class _Job:
    """One caller's arrays for one engine call, and what came back."""

    method: str
    key: tuple
    arrays: tuple
    rows: int
    request: RequestState | None = None
    queued: float = field(default_factory=time.perf_counter)
    result: object = None
    error: BaseException | None = None
    done: bool = False


# Calls per forward, on a moving average, above which the engine counts as busy: requests are arriving
# together, and the next batch waits (up to wait_s) for the ones on their way. A lone caller's
# forwards hold 1 call, so it never waits.
_BUSY = 1.5


def batch_wait_s(wait_ms: float | None, engine) -> float:
    """Seconds a batch may wait: the model_config's `batch_wait_ms`, or the engine's `batch_wait_ms` when None."""
    return (engine.batch_wait_ms if wait_ms is None else float(wait_ms)) / 1000


class SharedForwards:
    """An engine whose concurrent callers share forward passes (see the module docstring).

    Args:
        engine: The engine to run (one of runtime.engines).
        max_rows: Most rows in one shared forward (the model_config's `batch_size`).
        wait_s: Most seconds a batch that is not full waits for callers still decoding or, while the
            engine is busy, on their way (0: none).
        observer: Told each forward's rows, callers and time, and each call's queue wait.
        faults: Faults injected on purpose (default: those FAULTS_ENV asks for).
    """

    def __init__(self, engine, *, max_rows: int, wait_s: float = 0.0, observer: Observer | None = None,
                 faults: Faults | None = None):
        self.engine, self.runtime, self.name = engine, engine.runtime, engine.name
        self.max_rows, self.wait_s = max(1, int(max_rows)), max(0.0, float(wait_s))
        self.observer = observer or Observer()
        faults = Faults.from_env() if faults is None else faults
        self._fail, self._hang, self._hang_s, self._delay_s = faults.fail, faults.hang, faults.hang_s, faults.delay_s
        self.limits = ServingLimits()
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._running = False
        self._forming = False
        self._free_since = time.perf_counter()  # when the last forward ended
        self._shared = 1.0  # calls per forward lately (a moving average): above 1, requests arrive together
        self._inside: list[tuple[int, RequestState | None]] = []  # callers inside the model: rows, request
        self._running_since: float | None = None  # when the running forward started
        self._running_rows = 0
        self._row_s: float | None = None  # seconds per row of a forward, a moving average (None: none yet)
        self.forwards = 0  # forwards run, and the calls they answered: for tests and benchmarks
        self.calls = 0
        self.dropped = 0  # calls dropped before their forward: their request was abandoned

    def set_limits(self, limits: ServingLimits) -> None:
        """Guard this engine as a server does (see ServingLimits); ServingLimits() removes the guards."""
        self.limits = limits

    @contextlib.contextmanager
    def caller(self, rows: int = 0):
        """Count a request as inside the model for as long as it is (decoding, queued or in its forward).

        A queued batch that is not full waits up to `wait_s` while some counted caller has not
        queued yet, or while the engine is busy (see `_form`). Under ServingLimits, a caller is
        admitted first (see `_admit`).

        Raises:
            Overloaded: The rows inside would take more than `max_queue_s` at the measured rate.
            ForwardStalled: A forward has run past its limit.
            RequestCancelled: The current request was abandoned already.
        """
        request = current_request.get()
        check_request(request)
        entry = (rows, request)
        with self._cond:
            self._admit(rows)
            self._inside.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._inside.remove(entry)
                self._cond.notify_all()

    def _rows_ahead(self) -> int:
        """Under the lock: rows inside the model whose requests are still wanted."""
        return sum(rows for rows, request in self._inside if request is None or not request.cancelled)

    def _admit(self, rows: int) -> None:
        """Under the lock: refuse a new caller while a forward is stalled or the queue is full."""
        if (refused := self._refusal(rows)) is not None:
            raise refused

    def refusal(self, rows: int = 1):
        """What a request of `rows` rows would be refused with now (Overloaded, ForwardStalled), or None.

        A front end asks before it parses a request's body, so that refusing costs next to nothing
        (`rows` 1: whatever the request holds, it is refused when one row would be).
        """
        with self._cond:
            return self._refusal(rows)

    def _refusal(self, rows: int):
        """Under the lock: see `refusal`."""
        if (stalled := self._stalled_by()) is not None:
            return ForwardStalled(stalled)
        bound_s, row_s = self.limits.max_queue_s, self._row_s
        if bound_s is None or row_s is None:
            return None  # no bound, or nothing measured yet
        ahead = self._rows_ahead()
        if ahead == 0:
            return None  # nobody ahead (abandoned requests do not count): a lone request always runs
        # At least two full forwards may wait, so that a burst still fills batches.
        bound_rows = max(2 * self.max_rows, bound_s / row_s)
        if ahead + rows <= bound_rows:
            return None
        ahead_s = ahead * row_s
        return Overloaded(f"the server is at capacity: {ahead} rows are ahead of this request, about "
                          f"{ahead_s:.1f} s of work, over serve.max_queue_seconds ({bound_s:g} s); retry after "
                          f"{math.ceil(ahead_s)} s", retry_after=max(1, math.ceil(ahead_s)))

    def stall_limit(self) -> float | None:
        """Seconds the running forward may take before it counts as stalled (None: no limit)."""
        floor = self.limits.stall_floor_s
        if floor is None:
            return None
        expected = 0.0 if self._row_s is None else self._row_s * max(1, self._running_rows)
        return max(floor, self.limits.stall_factor * expected)

    def _stalled_by(self) -> str | None:
        """Why the engine counts as stuck (the running forward is past its limit), or None."""
        since, limit = self._running_since, self.stall_limit()
        if since is None or limit is None:
            return None
        running = time.perf_counter() - since
        if running <= limit:
            return None
        return (f"a forward of {self._running_rows} rows has run {running:.1f} s, past its limit of {limit:.1f} s "
                f"(serve.stall_seconds, or {self.limits.stall_factor:g}x what its rows took before); the engine "
                "may be stuck")

    def stalled(self) -> str | None:
        """Why the engine is stuck (for health), or None while forwards complete in time."""
        with self._cond:
            return self._stalled_by()

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
        request = current_request.get()
        check_request(request)
        job = _Job(method, key, arrays, len(arrays[0]), request)
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
        """Wait until `job` is answered (None) or this thread may run the next batch (that batch).

        While it waits, a stalled forward or its request abandoned answers it at once (see the
        module docstring); it then checks every 50 ms.
        """
        guarded = self.limits.stall_floor_s is not None or job.request is not None
        with self._cond:
            while True:
                if job.done:
                    return None
                queued = job in self._queue
                error = _dropped(job.request) if queued and job.request is not None and job.request.cancelled else None
                if error is None and guarded and (stalled := self._stalled_by()) is not None:
                    error = ForwardStalled(stalled)  # queued behind the stuck forward, or in it
                if error is not None:
                    if queued:
                        self._queue.remove(job)
                    self.dropped += isinstance(error, RequestCancelled)
                    job.error, job.done = error, True
                    return None
                if not self._running and not self._forming and self._queue:
                    batch = self._form()
                    if batch is not None:
                        return batch
                    continue
                self._cond.wait(0.05 if guarded else None)

    def _form(self) -> list[_Job] | None:
        """Under the lock: take the oldest queued call and those that fit with it; wait for more first
        (up to wait_s) when the batch is not full and a caller is still decoding or the engine is busy.
        None when the queue emptied meanwhile."""
        self._forming = True
        try:
            while self._queue:
                self._drop_abandoned()
                if not self._queue:
                    break
                head = self._queue[0]
                batch, rows = [], 0
                for queued in self._queue:
                    if queued.key == head.key and rows + queued.rows <= self.max_rows or not batch:
                        batch.append(queued)
                        rows += queued.rows
                # Counted from when the engine could take the batch, not from when the oldest call queued
                # (it may have waited through a whole forward already).
                left = max(head.queued, self._free_since) + self.wait_s - time.perf_counter()
                decoding = len(self._inside) > len(self._queue)
                busy = self._shared > _BUSY
                if rows >= self.max_rows or left <= 0 or not (decoding or busy):
                    for taken in batch:
                        self._queue.remove(taken)
                    self._running = True
                    self._running_since, self._running_rows = time.perf_counter(), rows
                    return batch
                self._cond.wait(left)
            return None
        finally:
            self._forming = False

    def _drop_abandoned(self) -> None:
        """Under the lock: answer the queued calls of abandoned requests (RequestCancelled), unrun."""
        for job in [job for job in self._queue if job.request is not None and job.request.cancelled]:
            self._queue.remove(job)
            self.dropped += 1
            job.error, job.done = _dropped(job.request), True
        self._cond.notify_all()

    def _run(self, batch: list[_Job]) -> None:
        """Run one forward for the batch (outside the lock) and hand each caller its rows; whatever
        happens, every caller in it is answered and the engine is free again."""
        started = time.perf_counter()
        rows = sum(job.rows for job in batch)
        outputs: list = [RuntimeError("the shared forward did not run")] * len(batch)
        seconds = None
        try:
            for job in batch:
                self.observer.queue_wait(started - job.queued)
            outputs = self._outputs(batch)
            seconds = time.perf_counter() - started
            self.observer.forward(rows, len(batch), seconds)
        except BaseException as e:  # KeyboardInterrupt, or an observer's own error: reaches every caller
            outputs = [e] * len(batch)
        finally:
            with self._cond:
                limit = self.stall_limit()
                if seconds is not None and (limit is None or seconds <= limit):  # a stalled one is no measure
                    row_s = seconds / max(1, rows)
                    self._row_s = row_s if self._row_s is None else self._row_s + (row_s - self._row_s) / 4
                self._running_since, self._running_rows = None, 0
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
        if self._fail or self._hang or self._delay_s:
            self._injected_fault()
        return getattr(self.engine, method)(*arrays)

    def _injected_fault(self) -> None:
        """Fail, hang or slow this forward as FAULTS_ENV asks (the failures first, then the hangs)."""
        with self._cond:
            fail, hang = self._fail > 0, self._fail == 0 and self._hang > 0
            self._fail -= fail
            self._hang -= hang
        if fail:
            raise EngineFailure(f"injected engine failure ({FAULTS_ENV})")
        time.sleep((self._hang_s if hang else 0.0) + self._delay_s)


class EngineFailure(RuntimeError):
    """A forward failed on purpose (FAULTS_ENV), as an engine error would."""
