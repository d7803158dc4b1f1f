"""Shared fixtures: a tiny random CLIP saved in HF format and a registry holding its two models.

Nothing here touches the network: the checkpoint is built locally in seconds.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clip_pyfunc.benchmarks.common import b64, free_port  # noqa: F401 - the tests import them from here
from clip_pyfunc.settings import CONF_ENV, load_settings

# Every settings read in the tests (and in the CLI subprocesses they start) pins fp32; see the file.
os.environ[CONF_ENV] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_pyfunc.yaml")


# The inner loop is `python -m pytest -m "not slow"` (at most 3 minutes); CI runs everything. Besides the
# tests marked slow by hand (whole jobs, killed processes, real servers), these count as slow: the real-part
# markers (a server process, Spark, a built environment), and the fixtures that take a minute or more.
_SLOW_MARKERS = ("serving", "spark", "env")
_SLOW_FIXTURES = {"toy_checkpoint", "registered_families"}  # trains the toy; registers every family


def pytest_collection_modifyitems(config, items):
    """Mark as slow every test that needs a real part or a slow fixture (see above)."""
    for item in items:
        if any(item.get_closest_marker(m) for m in _SLOW_MARKERS) or _SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint

    return save_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-clip"), "tiny", seed=0)


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> str:
    """The trained toy CLIP (coloured shapes), for tests that check meaning (about a minute)."""
    from clip_pyfunc.dev.toy_checkpoint import train_toy_checkpoint

    path = str(tmp_path_factory.mktemp("toy") / "clip-toy")
    train_toy_checkpoint(path, log=lambda line: None)
    return path


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A sqlite registry in a temp dir, set for the whole session (artifacts beside it)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    # Create the experiment up front so its artifacts land in the temp dir, not the checkout.
    mlflow.create_experiment(load_settings().registry.experiment, artifact_location=str(root / "artifacts"))
    return uri


@pytest.fixture(scope="session")
def registered(tiny_checkpoint, tracking_uri) -> dict:
    from clip_pyfunc.registry import register_models

    return register_models(load_settings(None, {"model": {"source": tiny_checkpoint}, "registry": {"engines": True}}))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """One tiny random checkpoint per family (tests/family_checkpoints.py), by name."""
    import family_checkpoints

    root = tmp_path_factory.mktemp("families")
    return {name: family_checkpoints.build(name, str(root / name)) for name in sorted(family_checkpoints.BUILDERS)}


@pytest.fixture(scope="session")
def registered_families(checkpoints, tracking_uri) -> dict[str, dict]:
    """Each family's text and image models registered as `<name>_text` / `<name>_image` @champion."""
    from clip_pyfunc.registry import register_models

    out = {}
    for name, path in checkpoints.items():
        settings = load_settings(None, {"model": {"source": path}, "registry": {
            "text_name": f"{name}_text", "image_name": f"{name}_image", "engines": True}})
        out[name] = register_models(settings)
    return out


@pytest.fixture(scope="session")
def text_model(registered):
    import mlflow

    return mlflow.pyfunc.load_model(registered["models"]["text"]["uri"])


@pytest.fixture(scope="session")
def image_model(registered):
    import mlflow

    return mlflow.pyfunc.load_model(registered["models"]["image"]["uri"])


@pytest.fixture
def cpu(monkeypatch):
    """Sets the CPU the runtime sees, for tests of hardware-dependent rules: `cpu(native_bf16=True)`.

    Such a test states the hardware it assumes instead of reading the machine it runs on (CI runs on
    AVX2-only CPUs and on AVX512_BF16 ones). It replaces runtime.cpu_capabilities, the one place the
    package reads the CPU's instruction sets, for this test only; what was registered before (the
    session fixtures) was measured on the real CPU.
    """
    from clip_pyfunc import runtime

    def pin(*, native_bf16: bool, int8_dot: bool = False):
        capabilities = runtime.CpuCapabilities(native_bf16=native_bf16, int8_dot=int8_dot)
        monkeypatch.setattr(runtime, "cpu_capabilities", lambda: capabilities)
        return capabilities

    return pin


ENGINES = ("torch", "openvino")


def load_on_engine(uri: str, engine: str, **config):
    """A registered model loaded on one engine (fp32, per tests/clip_pyfunc.yaml), checked to run there."""
    import mlflow

    model = mlflow.pyfunc.load_model(uri, model_config={"engine": engine, **config})
    runtime = model.unwrap_python_model().runtime
    assert runtime.engine == engine, (engine, model.unwrap_python_model().engine_note)
    return model


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """transformers' own full CLIPModel, tokenizer and PIL image processor on the same weights."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    return {
        "model": CLIPModel.from_pretrained(tiny_checkpoint).eval(),
        "tokenizer": AutoTokenizer.from_pretrained(tiny_checkpoint),
        "processor": CLIPImageProcessorPil.from_pretrained(tiny_checkpoint),
    }


def photo(width: int, height: int, seed: int = 0):
    """A smooth, photo-like RGB image (gradients, shapes, mild noise): JPEG-friendly content."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([
        127 + 100 * np.sin(x / max(width, 1) * 6 + seed),
        127 + 100 * np.cos(y / max(height, 1) * 5),
        127 + 80 * np.sin((x + y) / max(width + height, 1) * 9),
    ], axis=-1)
    base += rng.normal(0, 6, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, max(width - 1, 1)), rng.integers(0, max(height - 1, 1))
        r = int(rng.integers(1, max(2, min(width, height) // 4)))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img.filter(ImageFilter.GaussianBlur(1))


def encode(img, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def start_server(cmd, log_path):
    """Start a server subprocess in its own process group, stderr to `log_path`."""
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"),
                            env=dict(os.environ), start_new_session=True)


def wait_ready(url, proc, log_path, seconds=180, path="/ping"):
    """Wait until `url + path` answers 200; fail with the server's log if it exits or never does."""
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + open(log_path).read()[-3000:])
        try:
            if requests.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready: " + open(log_path).read()[-3000:])


def stop_server(proc):
    """Stop a server started by start_server, and everything it started."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def model_server(model_uri: str, log_path):
    """A real `mlflow models serve` of `model_uri` on a free loopback port: yields (url, proc)."""
    port = free_port()
    proc = start_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                         "-p", str(port)], log_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log_path)
        yield url, proc
    finally:
        stop_server(proc)


# Batch forms of the per-row stages, for tests that check many rows at once (the package runs rows
# through decode_image and preprocess_image one at a time).
def decode_images(values, limits, draft_edge=None):
    """decode_image per row, errors carrying their row."""
    from clip_pyfunc.errors import InvalidInput
    from clip_pyfunc.stages.decode import decode_image

    out = []
    for row, value in enumerate(values):
        item = decode_image(value, limits, draft_edge)
        out.append(InvalidInput(item.reason, row) if isinstance(item, InvalidInput) else item)
    return out


def crops_to_array(crops, spec):
    """Rescale and normalise resized and cropped RGB images into (n, 3, H, W) float32."""
    from clip_pyfunc.stages.preprocess import crop_to_array

    return np.stack([crop_to_array(crop, spec) for crop in crops]).astype(np.float32)


def images_to_array(images, spec):
    """The reference path's pixels of RGB images, (n, 3, H, W) float32."""
    from clip_pyfunc.stages.preprocess import resize_and_crop

    return crops_to_array([resize_and_crop(img, spec) for img in images], spec)


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """A local Spark session for one test module (local[2], small batches), stopped after it."""
    from clip_pyfunc.batch.spark import spark_session, stop_session

    session = spark_session("local[2]", batch_rows=8,
                            conf={"spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse")),
                                  "spark.sql.shuffle.partitions": "4"})
    session.sparkContext.setLogLevel("ERROR")
    yield session
    stop_session(session)
