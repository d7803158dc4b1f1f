"""Small where it is deployed (issue 39): one engine's files per tower, the IR's weight storage measured and
gated, the mapped IR released after the first forward, and text padded to a few shapes with unchanged vectors."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest

from clip_pyfunc.settings import load_settings
from conftest import load_on_engine

# Token lengths (with the two special tokens) of these rows on the test tokenizer run from 3 to well past 8, few of
# them a multiple of 8: padding to the bucket adds positions to most rows.
TEXTS = ["a", "a red circle", "", "a photo of a small blue triangle on a grey background",
         "ünïcödé ✓ 一张猫的照片", "the cat is on the mat " * 6, "don't <b>tags</b> & emoji 🙂 1,234.5"]


def _artifact(uri: str, tower: str) -> str:
    return os.path.join(mlflow.artifacts.download_artifacts(uri), "artifacts", f"{tower}_tower")


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_text_padded_to_length_and_row_buckets_gives_the_vectors_of_each_row_alone(registered, engine):
    import dataclasses

    from clip_pyfunc.runtime.engines.openvino_engine import bucket_rows
    from clip_pyfunc.stages.preprocess import tokenize

    model = load_on_engine(registered["models"]["text"]["uri"], engine)
    python_model = model.unwrap_python_model()
    spec = python_model.text_spec
    lengths = [len(ids) for ids in tokenize(python_model.tokenizer, TEXTS, spec)]
    assert spec.length_step == 8 and spec.pad_to is None
    assert sum(spec.width(n) > n for n in lengths) >= 4, lengths  # most rows get padding they did not have
    assert bucket_rows(len(TEXTS)) > len(TEXTS)  # and OpenVINO pads the batch with rows
    together = model.predict(TEXTS)
    python_model.text_spec = dataclasses.replace(spec, length_step=1)
    try:
        alone = np.concatenate([model.predict([text]) for text in TEXTS])  # each row at its own length, one row
    finally:
        python_model.text_spec = spec
    np.testing.assert_allclose(together, alone, atol=2e-6)
    assert np.isfinite(together).all()


def test_bucket_widths_and_rows():
    from clip_pyfunc.runtime.engines.openvino_engine import bucket_rows
    from clip_pyfunc.stages.preprocess import TextSpec

    spec = TextSpec(max_length=77, pad_id=0, truncate=True, length_step=8)
    assert [spec.width(n) for n in (1, 8, 9, 70, 72, 73, 77)] == [8, 8, 16, 72, 72, 77, 77]
    assert TextSpec(max_length=64, pad_id=0, truncate=True, pad_to=64, length_step=8).width(5) == 64
    assert TextSpec(max_length=77, pad_id=0, truncate=True).width(5) == 5  # no step: the longest row
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 8, 9, 17, 25, 32)] == [1, 2, 4, 8, 8, 16, 24, 32, 32]
    assert len({(spec.width(n), bucket_rows(b)) for n in range(1, 78) for b in range(1, 33)}) == 10 * 7


def _mapped_rss_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    real, total, current = os.path.realpath(path), 0, None
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and ":" not in fields[0]:  # a mapping's header line
                current = fields[5] if len(fields) >= 6 else None
            elif fields and fields[0] == "Rss:" and current == real:
                total += int(fields[1])
    return total


def test_the_mapped_ir_is_released_after_the_first_forward(registered):
    from clip_pyfunc.runtime.engines.openvino_engine import OpenVINOEngine, release_file_pages
    from clip_pyfunc.settings import RuntimeConfig

    folder = _artifact(registered["models"]["image"]["uri"], "image")
    weights = os.path.join(folder, "openvino_model.bin")
    runtime = OpenVINOEngine.make_runtime(RuntimeConfig(engine="openvino", precision="fp32"), "fp32", False)
    pixels = np.zeros((2, 3, *_image_hw(folder)), dtype=np.float32)

    held = OpenVINOEngine.load(folder, "image", runtime)
    held.weights_file = None  # as before: nothing released
    held.image_features(pixels)
    resident = _mapped_rss_kib(weights)
    assert resident > 0.5 * os.path.getsize(weights) / 1024, resident  # the whole file was read and stays
    assert release_file_pages(weights) > 0
    assert _mapped_rss_kib(weights) < 0.05 * os.path.getsize(weights) / 1024
    before = held.image_features(pixels)  # the compiled model does not need the pages back
    del held

    engine = OpenVINOEngine.load(folder, "image", runtime)
    assert engine.weights_file == weights
    np.testing.assert_array_equal(engine.image_features(pixels), before)
    assert engine.weights_file is None and _mapped_rss_kib(weights) < 0.05 * os.path.getsize(weights) / 1024


def _image_hw(folder: str) -> tuple[int, int]:
    from clip_pyfunc.stages.preprocess import read_image_spec

    return read_image_spec(folder).output_hw


def test_the_weight_storage_verdict_is_the_gate_of_every_pair():
    from clip_pyfunc.registry.weights import SPEED_FLOOR, StorageMeasure

    fp32_ir = {"fp32": 1.0, "bf16": 0.99995}
    kept = StorageMeasure(storage="int8", cosine={"fp32": 0.99992, "bf16": 0.99991}, speed=SPEED_FLOOR, at="bf16")
    assert kept.held(fp32_ir) is None
    lost = StorageMeasure(storage="int8", cosine={"fp32": 0.99992, "bf16": 0.99985}, speed=1.2, at="bf16")
    assert "0.99985 < 0.9999 on bf16" in lost.held(fp32_ir)
    slow = StorageMeasure(storage="int8", cosine={"fp32": 0.99999, "bf16": 0.99995}, speed=0.94, at="bf16")
    assert "0.94x" in slow.held(fp32_ir)
    # a precision the fp32 IR did not hold either (bf16 at 0.9997) is not one the storage could lose
    assert StorageMeasure(storage="fp16", cosine={"fp32": 0.99999, "bf16": 0.9996}, speed=1.0,
                          at="fp32").held({"fp32": 1.0, "bf16": 0.9997}) is None


@pytest.fixture(scope="module")
def registered_default(tiny_checkpoint, tracking_uri):
    """The tiny checkpoint registered with the package's defaults but the engines' fixed order (tests/clip_pyfunc.yaml;
    test_speed.py has the measured one): engine auto, the chosen engine's files,
    the IR's weight storage chosen by measurement)."""
    from clip_pyfunc.registry import register_models

    return register_models(load_settings(None, {
        "model": {"source": tiny_checkpoint},
        "registry": {"text_name": "default_text", "image_name": "default_image", "engines": True,
                     "engine_files": "chosen", "ir_weights": "auto"},
        "runtime": {"engine": "auto", "precision": "default"}}))


def test_a_default_registration_ships_one_engine_s_files_measured_and_no_torch(registered_default, registered):
    summary = registered_default
    assert summary["engine_files"] == {"text": ["openvino"], "image": ["openvino"]}
    weights, notes = summary["engines"]["ir_weights"], summary["engines"]["notes"]["openvino weights"]
    assert set(weights) == {"text", "image"} and set(weights.values()) <= {"int8", "fp16", "fp32"}
    for tower in ("text", "image"):  # both candidates measured on both towers, with cosine and speed
        part = next(p for p in notes.split(" | ") if p.startswith(f"{tower}: kept {weights[tower]}"))
        assert "int8: cosine fp32 " in part and "fp16: cosine fp32 " in part and "x speed in " in part, part
        uri = summary["models"][tower]["uri"]
        folder = _artifact(uri, tower)
        assert sorted(f for f in os.listdir(folder) if f.startswith(("model.", "openvino_model"))) == [
            "openvino_model.bin", "openvino_model.xml"]
        with open(os.path.join(mlflow.artifacts.download_artifacts(uri), "requirements.txt")) as f:
            names = {line.split("==")[0].strip() for line in f if line.strip()}
        assert "torch" not in names and {"openvino", "safetensors"} <= names, names  # safetensors: label vectors
    # the kept storage held the gate: the fidelity table is measured on the shipped IRs
    assert summary["engines"]["openvino"]["fp32"] >= 0.9999
    version = mlflow.MlflowClient().get_model_version("default_image", summary["models"]["image"]["version"])
    assert version.tags["openvino_ir_weights_image"] == weights["image"]
    assert "fp16: cosine" in version.tags["measurement_note_openvino_weights"]
    text = mlflow.pyfunc.load_model(summary["models"]["text"]["uri"])
    assert text.unwrap_python_model().runtime.engine == "openvino"
    reference = load_on_engine(registered["models"]["text"]["uri"], "torch").predict(TEXTS)
    assert np.min(np.sum(text.predict(TEXTS) * reference, axis=1)) >= 0.999
    with pytest.raises(Exception, match="--all-engine-files"):
        mlflow.pyfunc.load_model(summary["models"]["image"]["uri"], model_config={"engine": "torch"})


def test_a_runtime_this_machine_cannot_resolve_keeps_every_engine_s_files(tiny_checkpoint, tracking_uri):
    """Registering on a CPU for a CUDA server: nothing is chosen here, so nothing is dropped, and the summary says why."""
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.runtime import cuda_available

    assert not cuda_available()  # the case under test: a CPU machine registering for `device: cuda`
    summary = register_models(load_settings(None, {
        "model": {"source": tiny_checkpoint},
        "registry": {"text_name": "for_cuda_text", "image_name": "for_cuda_image", "engine_files": "chosen"},
        "runtime": {"device": "cuda", "engine": "auto"}}))
    assert summary["engine_files"] == {"text": ["torch"], "image": ["torch"]}
    assert "every engine's files kept" in summary["engines"]["notes"]["engine files"]
    assert "cuda" in summary["engines"]["notes"]["engine files"].lower()
