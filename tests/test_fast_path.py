"""The fast path stays close to the reference: draft JPEG decode, precisions, no padding to 77."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import b64, encode, photo
from clip_pyfunc.settings import RuntimeConfig
from clip_pyfunc.runtime import pick_runtime

PRECISION_COSINE = {"bf16": 0.999, "int8": 0.99}
# The precision rules hold per CPU: each test of one sets the CPU it assumes (conftest's `cpu`), both kinds
# CI runs on, rather than reading the machine it runs on.
CPUS = pytest.mark.parametrize("native_bf16", [False, True], ids=["avx2-cpu", "native-bf16-cpu"])


@pytest.fixture(scope="module")
def photos():
    jpegs = [b64(encode(photo(w, h, s), "JPEG", quality=90))
             for s, (w, h) in enumerate([(640, 480), (1632, 1224), (480, 640), (2000, 1500)])]
    pngs = [b64(encode(photo(1440, 900, 7), "PNG")), b64(encode(photo(700, 1200, 8), "WEBP", lossless=True))]
    return pd.DataFrame({"input": jpegs + pngs})


def test_fast_decode_stays_within_cosine_of_reference(registered, image_model, photos):
    """JPEG draft decode and the reducing resize of big PNG/WebP vs the exact reference path."""
    exact = mlflow.pyfunc.load_model(registered["models"]["image"]["uri"], model_config={"fast_decode": False})
    fast, ref = image_model.predict(photos), exact.predict(photos)
    cos = np.sum(fast * ref, axis=1)
    assert cos.min() >= 0.999, cos
    assert not np.allclose(fast[:4], ref[:4], atol=1e-6)  # the draft path really ran
    assert not np.allclose(fast[4:], ref[4:], atol=1e-6)  # and the reducing resize


def test_fast_decode_on_camera_like_jpegs(registered, image_model):
    """Fine texture and sensor grain (samples.camera_jpeg) at 640x480, 2 MP and 12 MP: the reduced-scale
    decode keeps 2x the target, so the exact antialiased resize still removes what would alias."""
    from clip_pyfunc.dev.samples import camera_jpeg

    exact = mlflow.pyfunc.load_model(registered["models"]["image"]["uri"], model_config={"fast_decode": False})
    frame = pd.DataFrame({"input": [b64(camera_jpeg(w, h, seed=i)) for i, (w, h) in
                                    enumerate([(640, 480), (1632, 1224), (4000, 3000)])]})
    cos = np.sum(image_model.predict(frame) * exact.predict(frame), axis=1)
    assert cos.min() >= 0.999, cos


@pytest.fixture(scope="module")
def reference_processors():
    from clip_pyfunc.benchmarks.fast_path import reference_processors

    return reference_processors()


@pytest.mark.parametrize("resize", ["torch", "pil"])
@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4"])
@pytest.mark.parametrize("size", [(300, 225), (1224, 1632), (2400, 1800), (4000, 3000)])
def test_fast_path_pixels_stay_within_3_levels_of_the_reference_processor(reference_processors, size, subsampling,
                                                                          resize):
    """Judged by pixels, not one model's cosine: grainy camera-like JPEGs from 300 px to 12 MP, through
    every resize kind (shortest edge + crop, squash, NaFlex, ALIGN's resize + crop), at real shapes.
    Both resamplers of the reduced-scale decode: torch's (torch engine) and PIL's (OpenVINO engine,
    which a torch-free model serves with)."""
    from clip_pyfunc.benchmarks.fast_path import fast_pixels, level_error, reference_pixels
    from clip_pyfunc.dev.samples import camera_jpeg

    data = camera_jpeg(*size, seed=sum(size), quality=92, subsampling=subsampling)
    for kind, (processor, spec) in reference_processors.items():
        fast = fast_pixels(data, spec, torch_resize=resize == "torch")
        reference = reference_pixels(data, processor)
        assert fast.shape[1:] == reference.shape[1:], kind
        worst, mean = level_error(fast, reference, spec)
        assert worst <= 3 and mean <= 0.25, (kind, worst, mean)


@pytest.mark.parametrize("precision", sorted(PRECISION_COSINE))
def test_precision_within_its_cosine_of_fp32(registered, image_model, text_model, photos, precision):
    texts = pd.DataFrame({"input": ["a photo of a cat", "a red bicycle on a bridge", ""]})
    for uri, frame, ref_model in ((registered["models"]["image"]["uri"], photos, image_model),
                                  (registered["models"]["text"]["uri"], texts, text_model)):
        model = mlflow.pyfunc.load_model(uri, model_config={"precision": precision})
        assert model.unwrap_python_model().runtime.precision == precision
        cos = np.sum(model.predict(frame) * ref_model.predict(frame), axis=1)
        assert cos.min() >= PRECISION_COSINE[precision], (precision, cos)


@CPUS
def test_auto_precision_follows_the_hardware(cpu, native_bf16):
    """"auto" is the fastest precision the CPU runs natively, unmeasured: bf16 with AVX512_BF16/AMX, else fp32."""
    cpu(native_bf16=native_bf16)
    expected = "bf16" if native_bf16 else "fp32"
    assert pick_runtime(RuntimeConfig(device="cpu", precision="auto")).precision == expected
    assert pick_runtime(RuntimeConfig(device="cpu")).precision == "fp32"  # nothing measured: the reference


@CPUS
def test_default_precision_is_the_fastest_that_held_its_cosine(cpu, native_bf16):
    """On a torch-only CPU model, "default" is bf16 where the CPU has native bf16 and torch bf16 held
    DEFAULT_PRECISION_COSINE (0.9999) to fp32 at registration, else fp32 (torch int8 is never the default)."""
    cpu(native_bf16=native_bf16)
    native = "bf16" if native_bf16 else "fp32"
    # As registration records them: per engine, per precision (torch fp32, the reference, is never listed).
    held, missed = {"torch": {"bf16": 0.99995, "int8": 0.998}}, {"torch": {"bf16": 0.9995, "int8": 0.998}}
    assert pick_runtime(RuntimeConfig(device="cpu"), held).precision == native
    assert pick_runtime(RuntimeConfig(device="cpu"), missed).precision == "fp32"
    assert pick_runtime(RuntimeConfig(device="cpu", precision="fp32"), held).precision == "fp32"  # one setting away


@CPUS
def test_registration_measures_precisions_and_default_uses_them(registered, cpu, native_bf16):
    """Registration records each precision's lowest cosine to fp32 (tags, summary, artifact); a model
    loaded with precision "default" runs the fastest one that held 0.9999 on the CPU it loads on."""
    from clip_pyfunc.runtime import DEFAULT_PRECISION_COSINE

    measured = registered["precision_cosine_to_fp32"]
    assert set(measured) == ({"fp16", "bf16"} if torch.cuda.is_available() else {"bf16", "int8"})  # tiny CLIP runs all
    assert all(0.9 < c <= 1.0 + 1e-6 for c in measured.values()), measured
    uri = registered["models"]["image"]["uri"]
    name, alias = uri[len("models:/"):].split("@")
    tags = mlflow.MlflowClient().get_model_version_by_alias(name, alias).tags
    assert {k: float(v) for k, v in tags.items() if k.startswith("cosine_to_fp32_") and "openvino" not in k} == {
        f"cosine_to_fp32_{p}": c for p, c in measured.items()}
    cpu(native_bf16=native_bf16)  # set for the load only: registration measured on this machine's CPU
    model = mlflow.pyfunc.load_model(uri, model_config={"precision": "default"}).unwrap_python_model()
    fastest = "bf16" if native_bf16 and measured["bf16"] >= DEFAULT_PRECISION_COSINE else "fp32"
    assert model.runtime.precision == fastest


def test_int8_on_cuda_and_cuda_without_gpu_are_errors():
    from clip_pyfunc.errors import ModelLoadError

    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="torch sees no CUDA device"):
            pick_runtime(RuntimeConfig(device="cuda"))
    else:
        with pytest.raises(ModelLoadError, match="runs on CPU only"):
            pick_runtime(RuntimeConfig(device="cuda", precision="int8"))


def test_text_is_padded_to_the_batch_longest_not_77(registered):
    model = mlflow.pyfunc.load_model(registered["models"]["text"]["uri"], model_config={"batch_size": 4})
    tower = model.unwrap_python_model().engine.engine.module.text_model  # SharedForwards -> TorchEngine -> the encoder
    widths = []
    hook = tower.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        mixed = ["a cat"] * 4 + ["a long caption about a busy market street"] * 4  # ~45 tiny-BPE tokens
        grouped = model.predict(pd.DataFrame({"input": mixed}))
    finally:
        hook.remove()
    # short queries grouped together, padded short: to the next multiple of 8 (TextSpec.length_step), not 77
    assert max(widths) < 77 and min(widths) == 8 and all(w % 8 == 0 for w in widths), widths
    one_by_one = np.concatenate([model.predict(pd.DataFrame({"input": [t]})) for t in mixed])
    assert np.abs(grouped - one_by_one).max() <= 1e-5  # grouping changes nothing in the vectors


@pytest.mark.slow
def test_bench_cli_on_tiny_random_model(tmp_path):
    import json
    import subprocess

    # One round and the reference's own engine row: what is checked here is the command and its report;
    # every engine and precision is timed by the benchmark itself (docs/BENCHMARKS.md).
    out = subprocess.run(["clip-pyfunc", "bench", "--random-init", "tiny", "--out", str(tmp_path),
                          "--batch-sizes", "1", "4", "--workloads", "jpeg_640x480", "camera_2mp", "png_screenshot",
                          "--engines", "torch", "--precisions", "fp32", "--rounds", "1"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["random_weights"] and "meaningless" in result["note"]
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert set(result["images"]) == {"jpeg_640x480", "camera_2mp", "png_screenshot"}
    assert result["images"]["camera_2mp"]["min_cosine_to_reference"] >= 0.999
    assert result["default_precision"]["resolves_to"] in ("fp32", "bf16")
    for group in ("images", "texts"):
        for data in result[group].values():
            assert set(data["by_batch"]) == {"1", "4"}
            assert all(r["e2e_over_raw"] > 0 for r in data["by_batch"].values())
    assert result["texts"]["short_queries"]["by_batch"]["4"]["tokens_padded_to"] < 77
    assert {"image_model", "text_model", "full_model"} <= set(result["rss_mib"])
    assert result["rss_mib"]["image_model"]["model"] > 0
    assert "e2e/raw" in out.stderr
