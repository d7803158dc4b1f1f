"""REST serving against real `mlflow models serve` subprocesses on loopback.

The image server runs `clip-pyfunc serve`, the text server plain `mlflow models serve`; both
load the models from the registry by alias.
"""

from __future__ import annotations

import json
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
    assert ServeConfig().workers == 2  # the layout that served more on 2 cores (docs/SERVING.md)
    assert serve_env(ServeConfig(), {})["OMP_NUM_THREADS"] == str(max(1, cores // 2))
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
