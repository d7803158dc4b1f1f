"""The combined image+text model: Azure ML's contract, served by `mlflow models serve`, run in Spark."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import b64, encode, model_server, photo
from http_images import JPEG, serve_images

from clip_pyfunc.settings import load_settings
from clip_pyfunc.registry import register_models

IMAGES = [b64(encode(photo(90, 70, seed), "JPEG")) for seed in range(3)]
TEXTS = ["a red circle", "", "a photo of a cat"]


@pytest.fixture(scope="module")
def azure(tiny_checkpoint, tracking_uri):
    """Text, image and combined models registered together, the combined one Azure-compatible."""
    return register_models(load_settings(None, {
        "model": {"source": tiny_checkpoint},
        "registry": {"text_name": "comb_text", "image_name": "comb_image", "combined_name": "comb_both",
                     "with_combined": True, "azure_compatible": True}}))


@pytest.fixture(scope="module")
def models(azure):
    return {tower: mlflow.pyfunc.load_model(azure["models"][tower]["uri"]) for tower in ("text", "image", "combined")}


def _azure_request():
    """Azure ML's documented request: columns image and text, either may be empty."""
    return {"input_data": {"columns": ["image", "text"], "index": [0, 1, 2, 3],
                           "data": [[IMAGES[0], ""], ["", TEXTS[0]], [IMAGES[1], TEXTS[2]], [IMAGES[2], None]]}}


def test_registered_with_azure_defaults(azure):
    combined = azure["models"]["combined"]
    assert combined["name"] == "comb_both" and combined["normalize"] is False
    version = mlflow.MlflowClient().get_model_version("comb_both", combined["version"])
    assert version.tags["azure_compatible"] == "true" and "not normalised" in version.description
    params = {p.name: p.default for p in mlflow.models.get_model_info(combined["uri"]).signature.params.params}
    assert params == {"normalize": False}


def test_azure_scoring_script_conversion_gets_azure_response_shape(models):
    """Exactly what Azure's MLflow scoring script does: read_json(split, dtype=False), predict, records."""
    from mlflow.pyfunc.scoring_server import _get_jsonable_obj

    request = json.loads(json.dumps(_azure_request()))  # as received over the wire
    frame = pd.read_json(io.StringIO(json.dumps(request["input_data"])), orient="split", dtype=False)
    response = json.loads(json.dumps(_get_jsonable_obj(models["combined"].predict(frame), pandas_orient="records")))
    assert isinstance(response, list) and len(response) == 4
    assert all(set(row) == {"image_features", "text_features"} for row in response)
    assert response[0]["text_features"] is None and response[1]["image_features"] is None
    assert response[3]["text_features"] is None
    dim = int(mlflow.models.get_model_info("models:/comb_both@champion").metadata["embedding_dim"])
    for row in (0, 2, 3):
        assert len(response[row]["image_features"]) == dim
    for row in (1, 2):
        assert len(response[row]["text_features"]) == dim
    # Azure's vectors are not normalised, and neither are these by default.
    assert abs(np.linalg.norm(response[2]["image_features"]) - 1) > 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_vectors_equal_separate_models(models, normalize):
    frame = pd.DataFrame({"image": [IMAGES[0], None, IMAGES[1], IMAGES[2]], "text": ["", TEXTS[0], TEXTS[2], " "]})
    out = models["combined"].predict(frame, params={"normalize": normalize})
    images = models["image"].predict([IMAGES[0], IMAGES[1], IMAGES[2]], params={"normalize": normalize})
    texts = models["text"].predict([TEXTS[0], TEXTS[2]], params={"normalize": normalize})
    got_images = np.array([out["image_features"][r] for r in (0, 2, 3)], dtype=np.float32)
    got_texts = np.array([out["text_features"][r] for r in (1, 2)], dtype=np.float32)
    np.testing.assert_allclose(got_images, images, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_texts, texts, atol=1e-6, rtol=0)
    assert out["image_features"][1] is None and out["text_features"][0] is None and out["text_features"][3] is None
    assert not np.allclose(got_images[0], got_images[1])  # the vectors are not all alike


def test_request_shapes(models):
    combined = models["combined"]
    expected = combined.predict(pd.DataFrame({"image": [IMAGES[0], ""], "text": ["", TEXTS[0]]}))
    shapes = [
        {"image": [IMAGES[0], ""], "text": ["", TEXTS[0]]},
        [{"image": IMAGES[0], "text": ""}, {"image": "", "text": TEXTS[0]}],
        [{"image": IMAGES[0]}, {"text": TEXTS[0]}],
        pd.DataFrame({"id": [1, 2], "image": [IMAGES[0], None], "text": [None, TEXTS[0]]}),
    ]
    for shape in shapes:
        got = combined.predict(shape)
        for col in ("image_features", "text_features"):
            assert [v is None for v in got[col]] == [v is None for v in expected[col]]
    only_images = combined.predict(pd.DataFrame({"image": [IMAGES[1]]}))
    assert only_images["text_features"][0] is None and len(only_images["image_features"][0]) > 0


@pytest.mark.parametrize("request_, message", [
    (pd.DataFrame({"image": [IMAGES[0], ""], "text": ["a", None]}), "row 1: neither image nor text"),
    (pd.DataFrame({"image": [IMAGES[0], b64(b"not an image")], "text": ["a", ""]}), "row 1: image: bytes are not"),
    (pd.DataFrame({"image": [None, None], "text": ["a", 7]}), "row 1: text: expected a string"),
    (pd.DataFrame({"input": ["a"]}), "expected columns 'image' and/or 'text', got columns ['input']"),
    (pd.DataFrame({"image": ["https://example.com/a.jpg"], "text": [""]}), "row 0: image: image URLs are off"),
    ({"image": ["a", "b"], "text": ["c"]}, "differ in length"),
])
def test_bad_requests_name_row_and_field(models, request_, message):
    with pytest.raises(mlflow.exceptions.MlflowException) as e:
        models["combined"].predict(request_)
    assert message in str(e.value)


@pytest.fixture(scope="module")
def combined_server(azure, tmp_path_factory):
    with model_server(azure["models"]["combined"]["uri"], tmp_path_factory.mktemp("srv") / "combined.log") as (url, _):
        yield url


@pytest.mark.serving
def test_served_azure_request_with_one_word_changed(combined_server, models):
    """`mlflow models serve` takes Azure's body once `input_data` is renamed `dataframe_split`."""
    body = _azure_request()
    refused = requests.post(f"{combined_server}/invocations", json=body, timeout=60)
    assert refused.status_code == 400
    served = requests.post(f"{combined_server}/invocations", json={"dataframe_split": body["input_data"]}, timeout=60)
    assert served.status_code == 200, served.text
    rows = served.json()["predictions"]
    frame = pd.DataFrame(body["input_data"]["data"], columns=body["input_data"]["columns"])
    local = models["combined"].predict(frame)
    assert len(rows) == 4
    for i, row in enumerate(rows):
        for col in ("image_features", "text_features"):
            if local[col][i] is None:
                assert row[col] is None
            else:
                np.testing.assert_allclose(row[col], local[col][i], atol=1e-6)
    bad = requests.post(f"{combined_server}/invocations", timeout=60,
                        json={"dataframe_split": {"columns": ["image", "text"], "data": [["", ""]]}})
    assert bad.status_code == 400 and "row 0: neither image nor text" in bad.json()["message"]
    for body in ({"inputs": {"image": [IMAGES[0], ""], "text": ["", TEXTS[0]]}},
                 {"instances": [{"image": IMAGES[0], "text": ""}, {"image": "", "text": TEXTS[0]}]}):
        other = requests.post(f"{combined_server}/invocations", json=body, timeout=60)
        assert other.status_code == 200, other.text
        got = other.json()["predictions"]
        assert len(got) == 2 and got[0]["text_features"] is None and got[1]["image_features"] is None
        np.testing.assert_allclose(got[0]["image_features"], local["image_features"][0], atol=1e-6)
    params = requests.post(f"{combined_server}/invocations", timeout=60,
                           json={"dataframe_records": [{"text": TEXTS[0]}], "params": {"normalize": True}})
    assert abs(np.linalg.norm(params.json()["predictions"][0]["text_features"]) - 1) < 1e-5


@pytest.mark.spark
def test_spark_job_with_urls_and_error_rows(azure, models, tmp_path):
    """The combined model in Spark: image and text columns, URLs allowed for the job, bad rows named."""
    from clip_pyfunc.batch.spark import embed_dataframe, spark_session, stop_session

    with serve_images() as (base, _):
        rows = [("a", IMAGES[0], ""), ("b", None, TEXTS[0]), ("c", IMAGES[1], TEXTS[2]), ("d", "", None),
                ("e", f"{base}/cat.jpg", "x"), ("f", f"{base}/missing.jpg", "y"), ("g", b64(b"junk"), "z")]
        spark = spark_session("local[2]", batch_rows=3)
        try:
            df = spark.createDataFrame(pd.DataFrame(rows, columns=["id", "image", "text"]))
            config = {"allow_urls": True, "allow_http": True, "url_allow_private": ["127.0.0.1"]}
            out, _ = embed_dataframe(df, azure["models"]["combined"]["uri"], model_config=config)
            got = out.toPandas().sort_values("id").reset_index(drop=True)
        finally:
            stop_session(spark)
    assert list(got.columns) == ["id", "image_features", "text_features", "error"]
    errors = dict(zip(got["id"], got["error"]))
    assert {k for k, v in errors.items() if isinstance(v, str)} == {"d", "f", "g"}, errors
    assert "neither image nor text" in errors["d"] and "HTTP 404" in errors["f"] and "bytes are not" in errors["g"]
    local = models["combined"].predict(pd.DataFrame({"image": [IMAGES[0], None, IMAGES[1], b64(JPEG)],
                                                     "text": ["", TEXTS[0], TEXTS[2], "x"]}))
    for i, key in enumerate("abce"):
        row = got[got["id"] == key].iloc[0]
        for col in ("image_features", "text_features"):
            if local[col][i] is None:
                assert row[col] is None
            else:
                np.testing.assert_allclose(row[col], local[col][i], atol=1e-6)


def test_nullable_dtypes_read_as_object_columns(models):
    """pandas' convert_dtypes() (pd.NA in string[python] columns) and Arrow strings: the same answer."""
    import pyarrow as pa

    frame = pd.DataFrame({"image": [IMAGES[0], None], "text": [None, "a red bicycle"]})
    want = models["combined"].predict(frame)
    for converted in (frame.convert_dtypes(), frame.astype("string[pyarrow]"), frame.astype(pd.ArrowDtype(pa.string())),
                      frame.astype("str")):
        got = models["combined"].predict(converted)
        assert got["image_features"][1] is None and got["text_features"][0] is None
        assert np.array_equal(np.array(got["image_features"][0]), np.array(want["image_features"][0]))
        assert np.array_equal(np.array(got["text_features"][1]), np.array(want["text_features"][1]))


def test_two_dimensional_columns_are_refused_not_flattened(models):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"column 'text' has shape \(2, 2\); send one cell per row"):
        models["combined"].predict({"text": np.array([["a", "b"], ["c", "d"]])})


@pytest.mark.serving
def test_served_combined_model_refuses_a_number_in_its_text_column(azure, models, tmp_path):
    """`clip-pyfunc serve`'s edge checks the combined model's `text` column as it checks a text model's input:
    a number is the 400 `predict` gives in process, in the forms MLflow would turn it into a string."""
    from test_serving_platform import Server

    server = Server(azure["models"]["combined"]["uri"], tmp_path)
    try:
        for payload in ({"inputs": {"image": [IMAGES[0], IMAGES[1]], "text": ["a cat", 95120]}},
                        {"instances": [{"image": IMAGES[0], "text": "a cat"}, {"image": IMAGES[1], "text": 95120}]},
                        {"dataframe_records": [{"image": IMAGES[0], "text": "a"}, {"image": IMAGES[1], "text": 95120}]}):
            r = server.post(payload)
            assert r.status_code == 400 and "row 1" in r.json()["message"] and "95120" in r.text, r.text[:300]
        r = server.post({"dataframe_records": [{"image": IMAGES[0], "text": "a cat"}]})
        assert r.status_code == 200, r.text[:300]
    finally:
        server.stop()
