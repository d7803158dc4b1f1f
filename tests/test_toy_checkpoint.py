"""The trained toy checkpoint: seeded, accurate on held-out shapes, labelled as a toy everywhere."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from clip_pyfunc.dev.toy_checkpoint import LABELS, train_toy_checkpoint


def _digest(path: str) -> str:
    return hashlib.sha256(open(os.path.join(path, "model.safetensors"), "rb").read()).hexdigest()


def test_training_is_seeded_and_deterministic(tmp_path):
    quiet = dict(steps=12, images=600, held_out_images=30, log=lambda line: None)  # the same code, less data
    a = train_toy_checkpoint(str(tmp_path / "a"), seed=3, **quiet)
    b = train_toy_checkpoint(str(tmp_path / "b"), seed=3, **quiet)
    c = train_toy_checkpoint(str(tmp_path / "c"), seed=4, **quiet)
    assert _digest(a["path"]) == _digest(b["path"]) != _digest(c["path"])


def test_toy_checkpoint_is_accurate_and_says_so(toy_checkpoint):
    record = json.load(open(os.path.join(toy_checkpoint, "config.json")))["clip_pyfunc_toy"]
    assert record["zero_shot_accuracy"] >= 0.9 and record["held_out_images"] == 300
    assert record["labels"] == list(LABELS) and "toy" in record["note"]


@pytest.mark.slow
def test_readme_main_job_shows_true_matches(tmp_path, toy_checkpoint):
    """The README's first command's demo on the toy: each caption finds its own picture."""
    import subprocess

    out = subprocess.run(["clip-pyfunc", "demo", "--model", toy_checkpoint], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, MLFLOW_TRACKING_URI=""))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["demo"]["best_image_for_text"] == {
        "a red circle": "red circle", "a blue triangle": "blue triangle", "a green square": "green square",
        "a purple triangle": "purple triangle"}
    assert "toy checkpoint" in summary["warning"] and summary["toy"]["zero_shot_accuracy"] >= 0.9
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    mv = client.get_model_version_by_alias("clip_text_embedding", "champion")
    assert "generated shapes" in mv.tags["toy_checkpoint"] and "TOY CHECKPOINT" in mv.description
