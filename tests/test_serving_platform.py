"""`clip-pyfunc serve` against what real clients and platforms send and do, with real processes and signals.

Clients: no Content-Type, media types in any case, quoted parameters, gzip bodies and gzip bombs,
misspelt params, numbers where a text model takes strings. Platforms: clients that give up,
504s, a forward that hangs, SIGTERM during traffic (one worker and two), more traffic than the
queue takes, worker restarts under multiprocess metrics, and the first request after start.

Faults come from CLIP_PYFUNC_FAULTS (runtime.batching.FAULTS_ENV), which no logged model carries:
`delay_s` makes every forward of the tiny model slow enough for queues to form.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pandas as pd
import pytest
import requests

from conftest import b64, encode, free_port, photo, wait_ready
from clip_pyfunc.runtime.batching import FAULTS_ENV

pytestmark = [pytest.mark.serving]
IMAGES = [b64(encode(photo(80, 60, s), "JPEG")) for s in range(4)]
BODY_LIMIT = 2_000_000


class Server:
    """`clip-pyfunc serve` of one model in its own process group, with its own settings and environment."""

    def __init__(self, uri: str, folder, serve: dict | None = None, env: dict | None = None,
                 model_config: dict | None = None, ready_path: str = "/ping"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"serve-{self.port}.log"
        conf = folder / f"serve-{self.port}.yaml"
        conf.write_text("serve:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in (serve or {}).items()))
        full_env = {k: v for k, v in os.environ.items() if k not in (FAULTS_ENV, "PROMETHEUS_MULTIPROC_DIR")}
        full_env.update(env or {})
        if model_config:
            full_env["SERVING_MODEL_CONFIG"] = json.dumps(model_config)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "clip_pyfunc.cli", "serve", "--conf", str(conf),
                                      "--model-uri", uri, "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=full_env,
                                     start_new_session=True)
        wait_ready(self.url, self.proc, self.log, path=ready_path)

    def post(self, body, headers=None, timeout=60, **kw):
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return requests.post(f"{self.url}/invocations", data=data, headers=headers or {}, timeout=timeout, **kw)

    def metrics(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def sample(self, name, **labels) -> float:
        return sum(v for (n, ls), v in self.metrics().items()
                   if n == name and all((k, w) in ls for k, w in labels.items()))

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def image_server(registered, tmp_path_factory):
    server = Server(registered["models"]["image"]["uri"], tmp_path_factory.mktemp("platform"),
                    serve={"max_body_bytes": BODY_LIMIT})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def text_server(registered, tmp_path_factory):
    server = Server(registered["models"]["text"]["uri"], tmp_path_factory.mktemp("platform"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(registered):
    import mlflow

    return {kind: mlflow.pyfunc.load_model(registered["models"][kind]["uri"]) for kind in ("image", "text")}


def _error(r) -> dict:
    """MLflow's JSON error shape, checked: error_code and a message, no traceback."""
    body = r.json()
    assert set(body) >= {"error_code", "message"} and "Traceback" not in r.text, r.text[:300]
    return body


# ---------------------------------------------------------------- 1. headers a real client sends


RECORDS = json.dumps({"dataframe_records": [{"input": x} for x in IMAGES[:2]]})


@pytest.mark.parametrize("content_type", [None, "Application/JSON", 'application/json; charset="utf-8"',
                                          "APPLICATION/json;CHARSET=UTF-8", "application/json ; charset=utf8",
                                          'application/json; charset="UTF-8"'])
def test_headers_a_client_may_send_are_answered_200(image_server, local, content_type):
    """No Content-Type (requests.post(url, data=...)), any case, quoted or spaced parameters: 200, same vectors."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = image_server.post(RECORDS, headers)
    assert r.status_code == 200, r.text[:300]
    want = local["image"].predict(pd.DataFrame({"input": IMAGES[:2]}))
    assert np.abs(np.asarray(r.json()["predictions"]) - want).max() <= 1e-6


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "GZIP", "gzip, identity"])
def test_compressed_bodies_are_inflated(image_server, local, coding):
    data = RECORDS.encode()
    packed = zlib.compress(data) if coding == "deflate" else gzip.compress(data)
    r = image_server.post(packed, {"Content-Type": "application/json", "Content-Encoding": coding})
    assert r.status_code == 200, r.text[:300]
    want = local["image"].predict(pd.DataFrame({"input": IMAGES[:2]}))
    assert np.abs(np.asarray(r.json()["predictions"]) - want).max() <= 1e-6


def test_a_csv_body_with_an_upper_case_media_type(image_server, local):
    r = image_server.post("input\n" + "\n".join(IMAGES[:2]) + "\n", {"Content-Type": "Text/CSV; Charset=UTF-8"})
    assert r.status_code == 200, r.text[:300]
    want = local["image"].predict(pd.DataFrame({"input": IMAGES[:2]}))
    assert np.abs(np.asarray(r.json()["predictions"]) - want).max() <= 1e-6


def _raw_post(port: int, head: bytes, body: bytes, timeout=30) -> tuple[int, bytes]:
    """One request on a raw socket (a chunked body when head says so): (status, body of the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"the server closed the connection without an answer: {got[:200]!r}")
            got += chunk
        header, _, rest = got.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"the server closed the connection {length - len(rest)} bytes short")
            rest += chunk
        return int(header.split()[1]), rest


@pytest.mark.parametrize("chunked", [False, True])
def test_a_gzip_bomb_is_413_as_it_inflates(image_server, chunked):
    """60 MB of zeros in 60 KB of gzip, against a 2 MB limit: 413 in MLflow's shape, and the server is fine."""
    bomb = gzip.compress(b"0" * 60_000_000, compresslevel=9)
    assert len(bomb) < BODY_LIMIT / 10
    base = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\n")
    if chunked:
        body = b"".join(b"%x\r\n%s\r\n" % (len(bomb[i:i + 8192]), bomb[i:i + 8192])
                        for i in range(0, len(bomb), 8192)) + b"0\r\n\r\n"
        head = base + b"Transfer-Encoding: chunked\r\n\r\n"
    else:
        body, head = bomb, base + b"Content-Length: %d\r\n\r\n" % len(bomb)
    status, answer = _raw_post(image_server.port, head, body)
    assert status == 413, answer[:300]
    message = json.loads(answer)
    assert message["error_code"] == "REQUEST_LIMIT_EXCEEDED" and "inflated" in message["message"], message
    assert image_server.post(RECORDS, {"Content-Type": "application/json"}).status_code == 200


@pytest.mark.parametrize("headers, status, says", [
    ({"Content-Type": "text/html"}, 415, "application/json"),
    ({"Content-Type": "json"}, 415, "application/json"),
    ({"Content-Type": "application/json; charset=latin-1"}, 415, "UTF-8"),
    ({"Content-Type": "application/json; format=pandas-split"}, 415, "charset"),
    ({"Content-Type": 'application/json; charset="utf-8'}, 415, "quoted"),
    ({"Content-Type": "application/json", "Content-Encoding": "br"}, 415, "gzip"),
    ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, 400, "gzip"),  # not gzip at all
])
def test_headers_that_cannot_be_read_are_4xx_naming_what_to_send(image_server, headers, status, says):
    r = image_server.post(RECORDS, headers)
    assert r.status_code == status, r.text[:300]
    assert says in _error(r)["message"], r.text[:300]


# ---------------------------------------------------------------- 2. misspelt params


@pytest.mark.parametrize("name", ["normalise", "Normalize", "normalized"])
@pytest.mark.parametrize("form", ["dataframe_records", "inputs", "instances", "dataframe_split"])
def test_a_misspelt_param_is_refused_by_name(image_server, name, form):
    payload = {"dataframe_records": [{"input": IMAGES[0]}], "inputs": {"input": [IMAGES[0]]},
               "instances": [{"input": IMAGES[0]}],
               "dataframe_split": {"columns": ["input"], "data": [[IMAGES[0]]]}}[form]
    r = image_server.post({form: payload, "params": {name: False}}, {"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    message = _error(r)["message"]
    assert name in message and "normalize" in message, message


def test_the_declared_param_still_works_and_a_text_model_refuses_misspelt_ones_too(image_server, text_server, local):
    r = image_server.post({"inputs": [IMAGES[0]], "params": {"normalize": False}})
    want = local["image"].predict([IMAGES[0]], params={"normalize": False})
    assert r.status_code == 200 and np.abs(np.asarray(r.json()["predictions"]) - want).max() <= 1e-6
    r = text_server.post({"inputs": ["a cat"], "params": {"normalise": False}})
    assert r.status_code == 400 and "normalise" in _error(r)["message"], r.text[:300]


# ---------------------------------------------------------------- 3. non-strings in a text request


@pytest.mark.parametrize("payload, values", [
    ({"inputs": ["a", 95120]}, ["a", 95120]),
    ({"inputs": {"input": ["a", True]}}, ["a", True]),
    ({"instances": [{"input": "a"}, {"input": 1.5}]}, ["a", 1.5]),
    ({"instances": ["a", "b", False]}, ["a", "b", False]),
    ({"dataframe_records": [{"input": "a"}, {"input": 7}]}, ["a", 7]),
    ({"dataframe_split": {"columns": ["input"], "data": [["a"], [{"x": 1}]]}}, ["a", {"x": 1}]),
    ({"dataframe_split": {"columns": ["id", "input"], "data": [[1, "a"], [2, [1, 2]]]}}, ["a", [1, 2]]),
])
def test_a_non_string_in_a_text_request_is_the_in_process_400(text_server, local, payload, values):
    """Every payload form: the 400 names the row, with the message predict gives in process."""
    from mlflow.exceptions import MlflowException

    r = text_server.post(payload)
    assert r.status_code == 400, r.text[:300]
    with pytest.raises(MlflowException) as in_process:
        local["text"].predict(pd.DataFrame({"input": pd.Series(values, dtype=object)}))
    assert _error(r)["message"] == in_process.value.message, (r.text, in_process.value.message)
    assert "row 1" in r.text or "row 2" in r.text


def test_strings_and_nulls_in_text_requests_are_the_models_to_answer(text_server, local):
    r = text_server.post({"inputs": ["a cat", "", "ünïcödé"]})
    assert r.status_code == 200, r.text[:300]
    want = local["text"].predict(["a cat", "", "ünïcödé"])
    assert np.abs(np.asarray(r.json()["predictions"]) - want).max() <= 1e-6
    r = text_server.post({"inputs": ["a cat", None]})
    assert r.status_code == 400 and "row 1" in _error(r)["message"] and "null" in r.text, r.text[:300]


# ---------------------------------------------------------------- 4. work for clients that are gone, and 504s

DELAY = 0.3  # seconds each forward sleeps (FAULTS_ENV delay_s)


@pytest.fixture(scope="module")
def slow_server(registered, tmp_path_factory):
    """Forwards of 2 rows that take >= 0.3 s each; requests time out (504) after 3 s."""
    server = Server(registered["models"]["image"]["uri"], tmp_path_factory.mktemp("platform"),
                    serve={"timeout": 3, "warmup": False}, env={FAULTS_ENV: json.dumps({"delay_s": DELAY})},
                    model_config={"batch_size": 2, "batch_wait_ms": 0})
    yield server
    server.stop()


def _until(condition, seconds=30.0):
    """Poll `condition` every 50 ms until it holds (a test's precondition, not a timing assertion)."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "the server never got there"
        time.sleep(0.05)


def _quiet(server, seconds=1.5, most=30):
    """Wait until the server embeds nothing more for `seconds`; the forwards run so far."""
    deadline, last, since = time.time() + most, None, time.time()
    while time.time() < deadline:
        now = server.sample("clip_pyfunc_forward_rows_count")
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= seconds:
            return now
        time.sleep(0.2)
    raise AssertionError("the server kept running forwards")


def test_rows_of_clients_that_disconnected_are_not_embedded(slow_server):
    """8 clients send 4 rows each (2 forwards each, 16 forwards in all) and give up after 0.5 s; then a
    lone request. What had not started is dropped: the lone request waits at most about one forward."""
    before = _quiet(slow_server)
    embedded_before = slow_server.sample("clip_pyfunc_rows_total", outcome="embedded")
    body = json.dumps({"inputs": IMAGES[:4]})

    def give_up():
        try:
            requests.post(f"{slow_server.url}/invocations", data=body,
                          headers={"Content-Type": "application/json"}, timeout=0.5)
        except requests.RequestException:
            pass

    clients = [threading.Thread(target=give_up) for _ in range(8)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    started = time.perf_counter()
    r = slow_server.post({"inputs": [IMAGES[0]]}, {"Content-Type": "application/json"})
    lone = time.perf_counter() - started
    assert r.status_code == 200, r.text[:300]
    forwards = _quiet(slow_server) - before
    # At most the forwards running when the clients gave up (one per 0.3 s of their 0.5 s, with margin),
    # and the lone request's own: before, all 16 ran.
    assert forwards <= 5, forwards
    assert lone < 2 * DELAY + 1.0, lone  # it waited for at most the forward running when it came
    embedded = slow_server.sample("clip_pyfunc_rows_total", outcome="embedded") - embedded_before
    assert embedded == 1, embedded  # the abandoned requests' rows are not counted as answered


def test_rows_of_a_request_answered_504_are_not_embedded(slow_server):
    """40 rows = 20 forwards of 0.3 s: the 3 s timeout answers 504 first; the forwards stop there."""
    before = _quiet(slow_server)
    started = time.perf_counter()
    r = slow_server.post({"inputs": IMAGES[:1] * 40}, {"Content-Type": "application/json"})
    assert r.status_code == 504 and time.perf_counter() - started < 5, (r.status_code, r.text[:200])
    forwards = _quiet(slow_server) - before
    assert forwards <= 3 / DELAY + 1, forwards  # the ones before the 504 (about 10 in 3 s), not one more
    assert slow_server.post({"inputs": [IMAGES[0]]}).status_code == 200


# ---------------------------------------------------------------- 7. a forward that hangs


def test_a_hanging_forward_turns_health_503_and_answers_waiting_callers_at_once(registered, tmp_path):
    """The first forward hangs 8 s: past stall_seconds (1 s) /health is 503 naming it, requests behind it
    and new ones are 503 at once; when it returns, health and requests recover by themselves."""
    server = Server(registered["models"]["image"]["uri"], tmp_path, serve={"stall_seconds": 1, "warmup": False},
                    env={FAULTS_ENV: json.dumps({"hang": 1, "hang_s": 8})})
    try:
        stuck: dict = {}
        first = threading.Thread(target=lambda: stuck.update(r=server.post({"inputs": [IMAGES[0]]})))
        first.start()
        _until(lambda: server.sample("clip_pyfunc_queue_wait_seconds_count") >= 1)  # its forward (the hang) began
        behind: dict = {}
        waiting = threading.Thread(target=lambda: behind.update(r=server.post({"inputs": [IMAGES[1]]}),
                                                                t=time.perf_counter()))
        waiting.start()
        time.sleep(1.5)  # past the 1 s limit
        health = requests.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and "stuck" in health.json()["message"], health.text
        assert requests.get(f"{server.url}/ping", timeout=5).status_code == 503
        assert server.sample("clip_pyfunc_healthy") == 0
        waiting.join(timeout=3)
        assert behind["r"].status_code == 503, behind["r"].text[:300]
        assert _error(behind["r"])["error_code"] == "TEMPORARILY_UNAVAILABLE"
        started = time.perf_counter()
        new = server.post({"inputs": [IMAGES[2]]})
        assert new.status_code == 503 and time.perf_counter() - started < 1.0, (new.status_code, new.text[:200])
        first.join(timeout=30)
        assert stuck["r"].status_code == 200, stuck["r"].text[:300]  # it finished after all
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
        assert server.post({"inputs": [IMAGES[3]]}).status_code == 200
        assert server.sample("clip_pyfunc_healthy") == 1
    finally:
        server.stop()


# ---------------------------------------------------------------- 8. SIGTERM during traffic


def _traffic(url: str, clients: int, stop: threading.Event, body: str) -> list[tuple[float, float, object]]:
    """Clients posting back to back until `stop`: (sent, answered, status or the exception's name)."""
    log: list = []

    def client():
        s = requests.Session()
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                status = s.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                                timeout=30).status_code
            except requests.RequestException as e:
                status = type(e).__name__
                time.sleep(0.05)
            log.append((sent, time.perf_counter(), status))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join()
    return log


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_accepted_requests_and_exits_in_time(registered, tmp_path, workers):
    """8 clients send continuously; SIGTERM to the main process only, as a container runtime sends it.
    Every request sent before the signal is answered 200; readiness is never 200 after it; the process
    exits within drain_seconds."""
    drain = 6
    server = Server(registered["models"]["image"]["uri"], tmp_path,
                    serve={"workers": workers, "drain_seconds": drain, "warmup": False},
                    env={FAULTS_ENV: json.dumps({"delay_s": 0.2})})
    try:
        if workers == 2:
            wait_ready(server.url, server.proc, server.log)
        stop, got = threading.Event(), []
        runner = threading.Thread(target=lambda: got.extend(_traffic(server.url, 8, stop,
                                                                    json.dumps({"inputs": [IMAGES[0]]}))))
        runner.start()
        time.sleep(2.0)
        signalled = time.perf_counter()
        os.kill(server.proc.pid, signal.SIGTERM)
        ready_after = []
        while server.proc.poll() is None and time.perf_counter() - signalled < drain + 5:
            try:
                ready_after.append(requests.get(f"{server.url}/ping", timeout=1).status_code)
            except requests.RequestException:
                ready_after.append("refused")
            time.sleep(0.1)
        exited = time.perf_counter() - signalled
        stop.set()
        runner.join()
        assert server.proc.poll() is not None and exited <= drain + 1, exited
        # Sent well before the signal: accepted, so answered 200. In the last 0.5 s a request on a keep-alive
        # connection may still be unread when uvicorn closes idle connections: not accepted, a connection
        # error for the client to retry, but never another status.
        before = [status for sent, _, status in got if sent < signalled - 0.5]
        assert len(before) >= 10 and all(status == 200 for status in before), before
        after = [status for sent, _, status in got if sent >= signalled - 0.5]
        assert all(status in (200, 503) or isinstance(status, str) for status in after), after
        assert 200 not in ready_after, ready_after
    finally:
        server.stop()


# ---------------------------------------------------------------- 9. overload


def test_overload_is_429_with_retry_after_and_answered_requests_stay_fast(registered, tmp_path):
    """Forwards of 4 rows take >= 0.2 s (20 rows/s at most). 32 clients send 2 rows each, back to back, for
    6 s: past max_queue_seconds (0.5 s of work) they get 429 with Retry-After at once; the answered ones
    keep a p99 near the bound, throughput stays at the unloaded batch rate, and a lone request after is 200."""
    server = Server(registered["models"]["image"]["uri"], tmp_path,
                    serve={"max_queue_seconds": 0.5, "warmup": False}, env={FAULTS_ENV: json.dumps({"delay_s": 0.2})},
                    model_config={"batch_size": 4, "batch_wait_ms": 0})
    try:
        body4, body2 = json.dumps({"inputs": IMAGES[:4]}), json.dumps({"inputs": IMAGES[:2]})
        started = time.perf_counter()
        for _ in range(5):  # the unloaded batch rate: full forwards, one at a time
            assert server.post(body4).status_code == 200
        batch_rate = 20 / (time.perf_counter() - started)
        results: list = []
        deadline = time.perf_counter() + 6

        def client():
            s = requests.Session()
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                r = s.post(f"{server.url}/invocations", data=body2, headers={"Content-Type": "application/json"},
                           timeout=60)
                results.append((r.status_code, time.perf_counter() - sent, r.headers.get("Retry-After")))
                if r.status_code == 429:
                    time.sleep(min(float(r.headers["Retry-After"]), 0.5))  # a client that honours it, briefly

        threads = [threading.Thread(target=client) for _ in range(32)]
        loaded = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - loaded
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        refused = [r for r in results if r[0] == 429]
        assert refused and all(r[2] and int(r[2]) >= 1 for r in refused), refused[:3]
        assert float(np.median([t for s, t, _ in refused])) < 0.2, "429 is answered at once, not after a wait"
        rows, forwards = (server.sample("clip_pyfunc_forward_rows_sum"), server.sample("clip_pyfunc_forward_rows_count"))
        assert rows / forwards >= 3.5, (rows, forwards)  # the queue kept the forwards full (4 rows)
        answered = sorted(t for s, t, _ in results if s == 200)
        p99 = answered[int(0.99 * (len(answered) - 1))]
        assert p99 <= 2.5, p99  # 0.5 s of queue, the forward running, and its own: not minutes
        rate = 2 * len(answered) / seconds
        # Throughput does not collapse under overload. Both rates are capped by the 0.2 s forwards (20 rows/s),
        # measured over 1 s unloaded and 6 s loaded (18.8-19.2 loaded in 5 runs; the unloaded up to 17.9):
        # 0.8 leaves room for a slow stretch of a shared machine, not for a queue that thrashes
        assert rate >= 0.8 * batch_rate, (rate, batch_rate)
        assert server.post(body2).status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------- 5. metrics and health of live workers only


def _children(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children()]


def test_metrics_describe_this_runs_live_workers_only(registered, tmp_path):
    """Two workers with the operator's PROMETHEUS_MULTIPROC_DIR: a worker made unhealthy and then killed
    (uvicorn starts another) no longer counts in `healthy`; its requests still count. A second run in the
    same folder reports none of the first run's requests. A folder the server made is gone after it stops."""
    folder = tmp_path / "prom"
    folder.mkdir()
    uri = registered["models"]["image"]["uri"]
    settings = {"workers": 2, "unhealthy_after": 1, "warmup": False}
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), FAULTS_ENV: json.dumps({"fail": 1000})}
    server = Server(uri, tmp_path, serve=settings, env=env)
    try:
        assert server.post({"inputs": [IMAGES[0]]}).status_code == 500  # the worker that took it is unhealthy
        assert server.sample("clip_pyfunc_healthy") == 0
        workers = _children(server.proc.pid)
        assert len(workers) >= 2, workers
        for pid in workers:  # kill both: whichever took the request is gone
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 120
        while time.time() < deadline and not set(_children(server.proc.pid)) - set(workers):
            time.sleep(0.5)
        wait_ready(server.url, server.proc, server.log)
        assert server.sample("clip_pyfunc_healthy") == 1, "a dead worker's gauge still counts"
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
        assert server.sample("clip_pyfunc_requests_total", path="/invocations") >= 1  # counters keep counting
    finally:
        os.kill(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=60)
    second = Server(uri, tmp_path, serve=settings, env=env)
    try:
        assert second.sample("clip_pyfunc_requests_total", path="/invocations") == 0
        assert second.sample("clip_pyfunc_healthy") == 1
    finally:
        second.stop()
    temp = tmp_path / "tmp"
    temp.mkdir()
    made = Server(uri, tmp_path, serve=settings, env={"TMPDIR": str(temp)})
    try:
        assert [p.name for p in temp.iterdir() if p.name.startswith("clip-pyfunc-metrics-")], list(temp.iterdir())
    finally:
        os.kill(made.proc.pid, signal.SIGTERM)
        made.proc.wait(timeout=60)
    assert not [p.name for p in temp.iterdir() if p.name.startswith("clip-pyfunc-metrics-")], list(temp.iterdir())


# ---------------------------------------------------------------- 10. the first request after start


def test_warm_up_runs_before_the_server_answers_and_is_not_counted(registered, tmp_path):
    """Each worker runs its warm-up requests before uvicorn reports startup complete, so the first request finds
    no first-use work; `serve.warmup: false` runs none. The warm-up's forwards are not requests: neither the rows
    counter nor the stage histograms see them. What the warm-up saves is a speed, measured by the serving
    benchmark in interleaved starts (docs/SERVING.md, "The first request after start"), not asserted here: one
    request's stage seconds on a shared 2-core machine drift more than the first-use cost (a warm server's first
    decode once took 25 ms against a cold server's 9 ms)."""
    body = {"dataframe_records": [{"input": IMAGES[0]}]}
    cold = Server(registered["models"]["image"]["uri"], tmp_path, serve={"warmup": False})
    try:
        assert cold.post(body).status_code == 200
        assert "startup complete" in cold.log.read_text() and "warm-up" not in cold.log.read_text()
    finally:
        cold.stop()
    server = Server(registered["models"]["image"]["uri"], tmp_path)
    try:
        for _ in range(21):
            assert server.post(body).status_code == 200
        log = server.log.read_text()
        assert "warm-up forwards done" in log and log.index("warm-up forwards done") < log.index("startup complete")
        assert "warm-up failed" not in log
        assert server.sample("clip_pyfunc_rows_total", outcome="embedded") == 21  # warm-up is not a request
        for stage in ("decode", "forward"):
            assert server.sample("clip_pyfunc_stage_seconds_count", stage=stage) == 21, stage
    finally:
        server.stop()


def test_the_serving_process_holds_no_registry_client(registered, tracking_uri, tmp_path):
    """`serve` finds the model in a forked child: MLflow's SQLAlchemy stores for a database registry (about
    1.1 s and 55 MiB, docs/BENCHMARKS.md) are never loaded in the process that serves."""
    import glob

    import sqlalchemy

    assert tracking_uri.startswith("sqlite:")  # the registry whose client is SQLAlchemy's
    package = os.path.dirname(sqlalchemy.__file__)
    # Python files are read, not mapped: the check sees SQLAlchemy's compiled extensions, which must be there
    assert glob.glob(os.path.join(package, "**", "*.so"), recursive=True), "SQLAlchemy without compiled extensions"
    server = Server(registered["models"]["image"]["uri"], tmp_path)
    try:
        assert server.post({"inputs": IMAGES[:1]}).status_code == 200
        with open(f"/proc/{server.proc.pid}/maps", encoding="utf-8") as f:  # Linux, as CI
            assert not [line for line in f if package in line]
    finally:
        server.stop()


def test_locating_a_model_answers_its_folder_or_one_line(registered, tracking_uri):
    """The forked lookup (in a fresh process, as `serve` runs it) answers the folder the registry names (in place:
    the store is on this disk), and for a URI with no model the one-line error naming the flag and the registry,
    as before the fork."""
    from clip_pyfunc.registry.lookup import local_artifacts

    code = ("import json, sys\n"
            "from mlflow.pyfunc import scoring_server\n"
            "from clip_pyfunc.errors import ModelLoadError\n"
            "from clip_pyfunc.serving.serve import Locating\n"
            "try:\n    print(json.dumps({'path': Locating(sys.argv[1], '--model-uri').path()}))\n"
            "except ModelLoadError as e:\n    print(json.dumps({'error': str(e)}))")

    def locate(uri: str) -> dict:
        out = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    uri = registered["models"]["image"]["uri"]
    assert locate(uri) == {"path": local_artifacts(uri)} and local_artifacts(uri)
    message = locate("models:/no_such_model@champion")["error"]
    assert "\n" not in message and "--model-uri models:/no_such_model@champion" in message, message
    assert tracking_uri in message and "not found" in message, message


def test_faults_are_read_from_the_environment_and_checked(monkeypatch):
    from clip_pyfunc.errors import ModelLoadError
    from clip_pyfunc.runtime.batching import Faults

    assert Faults.from_env({}) == Faults()
    assert Faults.from_env({FAULTS_ENV: '{"fail": 2, "delay_s": 0.5}'}) == Faults(fail=2, delay_s=0.5)
    for bad in ('{"fial": 1}', '{"fail": -1}', "[1]", "nope", '{"fail": true}'):
        with pytest.raises(ModelLoadError, match=FAULTS_ENV):
            Faults.from_env({FAULTS_ENV: bad})


def test_inflating_reads_every_gzip_member_and_refuses_what_is_not_its_coding():
    """A gzip body of several members is the members one after another (RFC 1952 2.2), not the first alone;
    bytes after a deflate stream, a cut stream, and output past the limit are refused, fed in any chunks."""
    from clip_pyfunc.serving.payload import Inflater, RequestRefused

    def inflate(codings, data, limit=10_000, chunk=5):
        inflater = Inflater(codings, limit)
        out = b"".join(inflater.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
        return out + inflater.finish()

    members = gzip.compress(b"input\na\n") + gzip.compress(b"b\nc\n")
    assert inflate(["gzip"], members) == b"input\na\nb\nc\n"
    assert inflate(["deflate", "gzip"], gzip.compress(zlib.compress(b"twice"))) == b"twice"
    assert inflate(["gzip"], gzip.compress(b"x" * 10_000), chunk=1) == b"x" * 10_000  # exactly the limit
    for codings, data, status in ((["gzip"], gzip.compress(b"x" * 10_001), 413),
                                  (["gzip"], gzip.compress(b"0" * 50_000_000), 413),
                                  (["deflate"], zlib.compress(b"abc") + b"more", 400),
                                  (["gzip"], gzip.compress(b"abc")[:-4], 400),
                                  (["gzip"], b"not gzip at all", 400)):
        with pytest.raises(RequestRefused) as e:
            inflate(codings, data)
        assert e.value.status == status, (codings, data[:20], e.value.message)


def test_a_deeply_nested_body_is_a_400_not_a_500(text_server, image_server):
    for server in (text_server, image_server):
        for body in ("[" * 200_000 + "]" * 200_000, '{"inputs": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001):
            r = server.post(body, {"Content-Type": "application/json"})
            assert r.status_code == 400 and "nests too deep" in _error(r)["message"], r.text[:300]
