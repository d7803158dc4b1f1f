"""The int8 gate (issue 35, item 8): int8 is judged on held-out calibration images and on a shipped
varied set, a calibration set too uniform to judge is named, and a pair whose measurement raised is
named with its reason instead of dropped.

The rules are tested through their functions with given cosines and real generated images: the tiny
random checkpoint may hold a high int8 cosine on anything, so it cannot show the gate refusing.
"""

from __future__ import annotations

import json
import os

import io

import numpy as np
import pytest
from PIL import Image

from clip_pyfunc.registry.quantize import (CALIBRATION_DIVERSITY_MIN, MIN_HELD_OUT, Int8Measure,
                                           calibration_diversity, int8_verdict, split_held_out)
from clip_pyfunc.runtime import INT8_OFFER_COSINE


def noised_copies(n: int, sigma: float = 6.0) -> list[bytes]:
    """n lightly noised JPEG copies of one photo-like picture: the calibration set of the issue."""
    from clip_pyfunc.dev.samples import photo_jpeg

    base = np.asarray(Image.open(io.BytesIO(photo_jpeg(320, 240, seed=3))), dtype=np.float32)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decoded(cells) -> list:
    import base64

    return [Image.open(io.BytesIO(base64.b64decode(c) if isinstance(c, str) else c)).convert("RGB") for c in cells]


def test_noised_copies_of_one_picture_are_too_uniform_and_the_varied_sets_are_not():
    from clip_pyfunc.dev.samples import varied_images
    from clip_pyfunc.registry.quantize import read_calibration_images

    assert calibration_diversity(decoded(noised_copies(30))) < CALIBRATION_DIVERSITY_MIN
    grainy = noised_copies(30, sigma=32)
    assert calibration_diversity(decoded(grainy)) < CALIBRATION_DIVERSITY_MIN  # grain is not variety
    varied = varied_images()
    assert calibration_diversity(decoded(varied)) >= 0.9
    builtin = read_calibration_images(None)  # the default calibration set
    assert calibration_diversity(decoded(builtin)) >= CALIBRATION_DIVERSITY_MIN


def test_the_shipped_varied_set_is_deterministic_and_varied():
    from clip_pyfunc.dev.samples import varied_image, varied_images

    images = varied_images()
    assert len(images) >= 36 and images[5] == varied_image(5)  # the same bytes on every call
    opened = [Image.open(io.BytesIO(b)) for b in images]
    assert {im.format for im in opened} == {"JPEG", "PNG"}
    assert len({round(im.width / im.height, 2) for im in opened}) >= 5  # portrait, square, landscape, panoramas
    assert len({max(im.size) for im in opened}) >= 4
    pixels = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in opened]
    means = np.array([p.mean() for p in pixels])
    assert means.min() < 60 and means.max() > 190  # dark and bright pictures
    grey = sum(bool(np.abs(p[..., 0] - p[..., 1]).max() < 8 and np.abs(p[..., 1] - p[..., 2]).max() < 8)
               for p in pixels)
    assert 0 < grey < len(pixels) // 2


def test_int8_is_offered_only_where_both_the_hold_out_and_the_varied_set_held():
    bar = INT8_OFFER_COSINE
    sizes = {"held_out_images": 8, "varied_images": 48, "calibration_images": 30}
    # The case: near-copies of one picture held on their own hold-out, varied pictures did not.
    uniform = Int8Measure(held_out=0.99983, varied=0.868, diversity=0.0001, **sizes)
    offered, note = int8_verdict(uniform)
    assert not offered and uniform.cosine == 0.868
    assert note.startswith("not offered") and "too uniform to judge" in note and "0.868" in note and "0.99983" in note
    # Too uniform, yet the varied set held too: offered, and the note says what it rests on.
    offered, note = int8_verdict(Int8Measure(held_out=0.9999, varied=bar + 0.0005, diversity=0.0001, **sizes))
    assert offered and "too uniform to judge" in note and "rests on the varied set" in note
    # A varied calibration set: both must hold, each alone is not enough.
    for held_out, varied, want in ((0.9999, 0.9995, True), (0.9985, 0.9999, False), (0.9999, 0.9985, False)):
        offered, note = int8_verdict(Int8Measure(held_out=held_out, varied=varied, diversity=0.8, **sizes))
        assert offered is want and "too uniform" not in note, note
        assert f"{held_out} on 8 held-out calibration images" in note and f"{varied} on 48 shipped varied" in note


def test_the_hold_out_is_at_least_min_held_out_where_the_set_allows():
    for n, want in ((8, 2), (12, 4), (16, MIN_HELD_OUT), (30, MIN_HELD_OUT), (44, 9), (300, 60)):
        calibrate, held_out = split_held_out(list(range(n)))
        assert len(held_out) == want and sorted(calibrate + held_out) == list(range(n)), n
    assert split_held_out(list(range(30)))[1] == [1, 5, 9, 13, 16, 20, 24, 28]  # spread over the set


@pytest.fixture(scope="module")
def tiny_towers(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported to tower artifacts with OpenVINO IR, as registration does."""
    from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint
    from clip_pyfunc.artifacts.towers import export_engine_files, export_towers
    from clip_pyfunc.registry.precision import reference_models

    checkpoint = resolve_checkpoint(tiny_checkpoint)
    info, towers = export_towers(checkpoint, str(tmp_path_factory.mktemp("towers")))
    references = {tower: model.engine.engine for tower, model in reference_models(towers, "cpu").items()}
    return checkpoint, export_engine_files(info, towers, references), towers


def test_a_uniform_calibration_set_is_named_at_registration(tiny_towers, tmp_path):
    from clip_pyfunc.artifacts.towers import INFO_FILE, CheckpointInfo
    from clip_pyfunc.registry.quantize import quantize_image_tower

    _, info, towers = tiny_towers
    for i, data in enumerate(noised_copies(20)):
        (tmp_path / f"{i:02d}.jpg").write_bytes(data)
    got = quantize_image_tower(info, towers, str(tmp_path))
    note = got.measurement_notes["openvino int8"]
    assert "too uniform to judge" in note and "on 8 held-out calibration images" in note, note
    assert "48 shipped varied images" in note
    offered = note.startswith("offered")  # however the tiny random model fares, the three agree
    assert offered == ("int8" not in got.unavailable["openvino"]) == (
        got.fidelity["openvino"]["int8"] >= INT8_OFFER_COSINE)
    # Registration's to report (summary, tags); not in the artifact, whose previous reader fails on a new field.
    assert CheckpointInfo.read(towers["image"]).measurement_notes == {}
    assert "measurement_notes" not in json.loads(open(os.path.join(towers["image"], INFO_FILE)).read())


def test_a_pair_whose_measurement_raised_is_named_and_never_the_default(tiny_towers, monkeypatch):
    from clip_pyfunc.artifacts.towers import CheckpointInfo
    from clip_pyfunc.registry import precision
    from clip_pyfunc.registry.build import describe_engines
    from clip_pyfunc.registry.publish import model_metadata
    from clip_pyfunc.runtime import pick_runtime
    from clip_pyfunc.runtime.engines.torch_engine import TorchEngine
    from clip_pyfunc.settings import RuntimeConfig

    checkpoint, info, towers = tiny_towers
    load = TorchEngine.load.__func__

    def load_without_bf16(cls, artifact_dir, tower, runtime, loaded=None):
        if runtime.precision == "bf16":
            raise RuntimeError("no bf16 kernel for this layer")
        return load(cls, artifact_dir, tower, runtime, loaded)

    monkeypatch.setattr(TorchEngine, "load", classmethod(load_without_bf16))
    got = precision.measure_fidelity(info, towers, precision.reference_models(towers, "cpu"))
    assert "bf16" not in got.fidelity["torch"] and "int8" in got.fidelity["torch"]  # the others still measured
    assert "fp32" in got.fidelity["openvino"]
    note = got.measurement_notes["torch bf16"]
    assert "never the default" in note and "RuntimeError: no bf16 kernel for this layer" in note
    assert model_metadata(checkpoint, got, "sha256:test/8")["measurement_note_torch_bf16"] == note  # version tags
    assert describe_engines(got)["notes"] == {"torch bf16": note}  # the registration summary
    assert CheckpointInfo.read(towers["text"]).measurement_notes == {}  # not in the artifact (see above)
    # What the runtime then picks is never the pair that raised; the note above is why it moved.
    runtime = pick_runtime(RuntimeConfig(device="cpu"), got.fidelity, frozenset({"torch", "openvino"}))
    assert (runtime.engine, runtime.precision) != ("torch", "bf16")
