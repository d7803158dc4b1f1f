"""The app's OpenAI-style API (/v1/embeddings, /v1/models), driven by the real `openai` client.

A real `clip-pyfunc app` (uvicorn) on loopback serves the tiny random CLIP the registry holds
(models:/clip_text_embedding@champion and models:/clip_image_embedding@champion), with an API key;
every vector it answers is compared with the registered model's own in-process `predict`.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import requests
from conftest import b64, encode, free_port, photo, start_server, stop_server, wait_ready
from http_images import JPEG as SERVED_JPEG
from http_images import serve_images

pytestmark = [pytest.mark.serving]
KEY = "openai-test-key"
TEXT, IMAGE, ALIAS = "clip_text_embedding", "clip_image_embedding", "champion"
PNG = encode(photo(48, 40, seed=1), "PNG")
JPEG = encode(photo(64, 48, seed=2), "JPEG", quality=90)


def _data_url(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{b64(data)}"


@pytest.fixture(scope="module")
def app(registered, tmp_path_factory):
    """`clip-pyfunc app` over the conf's models, without an index or a classifier, with an API key."""
    work = tmp_path_factory.mktemp("openai-app")
    port = free_port()
    proc = start_server(["clip-pyfunc", "app", "--no-index", "--no-classifier", "--port", str(port),
                         "--api-key", KEY], work / "app.log")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, work / "app.log", path="/health")
    yield {"url": url, "log": work / "app.log"}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app['url']}/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(app, body, key=KEY):
    """A raw POST /v1/embeddings (for bodies the openai client would not send)."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{app['url']}/v1/embeddings", data=data, timeout=60,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_texts_and_images_equal_the_models_own(client, text_model, image_model, tiny_checkpoint):
    """Texts, a PNG and a JPEG data URL in one request: in order, each the registered model's own vector."""
    from transformers import AutoTokenizer

    texts = ["a red dress", "a straw hat with a wide brim"]
    sent = [texts[0], _data_url(PNG, "png"), texts[1], _data_url(JPEG, "jpeg")]
    got = client.embeddings.create(model=TEXT, input=sent, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1, 2, 3] and all(d.object == "embedding" for d in got.data)
    assert got.object == "list" and got.model == TEXT
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    np.testing.assert_allclose(vectors[[0, 2]], text_model.predict(texts), atol=1e-6)
    np.testing.assert_allclose(vectors[[1, 3]], image_model.predict([PNG, JPEG]), atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)  # transformers' own count: special tokens included
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens  # the images count 0


def test_base64_is_little_endian_float32(client, app, text_model):
    """The client's default (it asks for base64 and decodes it) and an explicit base64 answer the same vectors."""
    texts = ["a photo of a cat", "ünïcode text"]
    direct = text_model.predict(texts)
    decoded = client.embeddings.create(model=TEXT, input=texts)  # encoding_format="base64" sent, decoded by the client
    np.testing.assert_allclose([d.embedding for d in decoded.data], direct, atol=1e-6)
    raw = client.embeddings.create(model=TEXT, input=texts, encoding_format="base64")
    for d, vector in zip(raw.data, direct):
        assert isinstance(d.embedding, str)
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(d.embedding), dtype="<f4"), vector, atol=1e-6)
    one = client.embeddings.create(model=TEXT, input="a photo of a cat", encoding_format="float")  # one string
    assert len(one.data) == 1
    np.testing.assert_allclose(one.data[0].embedding, direct[0], atol=1e-6)


def test_model_by_name_alias_and_uri_and_the_list(client, registered):
    names = [TEXT, IMAGE, f"{TEXT}@{ALIAS}", f"{IMAGE}@{ALIAS}", ALIAS, f"models:/{TEXT}@{ALIAS}",
             f"models:/{IMAGE}@{ALIAS}"]
    listed = client.models.list()
    assert sorted(m.id for m in listed.data) == sorted(names)
    assert all(m.object == "model" and m.owned_by == "clip-pyfunc" for m in listed.data)
    first = None
    for name in names:
        got = client.embeddings.create(model=name, input=["a blue hat"], encoding_format="float")
        assert got.model == name
        first = first or got.data[0].embedding
        np.testing.assert_allclose(got.data[0].embedding, first, atol=1e-6)  # one pair of models behind every name
    dim = registered["embedding_dim"]
    same = client.embeddings.create(model=TEXT, input="a blue hat", dimensions=dim, encoding_format="float")
    assert len(same.data[0].embedding) == dim


def test_unknown_model_is_404_listing_the_names(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="a cat")
    error = e.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model", error
    assert error["type"] == "invalid_request_error" and TEXT in error["message"] and IMAGE in error["message"]
    assert e.value.request_id  # the app's X-Request-ID header, where the client looks for it


def test_a_url_is_text_while_the_image_model_fetches_none(client, text_model):
    """The registered image model has allow_urls off: a URL is embedded as the text it is (nothing fetched)."""
    url = "https://example.com/cat.jpg"
    got = client.embeddings.create(model=TEXT, input=[url, "a cat"], encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in got.data], text_model.predict([url, "a cat"]), atol=1e-6)


@pytest.fixture(scope="module")
def url_app(tiny_checkpoint, tracking_uri, tmp_path_factory):
    """The app over the tiny CLIP registered with image URLs on (http, and 127.0.0.1 exempt, for the test server)."""
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.settings import load_settings

    register_models(load_settings(None, {
        "model": {"source": tiny_checkpoint},
        "registry": {"text_name": "openai_url_text", "image_name": "openai_url_image"},
        "runtime": {"allow_urls": True, "allow_http": True, "url_allow_private": ["127.0.0.1"]}}))
    work = tmp_path_factory.mktemp("openai-url-app")
    port = free_port()
    proc = start_server(["clip-pyfunc", "app", "--no-index", "--no-classifier", "--port", str(port),
                         "--text-name", "openai_url_text", "--image-name", "openai_url_image"], work / "app.log")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, work / "app.log", path="/health")
    yield url
    stop_server(proc)


def test_a_url_is_an_image_when_the_image_model_fetches_urls(url_app, image_model, text_model):
    """Fetched by the image model's own fetch (its address checks and limits); a failed fetch names its item."""
    client = openai.OpenAI(base_url=f"{url_app}/v1", api_key="unused", max_retries=0, timeout=60)
    with serve_images() as (base, _):
        got = client.embeddings.create(model="openai_url_image", input=[f"{base}/cat.jpg", "a cat"],
                                       encoding_format="float")
        np.testing.assert_allclose(got.data[0].embedding, image_model.predict([SERVED_JPEG])[0], atol=1e-6)
        np.testing.assert_allclose(got.data[1].embedding, text_model.predict(["a cat"])[0], atol=1e-6)
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="openai_url_text", input=["a cat", f"{base}/missing.jpg"])
    assert e.value.body["message"].startswith("input[1] (image): URL") and "HTTP 404" in e.value.body["message"]
    assert "or an http(s) image URL" in e.value.body["message"]


BAD = {  # case -> (body, status, param, what the message says)
    "not an image": ({"input": ["a cat", _data_url(b"not an image at all", "png")]}, 400, "input",
                     "input[1] (image): bytes are not an image"),
    "bad base64": ({"input": ["a cat", "data:image/png;base64,@@@@"]}, 400, "input",
                   "input[1] (image): invalid base64"),
    "data url without base64": ({"input": ["a cat", "data:image/png,abc"]}, 400, "input", "input[1] (image): data URL"),
    "token ids": ({"input": [[1, 2, 3]]}, 400, "input", "input[0] is a list: token-id arrays are not supported"),
    "token id list": ({"input": [1, 2, 3]}, 400, "input", "input[0] is a number: token-id arrays are not supported"),
    "not a string": ({"input": ["a cat", {"image": "x"}]}, 400, "input", "input[1] is dict"),
    "input an object": ({"input": {"a": 1}}, 400, "input", "input must be a string or a list of strings"),
    "no input": ({}, 400, "input", "input is missing or empty"),
    "empty input": ({"input": []}, 400, "input", "input is missing or empty"),
    "too many": ({"input": ["a"] * 1025}, 400, "input", "1025 items, over the limit of 1024 (max_rows)"),
    "encoding": ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format", "encoding_format must be one of"),
    "dimensions": ({"input": "a", "dimensions": 8}, 400, "dimensions", "cannot be shortened"),
    "no model": ({"input": "a", "model": None}, 400, "model", "model must be a string"),
    "not json": (b"{not json", 400, None, "body is not valid JSON"),
    "not an object": ([1, 2], 400, None, "body must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_answer_in_openai_error_shape(app, case):
    body, status, param, says = BAD[case]
    if isinstance(body, dict):
        body = {"model": TEXT, **body}
    r = _post(app, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}, r.json()
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert says in error["message"], error
    assert r.headers["X-Request-ID"]


def test_bad_input_through_the_client_names_the_item(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=TEXT, input=["a cat", _data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "png")])
    error = e.value.body
    assert error["param"] == "input" and error["type"] == "invalid_request_error", error
    assert error["message"].startswith("input[1] (image): ") and "data:image/<type>;base64,<data>" in error["message"]
    assert e.value.response.json() == {"error": error}


def test_api_key_as_bearer_and_the_old_ways_but_never_in_the_url(app):
    wrong = openai.OpenAI(base_url=f"{app['url']}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.embeddings.create(model=TEXT, input="a cat")
    assert e.value.body["code"] == "invalid_api_key" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    url = app["url"]
    # X-API-Key still opens every path, Bearer opens the app's own endpoints too; a key in the URL opens none
    # (proxies and access logs keep URLs), even with the right key in a header beside it
    assert requests.get(f"{url}/v1/models", headers={"X-API-Key": KEY}, timeout=30).status_code == 200
    for params in ({"key": KEY}, {"api_key": KEY}, {"KEY": KEY}):
        r = requests.get(f"{url}/v1/models", params=params, headers={"X-API-Key": KEY}, timeout=30)
        assert r.status_code == 401 and "in the URL" in r.json()["error"]["message"], (params, r.text)
    r = requests.post(f"{url}/embeddings", data={"t": "a cat"}, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)
    assert r.status_code == 200, r.text
    # the app's own paths keep their error shape, with request_id
    r = requests.post(f"{url}/embeddings", data={"t": "a cat"}, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["request_id"] == r.headers["X-Request-ID"], r.text
    assert "API key" in r.json()["error"]["message"]
    assert KEY not in open(app["log"]).read()  # no log line prints the key


def test_a_misspelt_field_is_refused_by_name_not_dropped(client, app):
    """OpenAI's own API refuses an argument it does not take; so does ours, instead of ignoring it."""
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=TEXT, input="a cat", extra_body={"normalise": False})
    assert e.value.body["param"] == "normalise" and "normalise" in e.value.body["message"], e.value.body
    r = requests.post(f"{app['url']}/embeddings", data={"t": "a cat"},
                      headers={"X-API-Key": KEY, "Content-Encoding": "gzip"}, timeout=30)
    assert r.status_code == 400 and "gzip" in r.json()["error"]["message"], r.text  # not gzip: named


def test_the_app_reads_gzip_bodies_and_media_types_in_any_case(client, app):
    import gzip

    body = gzip.compress(json.dumps({"model": TEXT, "input": ["a cat"]}).encode())
    r = requests.post(f"{app['url']}/v1/embeddings", data=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "Application/JSON",
                               "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    want = client.embeddings.create(model=TEXT, input=["a cat"]).data[0].embedding
    assert np.allclose(r.json()["data"][0]["embedding"], want, atol=1e-6)
