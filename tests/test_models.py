"""The two pyfunc models loaded back from the registry by alias: parity, contract, artifacts."""

from __future__ import annotations

import json
import os
import zipfile

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from conftest import b64, encode, load_on_engine, photo
from engine_fixtures import engine, image_model, text_model  # noqa: F401 - every test here runs on each engine
from clip_pyfunc.stages.decode import ImageLimits, open_image
from clip_pyfunc.registry.signatures import model_signature


TEXTS = ["a photo of a cat", "", "ünïcödé ✓ 日本語のテキスト", "the cat is on the mat " * 30, "x"]


def _ref_text(reference, texts):
    tok = reference["tokenizer"](texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        f = reference["model"].get_text_features(**tok).pooler_output
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def _ref_image(reference, images):
    px = reference["processor"](images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f = reference["model"].get_image_features(pixel_values=px).pooler_output
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def test_text_parity_with_transformers(text_model, reference):
    got = text_model.predict(pd.DataFrame({"input": TEXTS}))
    want = _ref_text(reference, TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    assert np.abs(got - want).max() <= 1e-5


def test_image_parity_with_transformers(registered, reference, engine):
    # fast_decode off: the exact reference preprocessing, to 1e-5 (the draft path has its own test).
    model = load_on_engine(registered["models"]["image"]["uri"], engine, fast_decode=False)
    imgs = [photo(640, 480, 1), photo(300, 500, 2), photo(33, 32, 3), photo(1, 1, 4)]
    payload = [encode(imgs[0], "JPEG", quality=90), encode(imgs[1], "PNG"), encode(imgs[2], "WEBP"),
               encode(imgs[3], "BMP")]
    got = model.predict(pd.DataFrame({"input": [b64(p) for p in payload]}))
    limits = ImageLimits(max_bytes=10**8, max_pixels=10**8)
    want = _ref_image(reference, [open_image(p, limits) for p in payload])
    assert got.dtype == np.float32 and got.shape == (4, 32)
    assert np.abs(got - want).max() <= 1e-5


def test_text_and_image_share_one_space(text_model, image_model, reference):
    t = text_model.predict(pd.DataFrame({"input": ["a cat"]}))
    i = image_model.predict(pd.DataFrame({"input": [b64(encode(photo(64, 64), "PNG"))]}))
    with torch.no_grad():
        ref = reference["model"](**reference["tokenizer"](["a cat"], return_tensors="pt"),
                                 pixel_values=reference["processor"]([photo(64, 64)], return_tensors="pt")["pixel_values"])
    cos = float((ref.logits_per_text / reference["model"].logit_scale.exp()).item())
    assert abs(float(t[0] @ i[0]) - cos) <= 1e-5


def test_normalize_param(text_model):
    raw = text_model.predict(pd.DataFrame({"input": ["a cat", "a dog"]}), params={"normalize": False})
    unit = text_model.predict(pd.DataFrame({"input": ["a cat", "a dog"]}))
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-6)


def test_unknown_param_is_refused(text_model):
    with pytest.raises(MlflowException) as e:
        text_model.unwrap_python_model().predict(None, pd.DataFrame({"input": ["a"]}), params={"nrmalize": True})
    assert "nrmalize" in str(e.value) and "normalize" in str(e.value)


def test_signature_is_pinned(registered):
    info = mlflow.models.get_model_info(registered["models"]["image"]["uri"])
    assert info.signature.to_dict() == model_signature().to_dict()
    # No input schema on purpose (registry.model_signature): MLflow passes every request shape through.
    assert info.signature.to_dict()["inputs"] is None
    assert json.loads(info.signature.to_dict()["outputs"]) == [
        {"type": "array", "items": {"type": "float"}, "required": True}]
    assert json.loads(info.signature.to_dict()["params"]) == [
        {"name": "normalize", "default": True, "shape": None, "type": "boolean"}]
    # The input contract is still written down where MLflow shows it.
    assert "'input'" in info.metadata["input"]
    mv = mlflow.MlflowClient().get_model_version_by_alias(registered["models"]["image"]["name"], "champion")
    assert "column 'input'" in mv.description and "a list" in mv.description


def test_guide_calls_verbatim(registered):
    """The Databricks serving guide's calls, as users copy them (the list form failed before)."""
    image_b64 = b64(encode(photo(64, 48, 3), "JPEG"))
    model = mlflow.pyfunc.load_model(registered["models"]["text"]["uri"])
    image_model = mlflow.pyfunc.load_model(registered["models"]["image"]["uri"])
    embeddings = model.predict(["Sample text", "Another text"])
    embedding = image_model.predict([image_b64])          # "Pass as list"
    assert embeddings.shape == (2, 32) and embeddings.dtype == np.float32
    assert embedding.shape == (1, 32) and embedding.dtype == np.float32
    np.testing.assert_array_equal(embeddings, model.predict(pd.DataFrame({"input": ["Sample text", "Another text"]})))
    np.testing.assert_array_equal(embedding, image_model.predict(pd.DataFrame({"input": [image_b64]})))


@pytest.mark.parametrize("tower", ["text", "image"])
def test_every_request_shape_gives_the_same_vectors(registered, tower, text_model, image_model):
    model = text_model if tower == "text" else image_model
    cells = (["a red bicycle", "", "ünï"] if tower == "text"
             else [b64(encode(photo(50 + 9 * s, 40, s), "JPEG")) for s in range(3)])
    want = model.predict(pd.DataFrame({"input": cells}))
    shapes = {
        "list": list(cells),
        "tuple": tuple(cells),
        "series": pd.Series(cells),
        "named series": pd.Series(cells, name="caption"),
        "renamed column": pd.DataFrame({"image_base64": cells}),
        "spark positional column": pd.DataFrame({"0": cells}),
        "extra columns": pd.DataFrame({"id": ["x1", "x2", "x3"], "input": cells}),
        "1-d array": np.asarray(cells, dtype=object),
        "column array": np.asarray(cells, dtype=object).reshape(-1, 1),
        "dict": {"input": cells},
    }
    for name, value in shapes.items():
        got = model.predict(value)
        assert got.dtype == np.float32, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # One row alone pads (text) or batches (image) differently: equal to float rounding.
    np.testing.assert_allclose(model.predict(cells[0]), want[:1], atol=1e-6)


def test_wide_frame_without_input_column_is_refused_naming_the_columns(text_model):
    with pytest.raises(MlflowException) as e:
        text_model.predict(pd.DataFrame({"id": ["a"], "caption": ["a cat"]}))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "'input'" in str(e.value) and "['id', 'caption']" in str(e.value)
    for bad, words in [({"a": ["x"], "b": ["y"]}, "['a', 'b']"), (np.zeros((2, 3)), "shape (2, 3)"),
                       (42, "got int")]:
        with pytest.raises(MlflowException) as e:
            text_model.predict(bad)
        assert words in str(e.value) and e.value.error_code == "INVALID_PARAMETER_VALUE"


def _model_dir(uri: str) -> str:
    return mlflow.artifacts.download_artifacts(uri)


@pytest.mark.parametrize("tower,own,other", [("text", "text_", "vision_"), ("image", "vision_", "text_")])
def test_artifact_holds_only_its_tower(registered, tiny_checkpoint, tower, own, other):
    from safetensors import safe_open

    root = _model_dir(registered["models"][tower]["uri"])
    weights = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]
    assert len(weights) == 1
    with safe_open(weights[0], "pt") as f:
        keys = list(f.keys())
        tower_params = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                           else int(np.prod(f.get_slice(k).get_shape())) for k in keys)
    scalars = {"logit_scale"}  # the scoring constant travels with each tower (one float)
    assert keys and all(k.startswith((own, own.replace("vision_", "visual_"))) or k in scalars for k in keys)
    assert not any(k.startswith(other) for k in keys)
    # Size check against the tower itself (in the tiny model the token embedding dominates the text tower).
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(tiny_checkpoint)
    prefixes = ("text_model.", "text_projection.") if tower == "text" else ("vision_model.", "visual_projection.")
    expected = sum(p.numel() for n, p in full.named_parameters() if n.startswith(prefixes) or n in scalars)
    assert tower_params == expected
    assert abs(os.path.getsize(weights[0]) - 4 * expected) < 64 * 1024


@pytest.mark.parametrize("tower", ["text", "image"])
def test_logged_model_has_no_pickle(registered, tower):
    root = _model_dir(registered["models"][tower]["uri"])
    with open(os.path.join(root, "MLmodel")) as f:
        mlmodel = f.read()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            # OpenVINO IR weights (openvino_model*.bin) are raw tensors; the header check below holds for them too.
            if not (name.startswith("openvino_model") and name.endswith(".bin")):
                assert not name.endswith((".pkl", ".pickle", ".bin", ".pt", ".pth", ".joblib")), path
            with open(path, "rb") as f:
                head = f.read(2)
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), path
            if zipfile.is_zipfile(path):
                assert not any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist()), path


def test_requirements_are_explicit(registered):
    root = _model_dir(registered["models"]["text"]["uri"])
    reqs = open(os.path.join(root, "requirements.txt")).read()
    assert "torch==" in reqs and "transformers==" in reqs and "mlflow==" in reqs
    assert "pyspark" not in reqs and "pytest" not in reqs
    assert os.path.isdir(os.path.join(root, "code", "clip_pyfunc"))


def test_bad_rows_are_named_and_are_400s(image_model):
    good = b64(encode(photo(40, 30), "PNG"))
    frame = pd.DataFrame({"input": [good, "not base64!!", b64(b"hello, not an image"), None, float("nan")]})
    with pytest.raises(MlflowException) as e:
        image_model.predict(frame)
    msg = str(e.value)
    assert e.value.get_http_status_code() == 400
    for row in (1, 2, 3, 4):
        assert f"row {row}:" in msg
    assert "row 0" not in msg
    assert "invalid base64" in msg and "not an image" in msg and "null" in msg


def test_one_bad_row_leaves_the_others_right(image_model):
    imgs = [b64(encode(photo(50 + i, 40, i), "PNG")) for i in range(5)]
    alone = image_model.predict(pd.DataFrame({"input": imgs}))
    mixed = imgs[:2] + ["%%%"] + imgs[2:]
    vectors, errors = image_model.unwrap_python_model().embed_rows(mixed)
    assert [e.row for e in errors] == [2]
    assert np.isnan(vectors[2]).all()
    np.testing.assert_allclose(np.delete(vectors, 2, axis=0), alone, atol=1e-6)


def test_text_nulls_and_types_are_refused(text_model):
    with pytest.raises(MlflowException, match=r"row 1: input is null"):
        text_model.predict(pd.DataFrame({"input": ["ok", None]}))


def test_text_over_context_length(registered, text_model):
    long = "word " * 200
    v = text_model.predict(pd.DataFrame({"input": [long]}))
    assert v.shape == (1, 32)
    strict = mlflow.pyfunc.load_model(registered["models"]["text"]["uri"], model_config={"truncate_text": False})
    with pytest.raises(MlflowException, match=r"row 1: text is \d+ tokens, over the model's context length of 77"):
        strict.predict(pd.DataFrame({"input": ["short", long]}))
    np.testing.assert_allclose(strict.predict(pd.DataFrame({"input": ["short"]})),
                               text_model.predict(pd.DataFrame({"input": ["short"]})), atol=1e-6)


def test_limits_come_from_model_config(registered, monkeypatch):
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")  # what MLflow's scoring server sets
    uri = registered["models"]["image"]["uri"]
    small = mlflow.pyfunc.load_model(uri, model_config={"max_image_pixels": 1000, "max_image_bytes": 5000,
                                                        "max_rows": 2})
    with pytest.raises(MlflowException, match=r"row 0: image is 40x40 = 1600 pixels, over the limit of 1000"):
        small.predict(pd.DataFrame({"input": [b64(encode(photo(40, 40), "PNG"))]}))
    with pytest.raises(MlflowException, match=r"row 0: image is (about )?\d+ bytes, over the limit of 5000"):
        small.predict(pd.DataFrame({"input": [b64(encode(photo(30, 30), "BMP") + b"\0" * 6000)]}))
    with pytest.raises(MlflowException, match=r"3 rows, over the limit of 2 rows per call \(max_rows\)"):
        small.predict(pd.DataFrame({"input": ["a", "b", "c"]}))


def test_bad_model_config_is_a_clear_error(registered):
    from clip_pyfunc.errors import ModelLoadError

    # (MLflow itself drops keys the logged model_config does not have, with a warning naming the allowed ones.)
    with pytest.raises(ModelLoadError, match=r"batch_size must be a positive integer, got 0"):
        mlflow.pyfunc.load_model(registered["models"]["text"]["uri"], model_config={"batch_size": 0})
    with pytest.raises(ModelLoadError, match=r"precision 'fp16' needs a CUDA device"):
        mlflow.pyfunc.load_model(registered["models"]["text"]["uri"],
                                 model_config={"device": "cpu", "precision": "fp16"})


def test_raw_bytes_column_works(image_model):
    data = encode(photo(64, 48), "JPEG")
    a = image_model.predict(pd.DataFrame({"input": [data]}))
    b = image_model.predict(pd.DataFrame({"input": [b64(data)]}))
    np.testing.assert_allclose(a, b, atol=1e-6)


# --- Issue 24.5: every missing value and every string dtype pandas produces is read alike ---

def _string_dtypes():
    import pyarrow as pa

    return {"object": object, "str": "str", "string_python": "string[python]", "string_pyarrow": "string[pyarrow]",
            "arrow_string": pd.ArrowDtype(pa.string()), "arrow_large_string": pd.ArrowDtype(pa.large_string())}


@pytest.mark.parametrize("dtype", sorted(_string_dtypes()))
def test_text_string_dtypes_give_the_same_vectors(text_model, dtype):
    want = text_model.predict(pd.DataFrame({"input": TEXTS}))
    got = text_model.predict(pd.DataFrame({"input": pd.Series(TEXTS, dtype=_string_dtypes()[dtype])}))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("missing", [None, float("nan"), pd.NA, pd.NaT, np.float32("nan")],
                         ids=["None", "nan", "NA", "NaT", "float32_nan"])
def test_every_missing_value_is_a_null_row(text_model, image_model, missing):
    for model, good in ((text_model, "ok"), (image_model, b64(encode(photo(40, 30), "PNG")))):
        with pytest.raises(MlflowException, match=r"row 1: input is null"):
            model.predict(pd.DataFrame({"input": pd.Series([good, missing], dtype=object)}))


@pytest.mark.parametrize("dtype", ["string[python]", "string[pyarrow]", "str"])
def test_nullable_string_column_nulls_are_null_rows(text_model, image_model, dtype):
    for model, good in ((text_model, "ok"), (image_model, b64(encode(photo(40, 30), "PNG")))):
        with pytest.raises(MlflowException, match=r"row 1: input is null"):
            model.predict(pd.DataFrame({"input": pd.Series([good, None], dtype=dtype)}))


def test_row_limit_applies_to_served_requests_only(registered, monkeypatch):
    """max_rows protects a server; in-process and Spark calls (batches of 10,000) are not limited."""
    small = mlflow.pyfunc.load_model(registered["models"]["text"]["uri"], model_config={"max_rows": 2})
    assert small.predict(pd.DataFrame({"input": ["a", "b", "c"]})).shape[0] == 3
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(MlflowException, match=r"3 rows, over the limit of 2 rows per call \(max_rows\)"):
        small.predict(pd.DataFrame({"input": ["a", "b", "c"]}))
    monkeypatch.setenv("SPARK_REUSE_WORKER", "1")  # a scoring server spark_udf started inside a Spark worker
    assert small.predict(pd.DataFrame({"input": ["a", "b", "c"]})).shape[0] == 3


# --- Issue 24: numpy's fixed-width bytes arrays drop trailing zero bytes ---

def _ends_in_zeros():
    """Images in every allowed format whose encoded bytes end with zero bytes (dark last pixels)."""
    from PIL import Image

    dark = Image.new("RGB", (8, 6), (0, 0, 0))
    dark.paste((200, 40, 40), (0, 2, 8, 4))  # dark first and last rows (BMP stores bottom-up)
    out = {fmt: encode(dark, fmt) for fmt in ("BMP", "TIFF")}
    out["PNG"] = encode(photo(30, 20), "PNG")
    out["JPEG"] = encode(photo(30, 20), "JPEG")
    return out


def test_fixed_width_bytes_array_keeps_trailing_zero_bytes(image_model):
    images = _ends_in_zeros()
    assert images["BMP"].endswith(b"\0\0\0") and images["TIFF"].endswith(b"\0")
    want = image_model.predict([images[f] for f in sorted(images)])
    array = np.array([images[f] for f in sorted(images)])  # dtype S: numpy strips each element's trailing zeros
    assert array.dtype.kind == "S" and bytes(array[0]) != images[sorted(images)[0]]
    for request in (array, pd.Series(array), {"input": array}):
        got = image_model.predict(request)
        assert np.abs(got - want).max() <= 1e-6
