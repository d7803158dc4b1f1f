"""`clip-pyfunc evaluate` on generated data in all three formats, toy vs random weights."""

from __future__ import annotations

import json
import os
import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest

from clip_pyfunc.batch.evaluate.data import read_data
from clip_pyfunc.batch.evaluate.run import run
from clip_pyfunc.dev.toy_checkpoint import COLOURS, LABELS, SHAPES, draw, train_toy_checkpoint

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def random_toy(tmp_path_factory) -> str:
    """The toy's shapes and tokenizer after 2 steps: an untrained model of the same shape."""
    path = str(tmp_path_factory.mktemp("random-toy") / "clip-random")
    train_toy_checkpoint(path, steps=2, log=lambda line: None)
    return path


@pytest.fixture(scope="module")
def shape_data(tmp_path_factory) -> dict:
    """Held-out generated shapes in the three formats, each with bad rows planted."""
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(1234)
    (root / "img").mkdir()
    (root / "labels").mkdir()
    rows = []
    for i in range(105):
        colour, shape = LABELS[i % len(LABELS)].split()
        img, _ = draw(colour, shape, rng)
        name = f"img/{i:03d}.png"
        img.save(root / name)
        (root / "labels" / f"{colour} {shape}").mkdir(exist_ok=True)
        img.save(root / "labels" / f"{colour} {shape}" / f"{i:03d}.png")
        rows.append((name, colour, shape))
    (root / "labels" / "red circle" / "broken.png").write_bytes(b"not a png at all")
    pairs = [{"image": name, "caption": f"a {c} {s}"} for name, c, s in rows[:15]]
    pairs += [{"image": "img/missing.png", "caption": "a red circle"}, {"image": rows[20][0], "caption": ""}]
    pd.DataFrame(pairs).to_json(root / "pairs.jsonl", orient="records", lines=True)
    neg = []
    for name, c, s in rows[:60]:
        others = [f"a {c2} {s}" for c2 in COLOURS if c2 != c][:2] + [f"a {c} {s2}" for s2 in SHAPES if s2 != s][:1]
        neg.append({"image": name, "positive": f"a {c} {s}", "negatives": json.dumps(others)})
    neg.append({"image": "img/missing.png", "positive": "a red circle", "negatives": json.dumps(["a blue circle"])})
    pd.DataFrame(neg).to_csv(root / "negatives.csv", index=False)
    return {"root": root, "labels": str(root / "labels"), "pairs": str(root / "pairs.jsonl"),
            "negatives": str(root / "negatives.csv")}


def _run(models, data, tmp_path, **kw):
    return run(models, data, experiment=f"evaluate-{tmp_path.name}", out_dir=str(tmp_path / "out"),
               templates=("a {}",), batch_size=64, **kw)


@pytest.mark.parametrize("kind,metric", [("labels", "top1_accuracy"), ("pairs", "image_to_text_recall_at_1"),
                                         ("negatives", "accuracy")])
def test_toy_scores_high_and_random_near_chance(shape_data, toy_checkpoint, random_toy, tracking_uri, tmp_path,
                                                kind, metric):
    result = _run([toy_checkpoint, random_toy], shape_data[kind], tmp_path)
    toy, random = result["models"]
    assert result["data"]["kind"] == kind
    assert toy["metrics"][metric] >= 0.9, toy["metrics"]
    chance = {"labels": 1 / 15, "pairs": 1 / 15, "negatives": 1 / 4}[kind]
    assert random["metrics"][metric] <= chance + 0.25, random["metrics"]
    # Bad rows are reported with row and reason, skipped and counted, never lost.
    skipped = {s["row"]: s["reason"] for s in toy["skipped"]}
    if kind == "pairs":
        assert "cannot read image file" in skipped[15] and "empty" in skipped[16]
    elif kind == "negatives":
        assert "cannot read image file" in skipped[60]
    else:
        assert any("not an image" in r for r in skipped.values())
    assert toy["metrics"]["rows_skipped"] == len(skipped) >= 1
    assert toy["metrics"]["rows_evaluated"] + len(skipped) == toy["metrics"]["rows"]
    # One run per model, the same data set digest on both.
    digests = {mlflow.get_run(m["run_id"]).inputs.dataset_inputs[0].dataset.digest for m in result["models"]}
    assert digests == {result["data"]["digest"]}
    table = open(result["table"]).read()
    assert metric in table and "images_per_s" in table and os.path.getsize(result["plot"]) > 1000
    params = mlflow.get_run(toy["run_id"]).data.params
    assert params["family"] == "clip" and params["embedding_dim"] == "64"


def test_registered_model_pairs_its_text_tower_and_tags_versions(shape_data, toy_checkpoint, tracking_uri,
                                                                 tmp_path):
    from clip_pyfunc.settings import load_settings
    from clip_pyfunc.registry import register_models

    summary = register_models(load_settings(None, {"model": {"source": toy_checkpoint},
                                                   "registry": {"text_name": "toy_text", "image_name": "toy_image"}}))
    result = _run([summary["models"]["image"]["uri"]], shape_data["labels"], tmp_path, tag_versions=True)
    assert result["models"][0]["metrics"]["top1_accuracy"] >= 0.9
    for tower in ("text", "image"):
        mv = mlflow.MlflowClient().get_model_version_by_alias(summary["models"][tower]["name"], "champion")
        assert mv.tags["eval_top1_accuracy"].startswith("0.9") or mv.tags["eval_top1_accuracy"].startswith("1.0")


def test_precomputed_image_embeddings_give_the_same_metrics(shape_data, toy_checkpoint, tracking_uri, tmp_path):
    from clip_pyfunc.batch.evaluate.run import load_candidate

    data = read_data(shape_data["pairs"])
    cand = load_candidate(toy_checkpoint, str(tmp_path / "w"))
    refs = pd.read_json(shape_data["pairs"], lines=True)["image"].tolist()
    vectors, _ = cand.image.embed_rows([v if isinstance(v, bytes) else None for v in data.images])
    pd.DataFrame({"path": refs, "embedding": [None if np.isnan(v).any() else v.tolist() for v in vectors],
                  "error": None}).to_parquet(tmp_path / "emb.parquet")
    fresh = _run([toy_checkpoint], shape_data["pairs"], tmp_path)
    given = _run([toy_checkpoint], shape_data["pairs"], tmp_path, image_embeddings=str(tmp_path / "emb.parquet"))
    for key in ("image_to_text_recall_at_1", "text_to_image_mrr", "rows_skipped"):
        assert given["models"][0]["metrics"][key] == pytest.approx(fresh["models"][0]["metrics"][key], abs=1e-6)


def test_bad_data_is_named(tmp_path):
    from clip_pyfunc.errors import InvalidInput

    (tmp_path / "x.csv").write_text("picture,text\na.png,hello\n")
    with pytest.raises(InvalidInput, match=r"columns \['picture', 'text'\]; expected one of"):
        read_data(str(tmp_path / "x.csv"))
    with pytest.raises(InvalidInput, match="use a .jsonl, .csv or .parquet"):
        read_data(str(tmp_path / "x.txt"))


def test_cli_prints_json_only_on_stdout(shape_data, toy_checkpoint, tmp_path):
    out = subprocess.run(["clip-pyfunc", "evaluate", "--models", toy_checkpoint, "--data", shape_data["negatives"],
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["headline_metric"] == "accuracy" and summary["models"][0]["metrics"]["accuracy"] >= 0.9
    assert "| model |" in out.stderr  # the comparison table goes to stderr with the progress bar
