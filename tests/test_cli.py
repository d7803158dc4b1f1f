"""The `clip-pyfunc` console script end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


def _run(args, cwd, **env):
    return subprocess.run(["clip-pyfunc", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env))


@pytest.mark.slow
def test_demo_registers_and_embeds_in_embedded_registry(tmp_path, tiny_checkpoint):
    env = {"MLFLOW_TRACKING_URI": ""}  # unset: MLflow's embedded default, ./mlflow.db
    out = _run(["demo", "--model", tiny_checkpoint], tmp_path, **env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert summary["models"]["text"]["uri"] == "models:/clip_text_embedding@champion"
    assert summary["demo"]["text_vectors"] == [4, 32] and summary["demo"]["image_vectors"] == [4, 32]  # 4 samples
    assert (tmp_path / "mlflow.db").exists()
    again = json.loads(_run(["register", "--model", tiny_checkpoint], tmp_path, **env).stdout)
    assert again["models"]["image"]["version"] == "2"


def test_random_checkpoint_and_bad_model_exit_2(tmp_path):
    out = _run(["random-checkpoint", str(tmp_path / "ck")], tmp_path)
    assert out.returncode == 0 and "meaningless" in json.loads(out.stdout)["warning"]
    assert (tmp_path / "ck" / "model.safetensors").exists()
    bad = _run(["register", "--model", str(tmp_path / "missing")], tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    conf = tmp_path / "c.yaml"
    conf.write_text("runtime:\n  precision: fp64\n")
    bad = _run(["register", "--conf", str(conf), "--model", str(tmp_path / "ck")], tmp_path)
    assert bad.returncode == 2 and "precision 'fp64'" in bad.stderr


@pytest.mark.slow
def test_mlproject_main_entry_point(tmp_path, tiny_checkpoint):
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run(
        ["mlflow", "run", root, "-e", "main", "--env-manager", "local", "-P", f"model={tiny_checkpoint}",
         "-P", "alias=staging", "--experiment-name", "clip-pyfunc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        # (mlflow.set_experiment in earlier tests exports MLFLOW_EXPERIMENT_ID, which `mlflow run` refuses
        # beside --experiment-name.)
        env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"},
             "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/proj.db"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"uri": "models:/clip_text_embedding@staging"' in out.stdout
