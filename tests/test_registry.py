"""Registry: sqlite and a real `mlflow server` over HTTP, versions and aliases, hub resolution."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import free_port, start_server, stop_server, wait_ready
from clip_pyfunc.settings import load_settings
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.registry import register_models


@contextlib.contextmanager
def tracking(uri: str):
    """Point MLflow (and MLFLOW_TRACKING_URI) at another store for the block."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = old or ""
        mlflow.set_tracking_uri(old)


def _settings(checkpoint: str, **registry):
    return load_settings(None, {"model": {"source": checkpoint}, "registry": registry})


def test_registered_versions_carry_tags_and_description(registered, tiny_checkpoint):
    client = MlflowClient()
    for tower in ("text", "image"):
        m = registered["models"][tower]
        mv = client.get_model_version_by_alias(m["name"], "champion")
        assert str(mv.version) == m["version"]
        assert mv.tags["base_checkpoint"] == tiny_checkpoint
        assert mv.tags["revision"] == "local" and mv.tags["embedding_dim"] == "32"
        assert mv.tags["random_init"] == "tiny"
        assert "float32 [32]" in mv.description and "RANDOM WEIGHTS" in mv.description
    assert registered["embedding_dim"] == 32 and "meaningless" in registered["warning"]


def test_second_register_makes_version_2_and_moves_alias(tmp_path, tiny_checkpoint):
    with tracking(f"sqlite:///{tmp_path}/reg.db") as client:
        mlflow.create_experiment("clip-pyfunc", artifact_location=str(tmp_path / "art"))
        first = register_models(_settings(tiny_checkpoint))
        second = register_models(_settings(tiny_checkpoint))
        for tower in ("text", "image"):
            name = second["models"][tower]["name"]
            assert (first["models"][tower]["version"], second["models"][tower]["version"]) == ("1", "2")
            assert str(client.get_model_version_by_alias(name, "champion").version) == "2"


def test_dotted_names_pass_through(tmp_path, tiny_checkpoint):
    with tracking(f"sqlite:///{tmp_path}/reg.db") as client:
        mlflow.create_experiment("clip-pyfunc", artifact_location=str(tmp_path / "art"))
        out = register_models(_settings(tiny_checkpoint, text_name="main.search.clip_text",
                                        image_name="main.search.clip_image", alias="prod"))
        assert out["models"]["text"]["uri"] == "models:/main.search.clip_text@prod"
        assert str(client.get_model_version_by_alias("main.search.clip_image", "prod").version) == "1"
        v = mlflow.pyfunc.load_model("models:/main.search.clip_text@prod").predict(pd.DataFrame({"input": ["a"]}))
        assert v.shape == (1, 32)


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real `mlflow server` subprocess on a free loopback port."""
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_server(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, seconds=60, path="/health")
        yield url
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_register_against_real_mlflow_server(mlflow_server, tiny_checkpoint, text_model):
    with tracking(mlflow_server) as client:
        out = register_models(_settings(tiny_checkpoint))
        assert out["tracking_uri"] == mlflow_server
        mv = client.get_model_version_by_alias("clip_text_embedding", "champion")
        assert str(mv.version) == "1" and mv.tags["embedding_dim"] == "32"
        remote = mlflow.pyfunc.load_model("models:/clip_text_embedding@champion")
        frame = pd.DataFrame({"input": ["a photo of a dog", "ünï"]})
        np.testing.assert_allclose(remote.predict(frame), text_model.predict(frame), atol=1e-6)
    # The CLI over HTTP: MLflow writes "View run ... at: http://..." to stdout; ours keeps stdout pure JSON.
    out = subprocess.run(["clip-pyfunc", "register", "--model", tiny_checkpoint, "--with-combined",
                          "--azure-compatible"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["tracking_uri"] == mlflow_server and summary["models"]["text"]["version"] == "2"
    assert "View run" in out.stderr and mlflow_server in out.stderr
    combined = summary["models"]["combined"]
    assert combined["name"] == "clip_image_text_embedding" and combined["normalize"] is False


def _fake_hub_cache(cache: str, repo: str, checkpoint: str, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """Lay out a checkpoint the way huggingface_hub caches a snapshot (refs/main -> snapshot)."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    shutil.copytree(checkpoint, snap)
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return commit


RESOLVE = ("import json,sys; from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint as r; "
           "c = r(sys.argv[1], cache_dir=sys.argv[2]); print(json.dumps([c.path, c.revision]))")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_id_resolves_from_cache(tmp_path, tiny_checkpoint, offline):
    commit = _fake_hub_cache(str(tmp_path / "hub"), "acme/clip-tiny", tiny_checkpoint)
    env = dict(os.environ, HF_HUB_OFFLINE=offline)
    out = subprocess.run([sys.executable, "-c", RESOLVE, "acme/clip-tiny", str(tmp_path / "hub")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'"{commit}"]' in out.stdout


def test_unreachable_hub_says_how_to_use_a_local_directory(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", RESOLVE, "openai/clip-vit-base-patch32", str(tmp_path / "empty")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "could not reach the Hugging Face hub" in out.stderr and "local directory" in out.stderr


def test_missing_or_wrong_checkpoint_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        register_models(_settings(str(tmp_path / "nope")))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="model_type 'bert', which is not a supported dual-encoder family"):
        register_models(_settings(str(tmp_path)))
