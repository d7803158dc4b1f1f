"""The zero-shot classifier: pipeline parity per family, meaning on the toy, labels and params checked."""

from __future__ import annotations

import json
import os
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from conftest import b64, encode, free_port, photo, start_server, stop_server, wait_ready
from clip_pyfunc.settings import load_settings
from clip_pyfunc.stages.decode import ImageLimits, open_image
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.artifacts.labels import read_label_file
from clip_pyfunc.registry import register_classifier
from clip_pyfunc.dev.toy_checkpoint import LABELS, draw

PARITY_LABELS = ["cat", "dog", "red car", "mountain", "beach"]
TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis_template


def _label_file(tmp_path, labels, templates=None, name="test-labels") -> str:
    import yaml

    path = tmp_path / f"{name}.yaml"
    data = {"name": name, "labels": labels}
    if templates:
        data["templates"] = templates
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _register(source, labels_path, name, dynamic=False, **runtime):
    settings = load_settings(None, {"model": {"source": source}, "classifier": {"name": name},
                                    "runtime": runtime or None})
    return register_classifier(settings, labels_path, dynamic_labels=dynamic)


@pytest.fixture(scope="module")
def toy_classifier(toy_checkpoint, tracking_uri, tmp_path_factory):
    path = _label_file(tmp_path_factory.mktemp("toylabels"), list(LABELS), ["a {}"], name="toy-shapes")
    return _register(toy_checkpoint, path, "toy_classifier", dynamic=True)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_scores_equal_the_transformers_pipeline(family, tiny_checkpoint, checkpoints, tracking_uri, tmp_path):
    from transformers import pipeline

    source = tiny_checkpoint if family == "clip" else checkpoints["siglip"]
    summary = _register(source, _label_file(tmp_path, PARITY_LABELS, [TEMPLATE]), f"parity_{family}")
    assert summary["scoring"]["function"] == ("softmax" if family == "clip" else "sigmoid")
    model = mlflow.pyfunc.load_model(summary["models"]["classifier"]["uri"], model_config={"fast_decode": False})
    images = [encode(photo(90, 70, s), "PNG") for s in range(3)]
    got = model.predict([b64(x) for x in images], params={"top_k": 0})
    assert list(got.columns) == ["labels", "scores"]
    pipe = pipeline("zero-shot-image-classification", model=source, device="cpu")
    for row, data in enumerate(images):
        img = open_image(data, ImageLimits(max_bytes=10**7, max_pixels=10**7))
        want = {r["label"]: r["score"] for r in pipe(img, candidate_labels=PARITY_LABELS, hypothesis_template=TEMPLATE)}
        mine = dict(zip(got["labels"][row], got["scores"][row]))
        assert set(mine) == set(PARITY_LABELS)
        assert max(abs(mine[k] - want[k]) for k in want) <= 1e-5
        assert got["scores"][row] == sorted(got["scores"][row], reverse=True)
    if family == "clip":
        assert abs(sum(got["scores"][0]) - 1) < 1e-6  # softmax sums to 1; SigLIP's sigmoids need not


def _held_out(n=100, seed=77):
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        img, _ = draw(*label.split(), rng)
        rows.append(b64(encode(img, "JPEG", quality=90)))
        truth.append(label)
    return rows, truth


def test_toy_classifier_names_colour_and_shape(toy_classifier, tmp_path):
    uri = toy_classifier["models"]["classifier"]["uri"]
    rows, truth = _held_out()
    clf = mlflow.pyfunc.load_model(uri)
    out = clf.predict(pd.DataFrame({"input": rows}), params={"top_k": 3})
    accuracy = np.mean([labels[0] == t for labels, t in zip(out["labels"], truth)])
    assert accuracy >= 0.9, accuracy
    assert all(len(x) == 3 for x in out["labels"])
    # The same through a real `mlflow models serve`, all four payload forms.
    port, log = free_port(), tmp_path / "clf.log"
    proc = start_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                         "-p", str(port)], log)
    try:
        import requests

        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log)
        for body in ({"inputs": rows[:10]}, {"dataframe_records": [{"input": r} for r in rows[:10]]},
                     {"dataframe_split": {"columns": ["input"], "data": [[r] for r in rows[:10]]}},
                     {"instances": [{"input": r} for r in rows[:10]]}):
            r = requests.post(f"{url}/invocations", json={**body, "params": {"top_k": 3}}, timeout=60)
            assert r.status_code == 200, r.text[:500]
            served = r.json()["predictions"]
            assert [p["labels"] for p in served] == list(out["labels"][:10])
            assert np.allclose([p["scores"] for p in served], np.stack(out["scores"][:10]), atol=1e-6)
        bad = requests.post(f"{url}/invocations", json={"inputs": [rows[0], "%%%"], "params": {"top_k": -1}},
                            timeout=60)
        assert bad.status_code == 400 and "top_k" in bad.json()["message"]
    finally:
        stop_server(proc)


def test_dynamic_labels_per_request(toy_classifier):
    clf = mlflow.pyfunc.load_model(toy_classifier["models"]["classifier"]["uri"])
    rows, truth = _held_out(30, seed=5)
    out = clf.predict(rows, params={"candidate_labels": ["red circle", "blue square", "green triangle"],
                                    "hypothesis_template": "a {}", "top_k": 0})
    for labels, scores in zip(out["labels"], out["scores"]):
        assert set(labels) == {"red circle", "blue square", "green triangle"} and len(scores) == 3
    for labels, t in zip(out["labels"], truth):
        if t in ("red circle", "blue square", "green triangle"):
            assert labels[0] == t
    with pytest.raises(MlflowException, match="candidate_labels.*duplicates"):
        clf.predict(rows[:1], params={"candidate_labels": ["a", "a"]})
    with pytest.raises(MlflowException, match="hypothesis_template.*'{}'"):
        clf.predict(rows[:1], params={"candidate_labels": ["a"], "hypothesis_template": "no slot"})


def test_fixed_labels_refuse_candidate_labels_and_carry_no_text_tower(checkpoints, tracking_uri, tmp_path):
    summary = _register(checkpoints["siglip"], _label_file(tmp_path, PARITY_LABELS), "fixed_clf")
    uri = summary["models"]["classifier"]["uri"]
    clf = mlflow.pyfunc.load_model(uri)
    image = b64(encode(photo(40, 30, 1), "JPEG"))
    with pytest.raises(MlflowException, match="register-classifier --dynamic-labels"):
        clf.predict([image], params={"candidate_labels": ["cat"]})
    for bad, words in (({"top_k": -1}, "top_k"), ({"top_k": "many"}, "top_k")):
        with pytest.raises(MlflowException, match=words):
            clf.predict([image], params=bad)
    with pytest.raises(MlflowException, match="row 1: .*not an image"):
        clf.predict([image, b64(b"nope")])
    out = clf.predict([image], params={"top_k": 99})
    assert len(out["labels"][0]) == len(PARITY_LABELS)
    root = mlflow.artifacts.download_artifacts(uri)
    from safetensors import safe_open

    keys = [k for d, _, fs in os.walk(root) for f in fs if f == "model.safetensors"
            for k in safe_open(os.path.join(d, f), "pt").keys()]
    assert keys and not any(k.startswith("text_") for k in keys)
    assert not [f for _, _, fs in os.walk(root) for f in fs if f.endswith((".pkl", ".pickle"))]
    mv = mlflow.MlflowClient().get_model_version_by_alias("fixed_clf", "champion")
    assert mv.tags["label_set"] == "test-labels" and len(mv.tags["label_set_hash"]) == 16
    assert mv.tags["templates"] == "3" and mv.tags["family"] == "siglip" and mv.tags["scoring"] == "sigmoid"
    sig = mlflow.models.get_model_info(uri).signature.to_dict()
    assert json.loads(sig["outputs"]) == [
        {"type": "array", "items": {"type": "string"}, "name": "labels", "required": True},
        {"type": "array", "items": {"type": "double"}, "name": "scores", "required": True}]
    assert [p["name"] for p in json.loads(sig["params"])] == ["top_k", "candidate_labels", "hypothesis_template"]


@pytest.mark.parametrize("labels,words", [
    ([], "non-empty list of labels"),
    (["hat", "hat"], "label 'hat' appears twice"),
    (["hat", 3], "label 1 must be a string"),
    (["hat", "  "], "label 1 is empty"),
    ([{"name": "hat", "colour": "red"}], "unknown keys \\['colour'\\]"),
    ([{"name": "hat", "synonyms": "cap"}], "synonyms must be a list"),
])
def test_bad_label_files_are_refused(tmp_path, labels, words):
    with pytest.raises(ModelLoadError, match=words):
        read_label_file(_label_file(tmp_path, labels), ["a photo of a {}."])


def test_shipped_wearables_file(tmp_path):
    ls = read_label_file(os.path.join(os.path.dirname(__file__), "..", "conf", "labels", "wearables.yaml"),
                         load_settings().classifier.templates)
    assert len(ls.labels) == 20 and ls.name == "wearables"
    trousers = ls.prompts[ls.labels.index("trousers")]
    assert "a photo of a pants." in trousers and len(trousers) == 3 * 3


@pytest.mark.spark
def test_spark_job_gives_labels_scores_and_errors(toy_classifier, tmp_path):
    from clip_pyfunc.batch.spark import run_job, spark_session, stop_session

    rows, truth = _held_out(20, seed=9)
    rows[4] = "%%% not base64"
    pd.DataFrame({"id": range(20), "image_b64": rows}).to_parquet(tmp_path / "in.parquet")
    spark = spark_session("local[2]", batch_rows=8,
                          conf={"spark.sql.warehouse.dir": str(tmp_path / "wh"), "spark.sql.shuffle.partitions": "2"})
    try:
        uri = toy_classifier["models"]["classifier"]["uri"]
        report = run_job(spark, model_uri=uri, source=str(tmp_path / "in.parquet"), output=str(tmp_path / "out.parquet"),
                         id_col="id", input_col="image_b64")
        out = spark.read.parquet(str(tmp_path / "out.parquet")).toPandas().sort_values("id").reset_index(drop=True)
    finally:
        stop_session(spark)
    assert (report["rows"], report["failed"]) == (20, 1)
    assert list(out.columns) == ["id", "labels", "scores", "error"]
    local = mlflow.pyfunc.load_model(uri).predict([r for i, r in enumerate(rows) if i != 4])
    good = [i for i in range(20) if i != 4]
    assert [list(out["labels"][i]) for i in good] == list(local["labels"])
    assert np.allclose(np.stack([out["scores"][i] for i in good]), np.stack(local["scores"]), atol=1e-6)
    assert out["labels"][4] is None and "invalid base64" in out["error"][4]


@pytest.mark.slow
def test_bench_classifier_cli_on_tiny_random_model(tmp_path):
    import subprocess

    out = subprocess.run(["clip-pyfunc", "bench-classifier", "--random-init", "tiny", "--rows", "4", "--labels", "5"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["random_weights"] and result["labels"] == 5 and result["rows_per_request"] == 4
    assert result["image_model_ms_per_row"] > 0 and result["classifier_ms_per_row"] > 0
    assert "classifier_added_ms_per_row" in result and result["machine"]["cores"] >= 1
