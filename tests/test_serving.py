"""REST serving against real `mlflow models serve` subprocesses on loopback.

The image server runs `clip-pyfunc serve`, the text server plain `mlflow models serve`; both
load the models from the registry by alias.
"""

from __future__ import annotations

import json
import re
import os
import threading
import time

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from conftest import b64, encode, free_port, model_server, photo, start_server, stop_server, wait_ready
from clip_pyfunc.settings import ServeConfig, load_settings
from clip_pyfunc.registry import register_models
from clip_pyfunc.runtime.batching import FAULTS_ENV
from clip_pyfunc.serving.serve import serve_command, serve_env

pytestmark = [pytest.mark.serving]
LIMITS = {"max_rows": 16, "max_image_bytes": 300_000, "max_image_pixels": 1_000_000}


@pytest.fixture(scope="module")
def served_models(tiny_checkpoint, tracking_uri):
    """Register models with small limits (as operators set them in conf/) for the servers."""
    settings = load_settings(None, {"model": {"source": tiny_checkpoint},
                                    "registry": {"text_name": "serve_text", "image_name": "serve_image"},
                                    "runtime": LIMITS})
    return register_models(settings)


@pytest.fixture(scope="module")
def image_server(served_models, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("srv") / "image.log"
    proc = start_server(["clip-pyfunc", "serve", "--model-uri", served_models["models"]["image"]["uri"],
                   "--port", str(port), "--timeout", "30"], log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    yield {"url": url, "proc": proc}
    stop_server(proc)


@pytest.fixture(scope="module")
def text_server(served_models, tmp_path_factory):
    with model_server(served_models["models"]["text"]["uri"], tmp_path_factory.mktemp("srv") / "text.log") as (url, proc):
        yield {"url": url, "proc": proc}


@pytest.fixture(scope="module")
def local_image(served_models):
    import mlflow

    return mlflow.pyfunc.load_model(served_models["models"]["image"]["uri"])


def _invoke(url, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"},
                         timeout=60, **kw)


IMAGES = [b64(encode(photo(80, 60, s), "JPEG")) for s in range(3)]


PAYLOADS = {
    "dataframe_records": {"dataframe_records": [{"input": x} for x in IMAGES]},
    "dataframe_split": {"dataframe_split": {"columns": ["input"], "data": [[x] for x in IMAGES]}},
    "inputs": {"inputs": {"input": IMAGES}},
    "instances": {"instances": [{"input": x} for x in IMAGES]},
    # The same four with plain lists and other column names, as the guides send them.
    "inputs list": {"inputs": IMAGES},
    "instances list": {"instances": IMAGES},
    "dataframe_split renamed": {"dataframe_split": {"columns": ["image_base64"], "data": [[x] for x in IMAGES]}},
    "dataframe_records extra column": {"dataframe_records": [{"id": i, "input": x} for i, x in enumerate(IMAGES)]},
}


@pytest.mark.parametrize("form", sorted(PAYLOADS))
def test_payload_forms_equal_local_predict(image_server, local_image, form):
    body = PAYLOADS[form]
    r = _invoke(image_server["url"], body)
    assert r.status_code == 200, r.text[:500]
    got = np.asarray(r.json()["predictions"], dtype=np.float32)
    want = local_image.predict(pd.DataFrame({"input": IMAGES}))
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6


def test_params_block(image_server, local_image):
    r = _invoke(image_server["url"], {"dataframe_records": [{"input": IMAGES[0]}], "params": {"normalize": False}})
    assert r.status_code == 200, r.text[:500]
    want = local_image.predict(pd.DataFrame({"input": IMAGES[:1]}), params={"normalize": False})
    assert np.abs(np.asarray(r.json()["predictions"]) - want).max() <= 1e-6
    assert abs(np.linalg.norm(want) - 1.0) > 1e-3


def test_plain_mlflow_models_serve_text(text_server, served_models):
    import mlflow

    texts = ["a photo of a cat", "", "ünïcödé ✓"]
    r = _invoke(text_server["url"], {"dataframe_records": [{"input": t} for t in texts]})
    assert r.status_code == 200, r.text[:500]
    local = mlflow.pyfunc.load_model(served_models["models"]["text"]["uri"]).predict(pd.DataFrame({"input": texts}))
    assert np.abs(np.asarray(r.json()["predictions"]) - local).max() <= 1e-6
    plain = _invoke(text_server["url"], {"inputs": texts})  # the guide's list form
    assert plain.status_code == 200, plain.text[:500]
    assert np.abs(np.asarray(plain.json()["predictions"]) - local).max() <= 1e-6


def _big_blank_png():
    return b64(encode(Image.new("L", (1200, 1000)), "PNG"))  # 1.2 MP > 1 MP limit, tiny on the wire


BAD = {
    "invalid_base64": ({"dataframe_records": [{"input": IMAGES[0]}, {"input": "%%% not base64"}]},
                       ["row 1", "invalid base64"]),
    "not_an_image": ({"dataframe_records": [{"input": b64(b"just some text")}]}, ["row 0", "not an image"]),
    "over_pixels": ({"dataframe_records": [{"input": _big_blank_png()}]},
                    ["row 0", "1200x1000 = 1200000 pixels, over the limit of 1000000"]),
    "over_bytes": ({"dataframe_records": [{"input": b64(os.urandom(400_000))}]},
                   ["row 0", "over the limit of 300000 bytes"]),
    "null_input": ({"dataframe_records": [{"input": IMAGES[0]}, {"input": None}]}, ["row 1", "null"]),
    "wide_frame_without_input": ({"dataframe_records": [{"image": IMAGES[0], "id": 1}]},
                                 ["expected a column 'input'", "['image', 'id']"]),
    "too_many_rows": ({"dataframe_records": [{"input": IMAGES[0]}] * 17}, ["17 rows, over the limit of 16"]),
    # (MLflow drops params the signature does not declare, with a warning; a wrong type is refused.)
    "bad_param_type": ({"dataframe_records": [{"input": IMAGES[0]}], "params": {"normalize": "maybe"}},
                       ["normalize"]),
    "malformed_json": ('{"dataframe_records": [{"input": ', ["valid JSON"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_are_4xx_with_actionable_message(image_server, case):
    body, needles = BAD[case]
    r = _invoke(image_server["url"], body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    err = r.json()
    assert err["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    for needle in needles:
        assert needle in err["message"], err["message"][:500]
    assert "Traceback" not in r.text and "stack_trace" not in err
    ok = _invoke(image_server["url"], {"dataframe_records": [{"input": IMAGES[0]}]})
    assert ok.status_code == 200


def test_health_endpoints(image_server):
    import mlflow

    for path in ("/ping", "/health"):
        assert requests.get(image_server["url"] + path, timeout=5).status_code == 200
    r = requests.get(image_server["url"] + "/version", timeout=5)
    assert r.status_code == 200 and mlflow.__version__ in r.text


def test_serve_command_passes_settings_through():
    cmd = serve_command("models:/m@a", ServeConfig(host="0.0.0.0", port=8080, workers=3, timeout=7))
    assert cmd[1:5] == ["-m", "mlflow", "models", "serve"]
    joined = " ".join(cmd)
    for part in ("--model-uri models:/m@a", "--host 0.0.0.0", "--port 8080", "--workers 3", "--timeout 7",
                 "--env-manager local"):
        assert part in joined


def test_serve_env_splits_the_cores_between_workers():
    cores = os.cpu_count() or 1
    assert ServeConfig().workers == 1  # requests share its forwards (docs/SERVING.md)
    assert serve_env(ServeConfig(workers=2), {})["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert serve_env(ServeConfig(workers=1), {})["OMP_NUM_THREADS"] == str(cores)
    assert serve_env(ServeConfig(workers=64), {})["OMP_NUM_THREADS"] == "1"
    assert serve_env(ServeConfig(), {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # the operator's wins


def _tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def test_load_mixed_good_and_bad_requests(image_server, local_image):
    """4 clients for ~12 s: every good request its right vector, every bad one a 4xx, no 5xx, flat RSS."""
    url, proc = image_server["url"], image_server["proc"]
    good = [b64(encode(photo(70 + s, 50, s), "JPEG")) for s in range(4)]
    want = local_image.predict(pd.DataFrame({"input": good}))
    bad = [b64(b"not an image"), "%%%", None]
    for _ in range(20):  # warm up allocator pools before the baseline
        _invoke(url, {"dataframe_records": [{"input": g} for g in good]})
    rss_before = _tree_rss_mb(proc.pid)
    results, lock = [], threading.Lock()

    def client(seed: int):
        rng = np.random.default_rng(seed)
        deadline = time.time() + 12
        with requests.Session() as s:
            for i in range(400):  # bounded in count and time
                if time.time() > deadline:
                    break
                if rng.random() < 0.3:
                    body, expect = {"dataframe_records": [{"input": bad[i % 3]}]}, None
                else:
                    k = int(rng.integers(0, 4))
                    body, expect = {"dataframe_records": [{"input": good[k]}]}, k
                r = s.post(f"{url}/invocations", data=json.dumps(body),
                           headers={"Content-Type": "application/json"}, timeout=60)
                with lock:
                    results.append((expect, r.status_code, r.json()))

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    rss_after = _tree_rss_mb(proc.pid)
    print(f"load: {len(results)} requests, server RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")
    assert len(results) > 40
    for expect, status, payload in results:
        if expect is None:
            assert 400 <= status < 500, (status, payload)
        else:
            assert status == 200, payload
            assert np.abs(np.asarray(payload["predictions"][0]) - want[expect]).max() <= 1e-6
    assert rss_after - rss_before < 100, (rss_before, rss_after)


def test_query_endpoint_notebook(image_server, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CLIP_ENDPOINT", image_server["url"])
    path = os.path.join(os.path.dirname(__file__), "..", "notebooks", "03_query_endpoint.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert "(4, 32)" in str(nb.cells[2].outputs)  # the 4 sample images
    assert "400" in str(nb.cells[3].outputs) and "row 0" in str(nb.cells[3].outputs)


# ---------------------------------------------------------------- the edge: protocol, /metrics, 413, health


@pytest.fixture(scope="module")
def plain_image_server(served_models, tmp_path_factory):
    """The same image model under plain `mlflow models serve`, to compare the protocol with."""
    with model_server(served_models["models"]["image"]["uri"], tmp_path_factory.mktemp("srv") / "plain.log") as (
            url, proc):
        yield url


EDGE_LIMIT = 200_000


@pytest.fixture(scope="module")
def edge_server(served_models, tmp_path_factory):
    """`clip-pyfunc serve`, 1 worker, a small body limit, unhealthy after 2 failures, the first 3 forwards
    failing on purpose (CLIP_PYFUNC_FAULTS), and a batch wait so that concurrent requests share."""
    root = tmp_path_factory.mktemp("edge")
    conf = root / "serve.yaml"
    # no warm-up: its forwards would take the injected failures
    conf.write_text(f"serve:\n  max_body_bytes: {EDGE_LIMIT}\n  unhealthy_after: 2\n  workers: 1\n  warmup: false\n")
    port = free_port()
    env = {"SERVING_MODEL_CONFIG": json.dumps({"batch_wait_ms": 100}), FAULTS_ENV: json.dumps({"fail": 3})}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = start_server(["clip-pyfunc", "serve", "--conf", str(conf), "--model-uri",
                             served_models["models"]["image"]["uri"], "--port", str(port)], root / "edge.log")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, root / "edge.log")
    yield {"url": url, "proc": proc, "log": root / "edge.log"}
    stop_server(proc)


def _metrics(url) -> dict:
    """{(name, labels as a sorted tuple): value} from a real scrape of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _sample(metrics, name, **labels):
    found = [v for (n, ls), v in metrics.items() if n == name and all((k, v_) in ls for k, v_ in labels.items())]
    return sum(found)


BAD_FORMS = {
    "bad base64": {"dataframe_records": [{"input": "%%%"}]},
    "not an image": {"dataframe_records": [{"input": b64(b"not an image")}]},
    "null": {"dataframe_records": [{"input": None}]},
    "malformed json": '{"dataframe_records": [',
    "unknown param": {"dataframe_records": [{"input": IMAGES[0]}], "params": {"nope": 1}},
    "wrong column": {"dataframe_records": [{"a": IMAGES[0], "b": IMAGES[1]}]},
}


def test_protocol_is_mlflows_byte_for_byte(image_server, plain_image_server):
    """Every payload form, good and bad, and /version: the same status, content type and body bytes as
    plain `mlflow models serve` of the same model, except an unknown param (refused by our edge) (vectors: the same JSON with numbers equal to 2e-6)."""
    forms = {**PAYLOADS, **BAD_FORMS, "params": {"dataframe_records": [{"input": IMAGES[0]}],
                                                 "params": {"normalize": False}}}
    for name, body in sorted(forms.items()):
        ours, theirs = _invoke(image_server["url"], body), _invoke(plain_image_server, body)
        if name == "unknown param":  # where the edge differs on purpose: MLflow drops it, ours is a 400 naming it
            assert theirs.status_code == 200 and ours.status_code == 400 and "nope" in ours.json()["message"]
            continue
        assert (ours.status_code, ours.headers["content-type"]) == (theirs.status_code,
                                                                    theirs.headers["content-type"]), name
        if ours.status_code == 200:  # the floats may differ in the last bits (threads per worker differ)
            mine, plain = ours.json(), theirs.json()
            assert list(mine) == list(plain) == ["predictions"], name
            np.testing.assert_allclose(mine["predictions"], plain["predictions"], atol=2e-6)
            assert re.sub(rb"-?\d[\d.e+-]*", b"0", ours.content) == re.sub(rb"-?\d[\d.e+-]*", b"0", theirs.content)
        else:
            assert ours.content == theirs.content, (name, ours.content[:300], theirs.content[:300])
    for path in ("/version", "/ping"):
        ours, theirs = requests.get(image_server["url"] + path), requests.get(plain_image_server + path)
        assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content), path


def test_metrics_are_scraped(image_server):
    """Requests, rows by outcome, bad rows by kind, stage latencies, forward sizes and queue waits, with the
    engine and precision as labels."""
    url = image_server["url"]
    before = _metrics(url)
    for _ in range(3):
        assert _invoke(url, PAYLOADS["dataframe_records"]).status_code == 200
    assert _invoke(url, BAD_FORMS["bad base64"]).status_code == 400
    assert _invoke(url, {"dataframe_records": [{"input": IMAGES[0]}, {"input": b64(b"not an image")}]}
                   ).status_code == 400
    after = _metrics(url)

    def grew(name, **labels):
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert grew("clip_pyfunc_requests_total", path="/invocations", status="200") == 3
    assert grew("clip_pyfunc_requests_total", path="/invocations", status="400") == 2
    assert grew("clip_pyfunc_request_seconds_count", path="/invocations") == 5
    assert grew("clip_pyfunc_rows_total", model="image", outcome="embedded") == 9
    assert grew("clip_pyfunc_rows_total", model="image", outcome="refused") == 1
    assert grew("clip_pyfunc_bad_rows_total", kind="base64") == 1
    assert grew("clip_pyfunc_bad_rows_total", kind="not_an_image") == 1
    for stage in ("decode", "preprocess", "forward"):
        assert grew("clip_pyfunc_stage_seconds_count", stage=stage) >= 3, stage
    assert grew("clip_pyfunc_forward_rows_sum") == 9
    assert grew("clip_pyfunc_queue_wait_seconds_count") >= 3
    labels = dict(next(ls for (n, ls) in after if n == "clip_pyfunc_forward_rows_count"))
    assert labels["engine"] in ("torch", "openvino") and labels["precision"] == "fp32", labels
    assert _sample(after, "clip_pyfunc_healthy") == 1


def _raw(url: str, head: bytes, body_parts=(), timeout=30) -> tuple[int, bytes, float]:
    """Send a request by hand (headers, then body parts until the server answers or closes): (status, body,
    seconds). The server may answer before the body is sent, as a 413 does."""
    import socket as socket_
    from urllib.parse import urlparse

    parts = urlparse(url)
    started = time.perf_counter()
    with socket_.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except OSError:  # the server answered and closed: stop sending
                break
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                re.search(rb"content-length: (\d+)", data.lower()).group(1)):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1], time.perf_counter() - started


def test_a_body_over_the_limit_is_413_before_it_is_read(image_server):
    """400 MB declared: 413 with MLflow's error shape after 64 KiB were sent, and the server's memory stays."""
    url, proc = image_server["url"], image_server["proc"]
    rss = _tree_rss_mb(proc.pid)
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400000000\r\n\r\n")
    status, body, _ = _raw(url, head, [b'{"dataframe_records": [{"input": "' + b"A" * 65536])
    assert status == 413, body
    error = json.loads(body)
    assert error["error_code"] == "REQUEST_LIMIT_EXCEEDED" and "max_body_bytes" in error["message"], error
    assert "400000000" in error["message"]
    assert _tree_rss_mb(proc.pid) - rss < 20
    assert _invoke(url, PAYLOADS["inputs"]).status_code == 200  # and it keeps serving


def test_a_chunked_body_over_the_limit_is_413(edge_server):
    url = edge_server["url"]
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"A" * 50_000
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 10 + [b"0\r\n\r\n"]
    status, body, _ = _raw(url, head, parts)
    assert status == 413 and b"passed the limit of 200000 bytes (serve.max_body_bytes)" in body, body
    time.sleep(0.5)
    assert "Traceback" not in open(edge_server["log"]).read()  # the cut-off body is not an application error
    small = json.dumps(BAD_FORMS["not an image"]).encode()  # no forward: the injected failures stay
    status, body, _ = _raw(url, head, [b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)])
    assert status == 400 and b"row 0" in body, body  # under the limit it reaches the model


def test_health_turns_503_after_engine_failures_and_recovers(edge_server):
    """The first 3 forwards fail (injected): health stays 200 after 1, is 503 from 2 on (unhealthy_after),
    and is 200 again once a prediction succeeds. Bad input never counts."""
    url = edge_server["url"]
    body = {"dataframe_records": [{"input": IMAGES[0]}]}
    assert _invoke(url, BAD_FORMS["not an image"]).status_code == 400  # the caller's fault: still healthy
    statuses = []
    for _ in range(4):
        r = _invoke(url, body)
        statuses.append((r.status_code, requests.get(f"{url}/health").status_code,
                         requests.get(f"{url}/ping").status_code))
        health = requests.get(f"{url}/health")
        if health.status_code == 503:
            assert health.json()["error_code"] == "TEMPORARILY_UNAVAILABLE", health.text
            assert "injected engine failure" in health.json()["message"], health.text
        if r.status_code != 200:
            assert "Traceback" not in r.text and "injected engine failure" in r.json()["message"], r.text[:500]
            assert r.json()["error_code"] == "INTERNAL_ERROR"
    assert statuses[0][0] == 500 and statuses[0][1:] == (200, 200), statuses
    assert statuses[1][0] == 500 and statuses[1][1:] == (503, 503), statuses
    assert statuses[2][0] == 500 and statuses[2][1:] == (503, 503), statuses
    assert statuses[3] == (200, 200, 200), statuses
    metrics = _metrics(url)
    assert _sample(metrics, "clip_pyfunc_model_failures_total") == 3
    assert _sample(metrics, "clip_pyfunc_requests_total", path="/health", status="503") == 4  # 2 asks a round


def test_concurrent_served_requests_share_forwards_and_get_their_own_answers(edge_server, local_image):
    """12 clients at once, good and bad: each answer is its own in-process predict, and forwards were shared."""
    url = edge_server["url"]
    _invoke(url, {"dataframe_records": [{"input": IMAGES[0]}]})  # past any injected failure
    good = [b64(encode(photo(60 + 9 * s, 50 + 4 * s, s), "JPEG")) for s in range(6)]
    bodies = []
    for i in range(12):
        rows = [good[(i + j) % 6] for j in range(1 + i % 3)]
        if i % 4 == 3:
            rows.append("%%%")
        bodies.append(({"dataframe_records": [{"input": r} for r in rows], "params": {"normalize": i % 5 != 2}},
                       rows))
    before = _metrics(url)
    barrier = threading.Barrier(len(bodies))
    got = [None] * len(bodies)

    def client(i):
        barrier.wait()
        got[i] = _invoke(url, bodies[i][0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, ((body, rows), r) in enumerate(zip(bodies, got)):
        if "%%%" in rows:
            assert r.status_code == 400 and f"row {len(rows) - 1}" in r.json()["message"], (i, r.text[:300])
            continue
        assert r.status_code == 200, (i, r.text[:300])
        want = local_image.predict(pd.DataFrame({"input": rows}), params=body["params"])
        np.testing.assert_allclose(np.asarray(r.json()["predictions"], dtype=np.float32), want, atol=2e-6)
    after = _metrics(url)
    forwards = _sample(after, "clip_pyfunc_forward_requests_count") - _sample(before, "clip_pyfunc_forward_requests_count")
    calls = _sample(after, "clip_pyfunc_forward_requests_sum") - _sample(before, "clip_pyfunc_forward_requests_sum")
    assert calls == 9 and forwards < calls, (forwards, calls)  # the 3 requests with a bad row run no forward
