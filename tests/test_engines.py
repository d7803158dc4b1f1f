"""Engines: OpenVINO IR exported at registration, every family on every engine it takes, fidelity-gated
defaults, fallback to torch when the IR is missing or damaged, and a model that serves without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

import family_checkpoints
from conftest import b64, encode, load_on_engine, photo
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.runtime import DEFAULT_PRECISION_COSINE, pick_runtime
from clip_pyfunc.settings import RuntimeConfig
from test_families import IMAGES, TEXTS, reference_image, reference_text

FAMILIES = sorted(family_checkpoints.BUILDERS)
# Families whose tower OpenVINO cannot convert, and why: they register with the torch engine for that tower.
NO_IR = {("align", "image"): "EfficientNet"}
# The engine rules hold per CPU: each test of one sets the CPU it assumes (conftest's `cpu`), both kinds
# CI runs on, rather than reading the machine it runs on.
CPUS = pytest.mark.parametrize("native_bf16", [False, True], ids=["avx2-cpu", "native-bf16-cpu"])


def _artifact(uri: str) -> str:
    root = mlflow.artifacts.download_artifacts(uri)
    return next(d for d, _, files in os.walk(root) if "clip_pyfunc.json" in files)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_on_openvino_matches_its_reference(registered_families, checkpoints, name):
    """Text and image vectors from the OpenVINO engine against the family's own transformers pipeline."""
    models = registered_families[name]["models"]
    fallback = registered_families[name]["engines"]["openvino"]["fallback"]
    for tower, inputs, reference in (("text", TEXTS, lambda: reference_text(checkpoints[name], name, TEXTS)),
                                     ("image", [b64(x) for x in IMAGES],
                                      lambda: reference_image(checkpoints[name], IMAGES))):
        if (name, tower) in NO_IR:
            assert tower in fallback, fallback  # registered anyway; the summary says why
            model = mlflow.pyfunc.load_model(models[tower]["uri"], model_config={"engine": "openvino"})
            unwrapped = model.unwrap_python_model()
            assert unwrapped.runtime.engine == "torch" and "no OpenVINO IR" in unwrapped.engine_note
            continue
        assert tower not in fallback
        model = load_on_engine(models[tower]["uri"], "openvino", fast_decode=False)
        got = model.predict(inputs)
        want = reference()
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 2e-5, (tower, np.abs(got - want).max())


@CPUS
def test_fidelity_is_recorded_and_default_takes_the_fastest_pair_that_held(registered, cpu, native_bf16):
    engines = registered["engines"]
    # torch fp32's arithmetic reordered; held to the bar a pair must hold to be the default (checked below)
    assert engines["openvino"]["fp32"] >= DEFAULT_PRECISION_COSINE
    image = registered["models"]["image"]
    tags = mlflow.MlflowClient().get_model_version(image["name"], image["version"]).tags
    assert float(tags["cosine_to_fp32_openvino_fp32"]) == engines["openvino"]["fp32"]
    cpu(native_bf16=native_bf16)  # set for the loads only: registration measured on this machine's CPU
    model = mlflow.pyfunc.load_model(registered["models"]["image"]["uri"], model_config={"engine": "auto",
                                                                                          "precision": "default"})
    runtime = model.unwrap_python_model().runtime
    measured = {"torch": {k: v for k, v in engines["torch"].items() if k != "fp32"},
                "openvino": {k: v for k, v in engines["openvino"].items() if k != "fallback"}}
    if native_bf16 and max(measured["openvino"].get("bf16", 0), measured["torch"].get("bf16", 0)) >= \
            DEFAULT_PRECISION_COSINE:
        assert runtime.precision == "bf16"
    else:
        assert (runtime.engine, runtime.precision) == ("openvino", "fp32")
    # torch fp32, the reference, stays one setting away.
    pinned = mlflow.pyfunc.load_model(registered["models"]["image"]["uri"],
                                      model_config={"engine": "torch", "precision": "fp32"})
    assert (pinned.unwrap_python_model().runtime.engine, pinned.unwrap_python_model().runtime.precision) == (
        "torch", "fp32")


@CPUS
def test_pick_runtime_orders_engines_by_measured_fidelity(cpu, native_bf16):
    cpu(native_bf16=native_bf16)
    default = RuntimeConfig(device="cpu")
    both = frozenset({"torch", "openvino"})
    held = {"torch": {}, "openvino": {"fp32": 0.9999999}}
    missed = {"torch": {}, "openvino": {"fp32": 0.99}}
    assert pick_runtime(default, held, both).engine == "openvino"  # only fp32 measured: the IR that held, on any CPU
    assert pick_runtime(default, missed, both).engine == "torch"  # an IR that missed the bar is never the default
    assert pick_runtime(default, held, frozenset({"torch"})).engine == "torch"  # no IR here
    assert pick_runtime(RuntimeConfig(device="cpu", engine="torch"), held, both).engine == "torch"
    assert pick_runtime(RuntimeConfig(device="cpu", precision="int8"), held, both).engine == "torch"  # no int8 IR
    with pytest.raises(ModelLoadError, match="register with --int8"):
        pick_runtime(RuntimeConfig(device="cpu", engine="openvino", precision="int8"), held, both)
    with pytest.raises(ModelLoadError, match="torch is not installed"):
        pick_runtime(RuntimeConfig(device="cpu", engine="torch"), held, frozenset({"openvino"}))
    with pytest.raises(ModelLoadError, match="runs on CPU"):
        pick_runtime(RuntimeConfig(device="cuda", engine="openvino"), held, both)
    with pytest.raises(ModelLoadError, match="use device 'cpu' or 'auto'"):  # a torch-free model asked for CUDA
        pick_runtime(RuntimeConfig(device="cuda"), held, frozenset({"openvino"}))
    bf16 = {"torch": {}, "openvino": {"fp32": 0.9999999, "bf16": 0.99999}}
    if not native_bf16:  # explicit bf16 under engine auto runs where it can: torch's emulation
        assert pick_runtime(RuntimeConfig(device="cpu", precision="bf16"), bf16, both).engine == "torch"
        with pytest.raises(ModelLoadError, match="AVX512_BF16"):
            pick_runtime(RuntimeConfig(device="cpu", engine="openvino", precision="bf16"), held, both)
        with pytest.raises(ModelLoadError, match="AVX512_BF16"):  # a torch-free model: nothing emulates it
            pick_runtime(RuntimeConfig(device="cpu", precision="bf16"), bf16, frozenset({"openvino"}))
    else:  # native bf16: OpenVINO's, where its bf16 held the default's cosine
        assert pick_runtime(RuntimeConfig(device="cpu", precision="bf16"), bf16, both).engine == "openvino"
        assert pick_runtime(RuntimeConfig(device="cpu", engine="openvino", precision="bf16"), held, both).precision \
            == "bf16"


def _copy_tower(registered, tower, tmp_path) -> str:
    target = str(tmp_path / f"{tower}_tower")
    shutil.copytree(_artifact(registered["models"][tower]["uri"]), target)
    return target


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_damaged_ir_loads_on_torch_and_says_so_once(registered, image_model, tmp_path, caplog, damage):
    from clip_pyfunc.registry.lookup import local_models

    path = _copy_tower(registered, "image", tmp_path)
    xml = os.path.join(path, "openvino_model.xml")
    if damage == "missing":
        os.remove(xml)
    else:
        with open(xml, "r+b") as f:
            f.truncate(os.path.getsize(xml) // 2)
    with caplog.at_level("WARNING", logger="clip_pyfunc.models.base"):
        (model,) = local_models({"image": path}, RuntimeConfig(engine="openvino", precision="fp32"), ("image",))
        frame = pd.DataFrame({"input": [b64(encode(photo(64, 48, s), "JPEG")) for s in range(3)]})
        got = [model.embed_rows(frame["input"].tolist())[0] for _ in range(3)]
    assert model.runtime.engine == "torch"
    assert model.runtime_summary()["note"] and "running on torch" in model.runtime_summary()["note"]
    assert len([r for r in caplog.records if "running on torch" in r.getMessage()]) == 1  # once, not per request
    np.testing.assert_allclose(got[0], image_model.predict(frame), atol=1e-6)


def test_concurrent_predicts_on_openvino_share_a_bounded_request_pool(registered):
    """MLflow's scoring server calls predict from many threads: each gets its own rows back."""
    from concurrent.futures import ThreadPoolExecutor

    model = load_on_engine(registered["models"]["image"]["uri"], "openvino")
    requests = [[b64(encode(photo(64 + 7 * i, 48, i), "JPEG"))] * (1 + i % 3) for i in range(24)]
    want = [model.predict(r) for r in requests]
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(model.predict, requests))
    for w, g in zip(want, got):  # concurrent calls share forwards (runtime.batching): equal but for the last bits
        np.testing.assert_allclose(w, g, atol=2e-6)
    engine = model.unwrap_python_model().engine.engine  # SharedForwards' engine
    assert engine._made <= engine._limit


def test_per_row_errors_are_the_same_on_every_engine(registered):
    cells = [b64(encode(photo(64, 48), "JPEG")), "not base64 !!", b64(b"not an image"), ""]
    messages = {}
    for engine in ("torch", "openvino"):
        model = load_on_engine(registered["models"]["image"]["uri"], engine)
        with pytest.raises(mlflow.exceptions.MlflowException) as e:
            model.predict(cells)
        messages[engine] = str(e.value)
    assert messages["torch"] == messages["openvino"]


@pytest.fixture(scope="module")
def torch_free(tiny_checkpoint, tracking_uri, tmp_path_factory) -> dict:
    """The tiny checkpoint registered for the OpenVINO engine alone, with int8 from an image directory."""
    from clip_pyfunc.dev.samples import camera_jpeg, photo_jpeg
    from clip_pyfunc.registry import register_models
    from clip_pyfunc.settings import load_settings

    calibration = tmp_path_factory.mktemp("calibration")
    for s in range(12):
        (calibration / f"{s}.jpg").write_bytes(photo_jpeg(320, 240, seed=s) if s % 2 else camera_jpeg(320, 240, s))
    (calibration / "notes.txt").write_text("not an image, skipped by suffix")
    return register_models(load_settings(None, {
        "model": {"source": tiny_checkpoint}, "runtime": {"engine": "openvino", "precision": "default"},
        "registry": {"text_name": "free_text", "image_name": "free_image", "combined_name": "free_both",
                     "with_combined": True, "int8": True, "calibration_data": str(calibration), "engines": True}}))


def test_openvino_model_is_logged_and_served_without_torch(torch_free, registered):
    for kind in ("text", "image", "combined"):
        reqs = open(os.path.join(mlflow.artifacts.download_artifacts(torch_free["models"][kind]["uri"]),
                                 "requirements.txt")).read()
        assert "openvino==" in reqs and "tokenizers==" in reqs, reqs
        assert "torch" not in reqs and "transformers" not in reqs and "mlflow-skinny==" in reqs, reqs
        assert not os.path.exists(os.path.join(_artifact(torch_free["models"][kind]["uri"]), "model.safetensors"))
    # fp32 pinned: the bounds below compare OpenVINO fp32 with torch fp32. "default" would be OpenVINO bf16
    # on CPUs with native bf16 (where its bf16 held 0.9999 at registration); which pair "default" takes is
    # test_fidelity_is_recorded_and_default_takes_the_fastest_pair_that_held's subject.
    code = (
        "import json, sys, mlflow\n"
        f"m = mlflow.pyfunc.load_model({torch_free['models']['combined']['uri']!r},\n"
        "                              model_config={'precision': 'fp32'})\n"
        "out = m.predict({'image': [sys.argv[1], ''], 'text': ['', 'a photo of a cat']})\n"
        "runs = [(t.runtime.engine, t.runtime.precision) for t in (m.unwrap_python_model().image, "
        "m.unwrap_python_model().text)]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules,\n"
        "                  'runs': runs, 'image': [float(x) for x in out['image_features'][0]],\n"
        "                  'text': [float(x) for x in out['text_features'][1]]}))\n"
    )
    image = b64(encode(photo(640, 480, 5), "JPEG"))
    out = subprocess.run([sys.executable, "-c", code, image], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["transformers"] is False
    assert got["runs"] == [["openvino", "fp32"]] * 2, got["runs"]
    torch_image = load_on_engine(registered["models"]["image"]["uri"], "torch").predict([image])[0]
    torch_text = load_on_engine(registered["models"]["text"]["uri"], "torch").predict(["a photo of a cat"])[0]
    # Same weights; PIL resamples the reduced-scale decode where torch would (pixels: test_fast_path).
    assert float(np.dot(got["image"], torch_image)) >= 0.999
    # Same inputs and weights, and OpenVINO fp32 is torch fp32's arithmetic reordered (f32 inference is set
    # explicitly, runtime.engines.openvino_engine.compile_tower). The bound is the one the runtime holds a pair
    # to before it runs it by default (runtime.DEFAULT_PRECISION_COSINE, 0.9999): the reordering's cost depends
    # on the CPU's kernels (0.9999896 on a 2-core AMD EPYC, 1.0 on this Xeon).
    assert float(np.dot(got["text"], torch_text)) >= DEFAULT_PRECISION_COSINE


def test_a_spark_plan_of_a_model_with_several_towers_needs_no_torch_on_openvino(torch_free, tmp_path):
    # The combined model carries two towers (and no torch weights): the plan a local Spark job's
    # driver writes for its worker daemon (batch.spark.embed.worker_modules) adds nothing to import.
    from clip_pyfunc.batch.spark.daemon import TORCH_STACK
    from clip_pyfunc.batch.spark.embed import prepare_model, worker_modules

    source = prepare_model(torch_free["models"]["combined"]["uri"], str(tmp_path / "copy"))
    assert worker_modules(source) == ()
    assert worker_modules(source, {"engine": "torch"}) == TORCH_STACK  # no torch artifact: unreadable here


def test_int8_is_measured_on_held_out_images_and_offered_only_where_it_held(torch_free):
    from clip_pyfunc.runtime import INT8_OFFER_COSINE

    openvino = torch_free["engines"]["openvino"]
    assert "int8" in openvino  # measured on the held-out share of the 12 calibration images
    uri = torch_free["models"]["image"]["uri"]
    if openvino["int8"] >= INT8_OFFER_COSINE:
        model = load_on_engine(uri, "openvino", precision="int8")
        assert model.unwrap_python_model().runtime.precision == "int8"
        assert os.path.exists(os.path.join(_artifact(uri), "openvino_model_int8.xml"))
    else:  # random tiny weights may not hold it: then it is refused by name, and no int8 IR ships
        assert "not offered" in openvino["fallback"]["int8"]
        assert not os.path.exists(os.path.join(_artifact(uri), "openvino_model_int8.xml"))
        with pytest.raises(ModelLoadError, match="int8"):
            mlflow.pyfunc.load_model(uri, model_config={"engine": "openvino", "precision": "int8"})


def test_bad_calibration_data_is_one_clear_error(tmp_path):
    from clip_pyfunc.registry.quantize import read_calibration_images

    with pytest.raises(ModelLoadError, match="does not exist"):
        read_calibration_images(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no image files"):
        read_calibration_images(str(tmp_path / "empty"))
    pd.DataFrame({"caption": ["a"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ModelLoadError, match="must hold the images"):
        read_calibration_images(str(tmp_path / "t.parquet"))
    pd.DataFrame({"content": [encode(photo(40, 30), "PNG")] * 3}).to_parquet(tmp_path / "ok.parquet")
    assert len(read_calibration_images(str(tmp_path / "ok.parquet"))) == 3
    # More than 300: spread evenly over all of them, so the last classes of a sorted folder count too.
    pd.DataFrame({"image_base64": [f"row{i}" for i in range(900)]}).to_parquet(tmp_path / "big.parquet")
    got = read_calibration_images(str(tmp_path / "big.parquet"))
    assert len(got) == 300 and got[0] == "row0" and got[-1] == "row897"


@pytest.mark.slow
@pytest.mark.env
def test_torch_free_image_model_predicts_in_env_built_from_model_alone(tmp_path, torch_free):
    from test_model_env import _predict_in_env_built_from_model_alone

    uri = torch_free["models"]["image"]["uri"]
    frame = pd.DataFrame({"input": [b64(encode(photo(640, 480, s), "JPEG")) for s in range(3)]})
    got = _predict_in_env_built_from_model_alone(uri, frame, tmp_path)
    np.testing.assert_allclose(got, mlflow.pyfunc.load_model(uri).predict(frame), atol=1e-6)


@pytest.mark.parametrize("tower", ["text", "image"])
def test_ir_holds_only_its_tower(registered, tower):
    """The IR is exported from the tower alone: its weights are the safetensors' bytes, not the full model's."""
    path = _artifact(registered["models"][tower]["uri"])
    ir, weights = os.path.getsize(os.path.join(path, "openvino_model.bin")), os.path.getsize(
        os.path.join(path, "model.safetensors"))
    # Unused constants (the other tower's scoring scalars, buffers) may be pruned: at most the same bytes.
    assert 0.8 * weights <= ir <= 1.02 * weights, (ir, weights)


def test_a_model_answering_on_openvino_imports_no_torch(registered):
    # Registered for both engines (torch weights too), loaded with engine "auto" (the tests' settings
    # log engine "torch"): OpenVINO fp32 outranks torch fp32 where it held the bar. Where its towers
    # run on OpenVINO, nothing imports torch. The CUDA check does not need it where no GPU driver's
    # device file exists (runtime.GPU_DEVICE_FILES; with one, torch is asked, as before).
    from clip_pyfunc.runtime import GPU_DEVICE_FILES

    code = (
        "import json, sys, mlflow\n"
        f"m = mlflow.pyfunc.load_model({registered['models']['image']['uri']!r}, \n"
        "                           model_config={'engine': 'auto', 'precision': 'fp32'})\n"
        "m.predict([sys.argv[1]])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'engine': m.unwrap_python_model().runtime.engine}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, b64(encode(photo(640, 480, 5), "JPEG"))], capture_output=True,
                         text=True, check=True, env=dict(os.environ))
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["engine"] == "openvino"
    assert got["torch"] is False or any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def test_openvino_pins_its_threads_only_where_they_take_every_cpu(registered):
    # OpenVINO pins a process's threads to the first cores of its affinity. Spark's workers run
    # one thread each: pinned, they all shared core 0 (docs/SPARK.md, issue 40).
    from clip_pyfunc.runtime import cpu_count
    from clip_pyfunc.runtime.engines.openvino_engine import compile_tower, cpu_pinning

    path = _artifact(registered["models"]["image"]["uri"])
    assert cpu_pinning(cpu_count()) and not cpu_pinning(cpu_count() - 1)
    assert compile_tower(path, "fp32", 1).get_property("ENABLE_CPU_PINNING") is (cpu_count() == 1)
