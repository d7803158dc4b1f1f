"""Index, search, duplicates and the app, end to end on the trained toy checkpoint.

A folder of generated shape images is embedded by the real Spark job (`clip-pyfunc embed-table`),
indexed in the embedded store, Qdrant Edge (`clip-pyfunc index`), searched from the CLI, and served by
`clip-pyfunc app` (real uvicorn) that a real chromium drives through the web page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import free_port, start_server, stop_server, wait_ready

from clip_pyfunc.settings import load_settings
from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.search.index import index_table
from clip_pyfunc.search.query import duplicate_groups
from clip_pyfunc.search.store import EdgeStore, IndexRefused, open_store
from clip_pyfunc.settings import IndexConfig
from clip_pyfunc.registry import register_classifier, register_models
from clip_pyfunc.dev.samples import sample_image
from clip_pyfunc.dev.toy_checkpoint import LABELS, draw

pytestmark = [pytest.mark.spark]
PER_LABEL = 3
API_KEY = "s3cret-key"
LABELS_FILE = os.path.join(os.path.dirname(__file__), "..", "conf", "labels", "toy_shapes.yaml")
WEARABLES_FILE = os.path.join(os.path.dirname(__file__), "..", "conf", "labels", "wearables.yaml")


def _cli(*args, timeout=600):
    out = subprocess.run(["clip-pyfunc", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _cli_error(*args, timeout=120) -> str:
    """A command refused: exit 2 and one line on stderr, no traceback; that line."""
    out = subprocess.run(["clip-pyfunc", *args], capture_output=True, text=True, timeout=timeout)
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def space(toy_checkpoint, tracking_uri):
    """The toy checkpoint's text and image models, and its classifier over the 15 toy labels."""
    models = register_models(load_settings(None, {"model": {"source": toy_checkpoint}, "registry": {
        "text_name": "search_text", "image_name": "search_image"}}))
    classifier = register_classifier(load_settings(None, {"model": {"source": toy_checkpoint},
                                                          "classifier": {"name": "search_classifier"}}), LABELS_FILE)
    return {"image": models["models"]["image"]["uri"], "text": models["models"]["text"]["uri"],
            "classifier": classifier["models"]["classifier"]["uri"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 images of each toy label, named after it (red-circle-0.png), and one exact copy."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(7)
    for label in LABELS:
        for i in range(PER_LABEL):
            img, _ = draw(*label.split(), rng)
            img.save(root / f"{label.replace(' ', '-')}-{i}.png")
    shutil.copy(root / "green-square-0.png", root / "copy-of-green-square-0.png")
    return root


@pytest.fixture(scope="module")
def indexed(space, folder, tmp_path_factory):
    """embed-table (Spark) on the folder, then `clip-pyfunc index` into the embedded store."""
    work = tmp_path_factory.mktemp("index")
    table = str(work / "shapes.parquet")
    _cli("embed-table", "--model-uri", space["image"], "--input", str(folder), "--output", table, "--master", "local[2]")
    report = json.loads(_cli("index", "--input", table, "--model-uri", space["image"],
                             "--index-path", str(work / "qdrant"), "--collection", "shapes").stdout)
    return {"table": table, "path": str(work / "qdrant"), "report": report}


def _search(indexed, *args):
    out = _cli("search", "--index-path", indexed["path"], "--collection", "shapes", *args)
    return [json.loads(line) for line in out.stdout.splitlines()]


def _label_of(item_id: str) -> str:
    return re.sub(r"-\d+\.png$", "", os.path.basename(item_id)).replace("copy-of-", "").replace("-", " ")


def test_index_report_and_rerun_upserts(indexed, space):
    report = indexed["report"]
    n = len(LABELS) * PER_LABEL + 1
    assert (report["rows"], report["indexed"], report["skipped"], report["added"], report["points"]) == (n, n, 0, n, n)
    assert report["filter_fields"] == {}  # embed-table's payload is the path only, left unindexed
    with open_store(IndexConfig(path=indexed["path"], collection="shapes")) as store:
        again = index_table(store, indexed["table"], space["image"], progress=False)
        assert (again["added"], again["updated"], again["points"]) == (0, n, n)
        held = store.space()
        assert held.model_uri.startswith("models:/search_image/") and held.embedding_dim > 0
        assert set(held.models) >= {"text", "image"}


def test_changed_rows_update_errors_are_skipped_and_payload_kept(indexed, space, tmp_path):
    table = pd.read_parquet(indexed["table"]).sort_values("path").reset_index(drop=True)
    table["title"] = [_label_of(p) for p in table["path"]]
    table.loc[0, "error"] = "row 0: bytes are not an image"
    table.loc[0, "embedding"] = None
    path = str(tmp_path / "t.parquet")
    table.to_parquet(path)
    with EdgeStore(str(tmp_path / "q"), "c") as store:
        first = index_table(store, path, space["image"], progress=False)
        assert (first["indexed"], first["skipped"], first["added"]) == (len(table) - 1, 1, len(table) - 1)
        assert first["filter_fields"] == {"title": "keyword"}
        changed = table.iloc[1:3].copy()
        changed["title"] = "renamed"
        changed.to_parquet(path)
        second = index_table(store, path, space["image"], progress=False)
        assert (second["added"], second["updated"], second["points"]) == (0, 2, len(table) - 1)
        point = store.retrieve([changed["path"].iloc[0]])[0]
        assert point.payload["title"] == "renamed" and point.id == changed["path"].iloc[0]
        assert store.payload_indexes == {"title": "keyword"}


def test_vectors_of_another_space_are_refused(indexed, registered):
    """The tiny random CLIP's vectors (another run, another dimension) may not enter the toy collection."""
    with open_store(IndexConfig(path=indexed["path"], collection="shapes")) as store, pytest.raises(IndexRefused) as e:
        index_table(store, indexed["table"], registered["models"]["image"]["uri"], progress=False)
    assert "another embedding space" in str(e.value) and "search_image" in str(e.value)
    assert "clip_image_embedding" in str(e.value)


def test_search_by_words_finds_the_right_items_first(indexed):
    """Every toy label: the best hit shows it, and most of the top 3 do (the toy is 0.95 accurate, not perfect)."""
    from clip_pyfunc.search.query import Searcher

    with open_store(IndexConfig(path=indexed["path"], collection="shapes")) as store:
        searcher = Searcher(store)
        right = {label: [_label_of(h["id"]) == label for h in searcher.search(text=f"a {label}", k=3)]
                 for label in LABELS}
    assert all(hits[0] for hits in right.values()), right
    assert np.mean([np.mean(hits) for hits in right.values()]) >= 0.8, right


def test_cli_search_by_text_image_and_like(indexed, folder):
    hits = _search(indexed, "--text", "a red circle", "--k", "3")
    assert len(hits) == 3 and _label_of(hits[0]["id"]) == "red circle", hits
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert set(hits[0]) == {"id", "score", "payload"} and hits[0]["payload"]["path"] == hits[0]["id"]
    hits = _search(indexed, "--image", str(folder / "yellow-triangle-1.png"), "--k", "3")
    assert _label_of(hits[0]["id"]) == "yellow triangle" and hits[0]["score"] > 0.999
    like = [h for h in _search(indexed, "--like", hits[0]["id"], "--k", "2")]
    assert hits[0]["id"] not in [h["id"] for h in like] and _label_of(like[0]["id"]) == "yellow triangle"
    target = hits[1]["id"]
    filtered = _search(indexed, "--text", "a red circle", "--filter", f"path={target}")
    assert [h["id"] for h in filtered] == [target]


def test_filters_parse_numbers_and_booleans_only_when_they_are():
    from clip_pyfunc.search.query import parse_filters

    assert parse_filters(["size=-5", "sale=True", "code=--5", "sup=²", "a=b=c"]) == [
        ("size", ["-5", -5]), ("sale", ["True", True]), ("code", ["--5"]), ("sup", ["²"]), ("a", ["b=c"])]
    with pytest.raises(InvalidInput, match="must be key=value"):
        parse_filters(["=x"])


def test_bad_queries_are_named(indexed):
    out = subprocess.run(["clip-pyfunc", "search", "--index-path", indexed["path"], "--collection", "nope",
                          "--text", "x"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no collection 'nope'" in out.stderr and out.stdout == ""
    out = subprocess.run(["clip-pyfunc", "search", "--index-path", indexed["path"], "--collection", "shapes",
                          "--text", "x", "--like", "y"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "exactly one of text, image or like" in out.stderr


def test_app_refuses_an_index_of_another_space(indexed, registered, tmp_path):
    """The conf's models (the tiny random CLIP) may not query the toy collection: the app says so and stops."""
    copy = str(tmp_path / "qdrant")
    shutil.copytree(indexed["path"], copy)  # the app fixture may hold the original
    line = _cli_error("app", "--index-path", copy, "--collection", "shapes", "--no-classifier",
                      "--port", str(free_port()))
    assert "another embedding space" in line and "search_image" in line, line
    assert all(hint in line for hint in ("--text-name", "--no-index")), line


def test_duplicates(indexed, folder):
    groups = [json.loads(line) for line in _cli("duplicates", "--index-path", indexed["path"], "--collection",
                                                 "shapes", "--threshold", "0.999").stdout.splitlines()]
    copies = [g for g in groups if any("copy-of-green-square-0" in i for i in g["ids"])]
    assert len(copies) == 1 and copies[0]["max_score"] > 0.999
    assert {os.path.basename(i) for i in copies[0]["ids"]} >= {"green-square-0.png", "copy-of-green-square-0.png"}
    with open_store(IndexConfig(path=indexed["path"], collection="shapes")) as store:
        with pytest.raises(InvalidInput, match=r"threshold must be a cosine similarity in \[-1, 1\]"):
            duplicate_groups(store, threshold=1.5)
        with pytest.raises(InvalidInput, match="k must be a whole number"):
            duplicate_groups(store, k=0)


# ---------------------------------------------------------------- the app


@pytest.fixture(scope="module")
def app(indexed, space, tmp_path_factory):
    """`clip-pyfunc app` (uvicorn) on loopback, with an API key."""
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    proc = start_server(["clip-pyfunc", "app", "--index-path", indexed["path"], "--collection", "shapes",
                         "--text-name", "search_text", "--image-name", "search_image",
                         "--classifier", space["classifier"], "--port", str(port), "--api-key", API_KEY], log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log, path="/health")
    yield {"url": url, "log": log}
    stop_server(proc)


def _post(app, path, key=API_KEY, **kw):
    headers = {"X-API-Key": key} if key else {}
    headers.update(kw.pop("headers", {}))
    return requests.post(f"{app['url']}{path}", headers=headers, timeout=60, **kw)


def test_app_embeddings_equal_direct_predict(app, folder, space):
    image_bytes = (folder / "red-circle-0.png").read_bytes()
    r = _post(app, "/embeddings", files={"photo": ("a.png", image_bytes, "image/png")},
              data={"caption": "a red circle", "other": "a blue square"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["embeddings"]) == ["caption", "other", "photo"] or set(body["embeddings"]) == {
        "caption", "other", "photo"}
    image = mlflow.pyfunc.load_model(space["image"]).predict([image_bytes])[0]
    text = mlflow.pyfunc.load_model(space["text"]).predict(["a red circle"])[0]
    np.testing.assert_allclose(body["embeddings"]["photo"], image, atol=1e-6)
    np.testing.assert_allclose(body["embeddings"]["caption"], text, atol=1e-6)


def test_app_refuses_a_field_it_does_not_read(app, folder):
    """A misspelt `topk` or `kk` is named with the fields the endpoint reads, not silently ignored."""
    image = (folder / "red-circle-0.png").read_bytes()
    r = _post(app, "/classify", files={"image": ("a.png", image, "image/png")}, data={"topk": "1"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "topk", r.text
    assert "top_k" in r.json()["error"]["message"]
    r = _post(app, "/search", data={"text": "a red circle", "kk": "3"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "kk" and "k, filter" in r.text, r.text
    assert _post(app, "/search", data={"text": "a red circle", "k": "3"}).status_code == 200


def test_app_classify_and_search(app, folder, space):
    """/classify answers what the registered classifier answers, and names most toy images right."""
    classifier = mlflow.pyfunc.load_model(space["classifier"])
    right = []
    for label in LABELS:
        image = (folder / f"{label.replace(' ', '-')}-0.png").read_bytes()
        r = _post(app, "/classify", files={"image": ("x.png", image, "image/png")})
        assert r.status_code == 200, r.text
        top = r.json()["top_categories"]
        direct = classifier.predict([image], params={"top_k": 3})
        assert [t["label"] for t in top] == list(direct["labels"][0])
        np.testing.assert_allclose([t["score"] for t in top], direct["scores"][0], atol=1e-6)
        right.append(top[0]["label"] == label)
    assert np.mean(right) >= 0.8, right
    r = _post(app, "/search", data={"text": "a green circle", "k": "3"})
    assert _label_of(r.json()["results"][0]["id"]) == "green circle" and len(r.json()["results"]) == 3
    assert all(h["thumbnail"].startswith("/items/") for h in r.json()["results"])
    thumb = requests.get(f"{app['url']}{r.json()['results'][0]['thumbnail']}", headers={"X-API-Key": API_KEY}, timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_app_request_ids_and_logs(app):
    r = requests.get(f"{app['url']}/health", headers={"X-Request-ID": "trace-123"}, timeout=30)
    assert r.json()["request_id"] == "trace-123" and r.headers["X-Request-ID"] == "trace-123"
    assert r.json()["index"]["points"] == len(LABELS) * PER_LABEL + 1 and r.json()["no_index"] is None
    runtime = r.json()["runtime"]["image"]
    assert runtime["engine"] in ("torch", "openvino") and runtime["precision"] and runtime["note"] is None
    fresh = _post(app, "/search", data={"text": "a red circle"}).json()["request_id"]
    assert re.fullmatch(r"[0-9a-f-]{36}", fresh)
    for _ in range(100):  # the access line is written once the response is sent, so just after the client has it
        if fresh in open(app["log"]).read():
            break
        time.sleep(0.05)
    assert fresh in open(app["log"]).read()


def test_app_metrics_and_body_limit(app):
    """/metrics (behind the API key) counts the app's requests and its models' rows; a body declared over
    serve.max_body_bytes is answered 413 in the app's error shape before it is read."""
    import socket
    from urllib.parse import urlparse

    from prometheus_client.parser import text_string_to_metric_families

    assert _post(app, "/embeddings", data={"a": "a red circle", "b": "a blue square"}).status_code == 200
    assert requests.get(f"{app['url']}/metrics", timeout=30).status_code == 401
    r = requests.get(f"{app['url']}/metrics", headers={"X-API-Key": API_KEY}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert any(n == "clip_pyfunc_requests_total" and ("path", "/embeddings") in ls and v >= 1
               for (n, ls), v in samples.items())
    assert any(n == "clip_pyfunc_rows_total" and ("model", "text") in ls and ("outcome", "embedded") in ls and v >= 2
               for (n, ls), v in samples.items())
    parts = urlparse(app["url"])
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(b"POST /embeddings HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode() +
                  b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 400000000\r\n\r\n--b\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413") and b"x-request-id" in head.lower(), head
    assert "max_body_bytes" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("case", ["no key", "not an image", "too many fields", "file too large", "two queries",
                                  "bad k", "no image field"])
def test_app_bad_requests_name_the_field(app, case):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    if case == "no key":
        r = _post(app, "/search", key=None, data={"text": "x"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert r.headers["X-Request-ID"] == r.json()["request_id"]
        return
    r = {
        "not an image": lambda: _post(app, "/embeddings", files={"pic": ("p.png", png, "image/png")}),
        "too many fields": lambda: _post(app, "/embeddings", data={f"t{i}": "x" for i in range(17)}),
        "file too large": lambda: _post(app, "/embeddings", files={"big": ("b.jpg", b"\xff" * (10 * 2**20 + 10),
                                                                           "image/jpeg")}),
        "two queries": lambda: _post(app, "/search", data={"text": "x", "like": "y"}),
        "bad k": lambda: _post(app, "/search", data={"text": "x", "k": "many"}),
        "no image field": lambda: _post(app, "/classify", data={"text": "x"}),
    }[case]()
    body = r.json()
    assert 400 <= r.status_code < 500 and body["request_id"] and r.headers["X-Request-ID"] == body["request_id"]
    expected = {"not an image": (400, "pic"), "too many fields": (413, None), "file too large": (413, "big"),
                "two queries": (400, None), "bad k": (400, "k"), "no image field": (400, "image")}[case]
    assert r.status_code == expected[0], body
    if expected[1]:
        assert body["error"]["field"] == expected[1], body


def test_app_in_a_real_browser(app, folder):
    """Debian's chromium, driven by Playwright: upload an image, type a query, check what the page shows."""
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "install Debian's chromium (.ci/run does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{app['url']}/")  # the key goes in a header (the page's field), never in a URL
            page.fill("#key", API_KEY)
            expect(page.locator("#warning")).to_contain_text("Toy checkpoint")
            photo = folder.parent / "upload-blue-triangle.jpg"
            photo.write_bytes(sample_image("blue", "triangle"))  # the demo's own sample, a JPEG the index lacks
            page.set_input_files("#image-input", str(photo))
            expect(page.locator("#labels li")).to_have_count(3, timeout=30000)
            expect(page.locator("#labels")).to_contain_text("blue triangle")
            expect(page.locator("#results .hit")).to_have_count(12, timeout=30000)
            assert "blue-triangle" in page.locator("#results .hit").first.get_attribute("data-id")
            page.fill("#query", "a yellow square")
            page.click("#search-button")
            expect(page.locator("#results .hit").first).to_have_attribute("data-id", re.compile("yellow-square"),
                                                                          timeout=30000)
            first_three = [page.locator("#results .hit").nth(i).get_attribute("data-id") for i in range(3)]
            assert sum("yellow-square" in i for i in first_three) >= 2, first_three
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].slice(0, 3)"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30000)
            os.makedirs("docs", exist_ok=True)
            page.screenshot(path=os.path.join(os.path.dirname(__file__), "..", "docs", "app.png"), full_page=True)
        finally:
            browser.close()


def test_cli_search_while_the_app_holds_the_index(app, indexed):
    """One process holds an embedded store. `search` and `index` beside the running app say what to do instead."""
    line = _cli_error("search", "--index-path", indexed["path"], "--collection", "shapes", "--text", "a red circle")
    assert "is in use by another process" in line and "shapes" in line, line
    assert all(hint in line for hint in ("POST /search", "stop the process", "--to-server", "--qdrant-url")), line
    line = _cli_error("index", "--index-path", indexed["path"], "--collection", "shapes", "--input",
                      indexed["table"], "--model-uri", "models:/search_image/1")
    assert "is in use by another process" in line, line


# ---------------------------------------------------------------- the app without an index (clip_syte's demo)


@pytest.fixture(scope="module")
def bare_app(registered, tiny_checkpoint, tmp_path_factory):
    """`clip-pyfunc app` with the models conf/ names (clip_*_embedding@champion), a wearables classifier, no index."""
    classifier = register_classifier(load_settings(None, {"model": {"source": tiny_checkpoint}, "classifier": {
        "name": "bare_app_classifier"}}), WEARABLES_FILE)["models"]["classifier"]["uri"]
    work = tmp_path_factory.mktemp("bare-app")
    port = free_port()
    proc = start_server(["clip-pyfunc", "app", "--index-path", str(work / "no-index"), "--classifier", classifier,
                         "--port", str(port)], work / "app.log")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, work / "app.log", path="/health")
    yield {"url": url, "classifier": classifier, "index_path": work / "no-index"}
    stop_server(proc)


def test_app_without_an_index_embeds_and_classifies(bare_app, text_model, image_model):
    """Embeddings of images and texts in one multipart request and the top 3 labels work; /search says how to index."""
    url = bare_app["url"]
    health = requests.get(f"{url}/health", timeout=30).json()
    assert health["index"] is None and "clip-pyfunc index --input" in health["no_index"], health
    assert health["models"] == {"text": "models:/clip_text_embedding@champion",
                                "image": "models:/clip_image_embedding@champion", "classifier": bare_app["classifier"]}
    photo = sample_image("red", "circle")
    r = requests.post(f"{url}/embeddings", files={"photo": ("p.jpg", photo, "image/jpeg")},
                      data={"caption": "a red dress", "other": "a straw hat"}, headers={"request_id": "syte-42"},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-ID"] == "syte-42" and r.json()["request_id"] == "syte-42"
    vectors = r.json()["embeddings"]
    np.testing.assert_allclose(vectors["photo"], image_model.predict([photo])[0], atol=1e-6)
    np.testing.assert_allclose(vectors["caption"], text_model.predict(["a red dress"])[0], atol=1e-6)
    np.testing.assert_allclose(vectors["other"], text_model.predict(["a straw hat"])[0], atol=1e-6)
    r = requests.post(f"{url}/classify", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=60)
    direct = mlflow.pyfunc.load_model(bare_app["classifier"]).predict([photo], params={"top_k": 3})
    assert [t["label"] for t in r.json()["top_categories"]] == list(direct["labels"][0]), r.text
    for response in (requests.post(f"{url}/search", data={"text": "a red dress"}, headers={"request_id": "bad id!"},
                                   timeout=30),
                     requests.get(f"{url}/items/anything/thumbnail", timeout=30)):
        body = response.json()
        assert response.status_code == 404 and "clip-pyfunc index --input" in body["error"]["message"], body
        assert re.fullmatch(r"[0-9a-f-]{36}", body["request_id"]) and response.headers["X-Request-ID"] == body[
            "request_id"]
    assert not bare_app["index_path"].exists()  # the app made no empty index folder


def test_app_page_without_an_index(bare_app, tmp_path):
    """The page hides search without an index, and still shows an uploaded photo's top 3 labels."""
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "install Debian's chromium (.ci/run does)"
    photo = tmp_path / "upload.jpg"
    photo.write_bytes(sample_image("blue", "triangle"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(bare_app["url"])
            expect(page.locator("#no-index")).to_contain_text("clip-pyfunc index")
            expect(page.locator("#search-part")).to_be_hidden()
            expect(page.locator("#text-form")).to_be_hidden()
            page.set_input_files("#image-input", str(photo))
            expect(page.locator("#labels li")).to_have_count(3, timeout=30000)
            expect(page.locator("#status")).to_have_text("")
        finally:
            browser.close()
