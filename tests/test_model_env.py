"""The logged model loads where only its logged requirements and shipped code exist.

`mlflow models predict --env-manager uv` builds a fresh virtual environment from the model's
requirements.txt alone (clip_pyfunc is not installed there: it comes from the model's code/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.models import convert_input_example_to_serving_input

from conftest import b64, encode, photo


def _predict_in_env_built_from_model_alone(uri: str, frame: pd.DataFrame, tmp_path) -> np.ndarray:
    (tmp_path / "in.json").write_text(convert_input_example_to_serving_input(frame))
    env = dict(os.environ)
    if os.path.isdir("/opt/wheels"):  # uv ignores pip's find-links; without it torch resolves to the CUDA build
        env["UV_FIND_LINKS"] = "/opt/wheels"
    out = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", uri,
         "--env-manager", "uv", "-i", str(tmp_path / "in.json"), "--content-type", "json",
         "-o", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=1500, env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    return predictions if predictions and isinstance(predictions[0], dict) else np.asarray(predictions, np.float32)


@pytest.mark.slow
@pytest.mark.env
def test_image_model_predicts_in_env_built_from_model_alone(tmp_path, registered, image_model):
    frame = pd.DataFrame({"input": [b64(encode(photo(64, 48, s), "JPEG")) for s in range(3)]})
    got = _predict_in_env_built_from_model_alone(registered["models"]["image"]["uri"], frame, tmp_path)
    np.testing.assert_allclose(got, image_model.predict(frame), atol=1e-6)


@pytest.mark.slow
@pytest.mark.env
def test_sentencepiece_text_model_predicts_in_env_built_from_model_alone(tmp_path, registered_families):
    """SigLIP's tokenizer needs sentencepiece and protobuf: the logged requirements must bring them."""
    import mlflow

    uri = registered_families["siglip"]["models"]["text"]["uri"]
    reqs = open(os.path.join(mlflow.artifacts.download_artifacts(uri), "requirements.txt")).read()
    assert "sentencepiece==" in reqs and "protobuf==" in reqs
    frame = pd.DataFrame({"input": ["a photo of a cat", "A PHOTO, of a dog!"]})
    got = _predict_in_env_built_from_model_alone(uri, frame, tmp_path)
    np.testing.assert_allclose(got, mlflow.pyfunc.load_model(uri).predict(frame), atol=1e-6)


@pytest.mark.slow
@pytest.mark.env
def test_combined_model_predicts_in_env_built_from_model_alone(tmp_path, tiny_checkpoint, tracking_uri):
    import mlflow

    from clip_pyfunc.settings import load_settings
    from clip_pyfunc.registry import register_models

    summary = register_models(load_settings(None, {"model": {"source": tiny_checkpoint}, "registry": {
        "text_name": "env_text", "image_name": "env_image", "combined_name": "env_both", "with_combined": True}}))
    uri = summary["models"]["combined"]["uri"]
    frame = pd.DataFrame({"image": [b64(encode(photo(64, 48), "JPEG")), ""], "text": ["", "a photo of a cat"]})
    got = _predict_in_env_built_from_model_alone(uri, frame, tmp_path)
    local = mlflow.pyfunc.load_model(uri).predict(frame)
    assert got[0]["text_features"] is None and got[1]["image_features"] is None
    np.testing.assert_allclose(got[0]["image_features"], local["image_features"][0], atol=1e-6)
    np.testing.assert_allclose(got[1]["text_features"], local["text_features"][1], atol=1e-6)
