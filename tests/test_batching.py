"""Batching across requests (runtime.batching): concurrent predict calls on one loaded model share
forward passes, and each still gets exactly what it would get alone.

The models are the registered tiny random CLIP, loaded in-process on each engine, and called from
threads the way MLflow's scoring server calls them (one thread per request).
"""

from __future__ import annotations

import json
import time
import threading

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from conftest import ENGINES, b64, encode, load_on_engine, photo
from clip_pyfunc.runtime.batching import FAULTS_ENV
from clip_pyfunc.runtime.observe import Observer

GOOD = [b64(encode(photo(90 + 7 * i, 70 + 5 * i, seed=i), "JPEG" if i % 2 else "PNG")) for i in range(6)]
BAD = ["not base64 !!", b64(b"GIF89a not really"), None]


class Recorder(Observer):
    """Keeps what the model reports (a real observer, as serving.metrics is)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.forwards, self.waits, self.bad, self.failures = [], [], [], []

    def forward(self, rows, requests, seconds):
        with self.lock:
            self.forwards.append((rows, requests))

    def queue_wait(self, seconds):
        with self.lock:
            self.waits.append(seconds)

    def rows(self, embedded, refused, bad_kinds):
        with self.lock:
            self.bad.extend(bad_kinds)

    def failure(self, error):
        with self.lock:
            self.failures.append(error)


def _requests():
    """Twelve requests: 1-3 rows, some with a bad row, some with normalize false."""
    out = []
    for i in range(12):
        rows = [GOOD[(i + j) % len(GOOD)] for j in range(1 + i % 3)]
        if i % 4 == 3:
            rows.insert(i % len(rows), BAD[i % len(BAD)])
        out.append((rows, {"normalize": i % 5 != 2}))
    return out


def _answer(model, rows, params):
    try:
        return model.predict({"input": rows}, params=params)
    except MlflowException as e:
        return e.message


def _concurrently(fn, args):
    barrier = threading.Barrier(len(args))
    out = [None] * len(args)

    def run(i):
        barrier.wait()
        out[i] = fn(*args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_requests_share_forwards_and_get_their_own_answers(registered, engine):
    """Mixed good and bad requests at once: fewer forwards than calls, and each answer equals the same
    request's own predict on a model nobody else calls."""
    uri = registered["models"]["image"]["uri"]
    alone = load_on_engine(uri, engine)
    shared = load_on_engine(uri, engine, batch_wait_ms=200)
    recorder = Recorder()
    shared.unwrap_python_model().set_observer(recorder)
    requests = _requests()
    expected = [_answer(alone, rows, params) for rows, params in requests]
    got = _concurrently(lambda rows, params: _answer(shared, rows, params), requests)
    for i, (want, have) in enumerate(zip(expected, got)):
        if isinstance(want, str):
            assert have == want, (i, have)
            assert "row" in want and "bad row" in want
        else:
            assert isinstance(have, np.ndarray) and have.dtype == np.float32 and have.shape == want.shape, i
            np.testing.assert_allclose(have, want, atol=2e-6, err_msg=f"request {i}")
    engine_ = shared.unwrap_python_model().engine
    assert engine_.forwards < engine_.calls, (engine_.forwards, engine_.calls)
    assert max(requests_ for _, requests_ in recorder.forwards) > 1, recorder.forwards
    assert all(rows <= shared.unwrap_python_model().runtime.batch_size for rows, _ in recorder.forwards)
    assert sorted(recorder.bad) == sorted(["base64", "not_an_image", "null"]), recorder.bad


def test_text_requests_share_forwards_of_one_length_only(registered):
    uri = registered["models"]["text"]["uri"]
    alone = load_on_engine(uri, "torch")
    shared = load_on_engine(uri, "torch", batch_wait_ms=200)
    texts = [["a red bicycle"], ["a blue car"], ["a photo of a very long and winding mountain road at dusk"],
             ["a cat"], ["two dogs", "a bird"], [""]]
    expected = [alone.predict(t) for t in texts]
    got = _concurrently(lambda t: shared.predict(t), [(t,) for t in texts])
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, atol=2e-6)
    engine = shared.unwrap_python_model().engine
    assert engine.forwards < engine.calls


def test_a_lone_call_never_waits(registered):
    """With a long batch_wait_ms, a single caller (Spark, a notebook) still runs at once."""
    model = load_on_engine(registered["models"]["image"]["uri"], "torch", batch_wait_ms=1000)
    recorder = Recorder()
    model.unwrap_python_model().set_observer(recorder)
    for _ in range(3):
        model.predict(GOOD[:2])
    engine = model.unwrap_python_model().engine
    assert engine.forwards == engine.calls == 3
    assert max(recorder.waits) < 0.5, recorder.waits  # 1 s had it waited


def test_a_failing_shared_forward_reaches_only_its_own_caller(registered, monkeypatch):
    """Two calls share a forward that fails: it is run again per caller, and the injected failures
    (two) fail the shared forward and the first caller's own, never the second caller's."""
    with monkeypatch.context() as m:  # the faults come from the environment at load (FAULTS_ENV)
        m.setenv(FAULTS_ENV, json.dumps({"fail": 2}))
        model = load_on_engine(registered["models"]["image"]["uri"], "torch", batch_wait_ms=500)
    recorder = Recorder()
    model.unwrap_python_model().set_observer(recorder)

    def call(rows):
        try:
            return model.predict(rows)
        except MlflowException as e:  # INTERNAL_ERROR: a served 500
            return e

    got = _concurrently(call, [(GOOD[:1],), (GOOD[1:3],)])
    failed = [g for g in got if isinstance(g, Exception)]
    assert len(failed) == 1 and "injected engine failure" in failed[0].message, got
    assert failed[0].get_http_status_code() == 500
    assert len(recorder.failures) == 1
    assert recorder.forwards[0][1] == 2  # the first forward was the shared one


# ---------------------------------------------------------------- a server's guards (ServingLimits), in process


def _slow_model(registered, monkeypatch, delay_s=0.2, batch_size=2):
    with monkeypatch.context() as m:
        m.setenv(FAULTS_ENV, json.dumps({"delay_s": delay_s}))
        return load_on_engine(registered["models"]["image"]["uri"], "torch", batch_size=batch_size, batch_wait_ms=0)


def _until(condition, seconds=30.0):
    """Poll `condition` (engine state a test waits for) every 10 ms."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "never got there"
        time.sleep(0.01)


def _in_request(state, fn, *args, **kwargs):
    """Run fn as a served request would: with `state` as the current request."""
    from clip_pyfunc.runtime.batching import current_request

    token = current_request.set(state)
    try:
        return fn(*args, **kwargs)
    except MlflowException as e:
        return e
    finally:
        current_request.reset(token)


def test_an_abandoned_request_stops_before_its_next_forward(registered, monkeypatch):
    """8 rows in forwards of 2 (0.2 s each): cancelled after the first forward started, the rest never run,
    and the call answers CANCELLED (499) instead of vectors nobody reads."""
    from clip_pyfunc.runtime.batching import RequestState

    model = _slow_model(registered, monkeypatch)
    engine = model.unwrap_python_model().engine
    state, got = RequestState(), []
    caller = threading.Thread(target=lambda: got.append(_in_request(state, model.predict, GOOD[:1] * 8)))
    caller.start()
    _until(lambda: engine.forwards >= 1)  # the first forward done, the second running
    done = engine.forwards
    state.cancel("the client disconnected")
    caller.join(timeout=10)
    assert isinstance(got[0], MlflowException) and got[0].get_http_status_code() == 499, got
    assert "client disconnected" in got[0].message
    assert engine.forwards <= done + 1 < 4, (engine.forwards, done)  # the one running when cancelled; of 4


def test_queued_rows_of_an_abandoned_request_are_dropped_and_others_answered(registered, monkeypatch):
    """Two requests queue behind a running forward; one is abandoned: it is dropped unrun, the other answered."""
    from clip_pyfunc.runtime.batching import RequestState

    model = _slow_model(registered, monkeypatch, delay_s=0.4, batch_size=8)
    engine = model.unwrap_python_model().engine
    first, gone, kept = RequestState(), RequestState(), RequestState()
    got: dict = {}
    threads = [threading.Thread(target=lambda s=s, n=n: got.__setitem__(n, _in_request(s, model.predict, GOOD[:1])))
               for s, n in ((first, "first"), (gone, "gone"), (kept, "kept"))]
    threads[0].start()
    _until(lambda: engine._running_since is not None)  # the first forward is running
    threads[1].start()
    threads[2].start()
    _until(lambda: len(engine._queue) == 2)  # both queued behind it
    gone.cancel("the client disconnected")
    for t in threads:
        t.join(timeout=10)
    assert got["gone"].get_http_status_code() == 499, got["gone"]
    assert not isinstance(got["first"], Exception) and not isinstance(got["kept"], Exception), got
    assert engine.dropped == 1 and engine.calls == 2, (engine.dropped, engine.calls)


def test_the_queue_bound_refuses_with_429_and_retry_after_and_never_a_lone_request(registered, monkeypatch):
    """Forwards of 2 rows at 0.2 s: 0.1 s a row. With 0.4 s of queue, 12 concurrent 2-row requests: the first
    few are admitted, the rest 429 RESOURCE_EXHAUSTED with retry_after, before decoding; a lone one always runs.
    Without limits (in process, Spark) nothing is ever refused."""
    from clip_pyfunc.runtime.batching import RequestState, ServingLimits

    model = _slow_model(registered, monkeypatch)
    engine = model.unwrap_python_model().engine
    model.predict(GOOD[:2])  # the forward rate is measured
    _, unbounded = _concurrent_calls(model, RequestState, 12)
    assert not any(isinstance(g, Exception) for g in unbounded), unbounded
    engine.set_limits(ServingLimits(max_queue_s=0.4))
    states, got = _concurrent_calls(model, RequestState, 12)
    refused = [(g, s) for g, s in zip(got, states) if isinstance(g, Exception)]
    assert 0 < len(refused) < 12, got
    for error, state in refused:
        assert error.get_http_status_code() == 429 and "serve.max_queue_seconds" in error.message, error
        assert state.retry_after >= 1
    assert not isinstance(_in_request(RequestState(), model.predict, GOOD[:2]), Exception)  # alone: admitted
    assert engine.refusal(1) is None


def _concurrent_calls(model, make_state, n):
    states = [make_state() for _ in range(n)]
    got = [None] * n

    def call(i):
        got[i] = _in_request(states[i], model.predict, GOOD[:2])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return states, got


def test_a_stalled_forward_answers_waiting_callers_at_once_and_clears_by_itself(registered, monkeypatch):
    """The first forward hangs 3 s, the stall floor is 0.5 s: the caller queued behind it gets
    ForwardStalled (503) within about a second, stalled() names it, and it clears when the forward returns."""
    from clip_pyfunc.runtime.batching import RequestState, ServingLimits

    with monkeypatch.context() as m:
        m.setenv(FAULTS_ENV, json.dumps({"hang": 1, "hang_s": 3}))
        model = load_on_engine(registered["models"]["image"]["uri"], "torch", batch_wait_ms=0)
    engine = model.unwrap_python_model().engine
    engine.set_limits(ServingLimits(stall_floor_s=0.5))
    got: dict = {}
    stuck = threading.Thread(target=lambda: got.__setitem__("stuck", _in_request(RequestState(), model.predict,
                                                                                  GOOD[:1])))
    stuck.start()
    _until(lambda: engine._running_since is not None)  # the hanging forward began
    started = time.perf_counter()
    behind = _in_request(RequestState(), model.predict, GOOD[1:2])
    assert behind.get_http_status_code() == 503 and time.perf_counter() - started < 1.5, behind
    assert "stuck" in engine.stalled()
    stuck.join(timeout=10)
    assert not isinstance(got["stuck"], Exception) and engine.stalled() is None
    assert not isinstance(model.predict(GOOD[:1]), Exception)
