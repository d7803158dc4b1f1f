"""Artifacts written by a newer clip-pyfunc still load here: unknown stored fields are named once and ignored."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import pytest

from clip_pyfunc.artifacts.towers import INFO_FILE, CheckpointInfo
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.stages.preprocess import ImageSpec

LOGGER = "clip_pyfunc.artifacts.towers"


def _info() -> CheckpointInfo:
    spec = ImageSpec(shortest_edge=224, resize_hw=None, crop_hw=(224, 224), resample=3, rescale=1 / 255,
                     mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
    return CheckpointInfo(family="clip", embedding_dim=512, scoring="softmax", scale=100.0, bias=0.0,
                          context_length=77, pad_to=None, lowercase=True, attention_mask=True,
                          fidelity={"torch": {"bf16": 0.999}, "openvino": {"fp32": 1.0}},
                          unavailable={"openvino": {"image": "why"}},
                          pad_id=49407, tokenizer="tokenizers",
                          image_spec=json.loads(json.dumps(spec.to_dict())))  # as stored: lists


def _inject(folder: str, top: dict, image_spec: dict | None = None) -> None:
    path = os.path.join(folder, INFO_FILE)
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    record.update(top)
    record["image_spec"].update(image_spec or {})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_unknown_fields_are_ignored_with_one_warning_naming_them(tmp_path, caplog):
    info = _info()
    info.write(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clean = CheckpointInfo.read(str(tmp_path))
    assert clean == info and _warnings(caplog) == []

    _inject(str(tmp_path), {"quantization": {"int4": 0.97}, "family_revision": 3},
            image_spec={"antialias_v2": True})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        read = CheckpointInfo.read(str(tmp_path))
    assert read == info
    assert ImageSpec.from_dict(read.image_spec) == ImageSpec.from_dict(info.image_spec)
    (message,) = _warnings(caplog)
    assert INFO_FILE in message
    for name in ("quantization", "family_revision", "image_spec.antialias_v2"):
        assert name in message


def test_a_description_written_before_the_fidelity_table_reads_into_it(tmp_path, caplog):
    """Artifacts from before issue 37 kept one field per engine; they load, with nothing lost and no warning."""
    info = _info()
    info.write(str(tmp_path))
    path = tmp_path / INFO_FILE
    record = json.loads(path.read_text())
    for name in ("fidelity", "unavailable"):
        del record[name]
    record |= {"precision_cosine": {"bf16": 0.999}, "openvino_cosine": {"fp32": 1.0},
               "openvino_fallback": {"image": "why"}}
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert CheckpointInfo.read(str(tmp_path)) == info
    assert _warnings(caplog) == []


def test_without_image_spec_and_with_missing_fields(tmp_path):
    info = dataclasses.replace(_info(), image_spec=None)
    info.write(str(tmp_path))
    path = tmp_path / INFO_FILE
    record = json.loads(path.read_text()) | {"new_thing": 1}
    path.write_text(json.dumps(record))
    assert CheckpointInfo.read(str(tmp_path)) == info
    # A field this version needs is still an error that names the file.
    del record["embedding_dim"]
    path.write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="cannot read the checkpoint description .*embedding_dim"):
        CheckpointInfo.read(str(tmp_path))
    path.write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="expected a JSON object"):
        CheckpointInfo.read(str(tmp_path))


def test_labels_record_with_an_unknown_key_loads(tmp_path):
    from clip_pyfunc.artifacts.labels import LABELS_FILE, label_set, load_labels, save_labels

    labels = label_set(["cat", "dog"], ["a photo of a {}."])
    save_labels(str(tmp_path), labels, np.eye(2, 4, dtype=np.float32))
    path = tmp_path / LABELS_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | {"label_descriptions": {"cat": "a small feline"}}))
    record, vectors = load_labels(str(tmp_path))
    assert record["labels"] == ["cat", "dog"] and record["templates"] == ["a photo of a {}."]
    assert vectors.shape == (2, 4)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_registered_model_with_injected_fields_loads_and_predicts(registered, image_model, text_model, tmp_path,
                                                                  caplog, tower):
    import mlflow

    from clip_pyfunc.dev.samples import SAMPLE_TEXTS, sample_images_b64

    root = mlflow.artifacts.download_artifacts(registered["models"][tower]["uri"], dst_path=str(tmp_path))
    folders = [d for d, _, files in os.walk(root) if INFO_FILE in files]
    assert folders
    for folder in folders:
        _inject(folder, {"future_field": "x"}, image_spec={"future_resize": "lanczos"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = mlflow.pyfunc.load_model(root)
    assert len(_warnings(caplog)) == 1 and "future_field" in _warnings(caplog)[0]
    inputs, reference = (sample_images_b64(), image_model) if tower == "image" else (list(SAMPLE_TEXTS), text_model)
    got = model.predict(inputs)
    assert got.dtype == np.float32 and got.shape[0] == len(inputs)
    np.testing.assert_array_equal(got, reference.predict(inputs))


def test_a_model_config_key_of_a_newer_version_is_left_out_with_a_warning(caplog):
    """MLflow drops caller keys the logged model_config lacks, so an unknown key reaching the model was logged by
    a newer clip-pyfunc: the model loads, and the key is named once."""
    import logging

    from clip_pyfunc.settings import RuntimeConfig

    logger = logging.getLogger("clip_pyfunc.settings")
    disabled, logger.disabled = logger.disabled, False  # a logging set-up earlier in the session may have
    try:
        with caplog.at_level(logging.WARNING, logger="clip_pyfunc.settings"):
            config = RuntimeConfig.from_dict({**RuntimeConfig().to_dict(), "decode_threads": 4, "batch_size": 8})
    finally:
        logger.disabled = disabled
    assert config.batch_size == 8
    named = [r.getMessage() for r in caplog.records if "decode_threads" in r.getMessage()]
    assert len(named) == 1 and "left out" in named[0]
