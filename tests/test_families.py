"""Every family registers from a tiny checkpoint and matches its own full model through the registry.

The reference is transformers itself: the family's full model class (`get_text_features` /
`get_image_features`, `.pooler_output`) on inputs made by the family's own tokenizer and image
processor (PIL backend), with the text rules its reference pipeline uses.
"""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import family_checkpoints
from conftest import b64, encode, photo
from clip_pyfunc.runtime import features
from clip_pyfunc.stages.decode import ImageLimits, open_image
from clip_pyfunc.errors import ModelLoadError

FAMILIES = sorted(family_checkpoints.BUILDERS)  # the checkpoints and registered_families fixtures: conftest
TEXTS = ["a photo of a cat", "A PHOTO of a DOG, running!", "", "ünïcödé ✓ 一张猫的照片", "the cat is on the mat " * 40]
IMAGES = [encode(photo(80, 60, 1), "PNG"), encode(photo(45, 90, 2), "JPEG", quality=90),
          encode(photo(300, 200, 3).convert("L"), "PNG"), encode(photo(33, 33, 4), "WEBP")]


def _reference(path: str):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path, backend="pil"))


# The reference pipelines' text rules, written out here rather than read from what we store:
# SigLIP-style towers pool the last position and are fed max_length=64 (the zero-shot pipeline's
# own special case); SigLIP 2's reference lowercases, which its Gemma tokenizer does not do.
PAD_TO_64 = {"siglip", "siglip2_fixres", "siglip2"}
LOWERCASE = {"siglip2_fixres"}


def reference_text(path: str, name: str, texts: list[str], pad_to_64: bool | None = None) -> np.ndarray:
    """The family's own text vectors: its tokenizer with its reference padding, L2-normalised."""
    model, tok, _ = _reference(path)
    if name in LOWERCASE:
        texts = [t.lower() for t in texts]
    pad_to_64 = name in PAD_TO_64 if pad_to_64 is None else pad_to_64
    limit = min(tok.model_max_length, model.config.text_config.max_position_embeddings)
    padding = {"padding": "max_length", "max_length": 64} if pad_to_64 else {"padding": True, "max_length": limit}
    batch = tok(texts, truncation=True, return_tensors="pt", **padding)
    kwargs = {"input_ids": batch["input_ids"]}
    if "attention_mask" in tok.model_input_names:
        kwargs["attention_mask"] = batch["attention_mask"]
    with torch.no_grad():
        f = features(model.get_text_features(**kwargs))
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def reference_image(path: str, images: list[bytes]) -> np.ndarray:
    """The family's own image vectors: its PIL image processor on the decoded images, L2-normalised."""
    model, _, processor = _reference(path)
    pil = [open_image(data, ImageLimits(max_bytes=10**8, max_pixels=10**8)) for data in images]
    with torch.no_grad():
        f = features(model.get_image_features(**dict(processor(images=pil, return_tensors="pt"))))
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def _info(registered_families, name, tower="text") -> dict:
    root = mlflow.artifacts.download_artifacts(registered_families[name]["models"][tower]["uri"])
    found = [os.path.join(d, "clip_pyfunc.json") for d, _, fs in os.walk(root) if "clip_pyfunc.json" in fs]
    return json.load(open(found[0]))


@pytest.mark.parametrize("name", FAMILIES)
def test_text_parity_through_registry(registered_families, checkpoints, name):
    model = mlflow.pyfunc.load_model(registered_families[name]["models"]["text"]["uri"])
    got = model.predict(TEXTS)
    want = reference_text(checkpoints[name], name, TEXTS)
    assert np.abs(want[0] - want[3]).max() > 1e-3  # the tower does see its input
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    # Short rows alone (no long row to widen the batch): padding rules show here.
    short = model.predict(TEXTS[:2])
    assert np.abs(short - reference_text(checkpoints[name], name, TEXTS[:2])).max() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_image_parity_through_registry(registered_families, checkpoints, name):
    uri = registered_families[name]["models"]["image"]["uri"]
    model = mlflow.pyfunc.load_model(uri, model_config={"fast_decode": False})
    got = model.predict([b64(x) for x in IMAGES])
    want = reference_image(checkpoints[name], IMAGES)
    assert np.abs(want[0] - want[1]).max() > 1e-3  # the tower does see its input
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_fast_image_path_stays_close_to_the_family_processor(registered_families, checkpoints, name):
    photos = [encode(photo(640, 480, 5), "JPEG", quality=92), encode(photo(1600, 1200, 6), "JPEG", quality=90),
              encode(photo(900, 700, 7), "PNG")]
    model = mlflow.pyfunc.load_model(registered_families[name]["models"]["image"]["uri"])  # fast_decode on
    got = model.predict([b64(x) for x in photos])
    want = reference_image(checkpoints[name], photos)
    assert (got * want).sum(axis=1).min() >= 0.999


@pytest.mark.parametrize("name", ["siglip", "siglip2_fixres", "siglip2"])
def test_siglip_text_is_padded_to_max_length_without_mask(registered_families, checkpoints, name):
    info = _info(registered_families, name)
    assert info["pad_to"] == 64 and info["attention_mask"] is False
    got = mlflow.pyfunc.load_model(registered_families[name]["models"]["text"]["uri"]).predict(TEXTS[:2])
    # Padding to the longest row (right for CLIP) gives other vectors here: the rule is load-bearing.
    longest = reference_text(checkpoints[name], name, TEXTS[:2], pad_to_64=False)
    assert np.abs(got - longest).max() > 1e-3


def test_siglip2_fixed_resolution_text_is_lowercased(registered_families):
    assert _info(registered_families, "siglip2_fixres")["lowercase"] is True
    assert _info(registered_families, "siglip")["lowercase"] is False  # SigLIP 1's tokenizer lowercases itself
    model = mlflow.pyfunc.load_model(registered_families["siglip2_fixres"]["models"]["text"]["uri"])
    v = model.predict(["A Red Circle", "a red circle"])
    np.testing.assert_array_equal(v[0], v[1])


def test_bigg_style_checkpoint_takes_the_full_model_shapes(registered_families, checkpoints):
    from transformers import CLIPModel, CLIPTextModelWithProjection

    full = CLIPModel.from_pretrained(checkpoints["clip_bigg"])
    assert full.text_projection.out_features == 24 and full.config.text_config.projection_dim == 512
    assert registered_families["clip_bigg"]["embedding_dim"] == 24
    with pytest.raises(Exception, match="ignore_mismatched_sizes"):  # the tower class alone cannot load it
        CLIPTextModelWithProjection.from_pretrained(checkpoints["clip_bigg"])


@pytest.mark.parametrize("name", FAMILIES)
def test_artifacts_hold_only_their_tower(registered_families, name):
    from safetensors import safe_open

    scalars = {"logit_scale", "logit_bias", "temperature"}
    for tower, own, other in (("text", ("text_",), ("vision_", "visual_")), ("image", ("vision_", "visual_"), ("text_",))):
        root = mlflow.artifacts.download_artifacts(registered_families[name]["models"][tower]["uri"])
        files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors")]
        with safe_open(files[0], "pt") as f:
            keys = list(f.keys())
        assert any(k.startswith(own) for k in keys)
        assert all(k.startswith(own) or k in scalars for k in keys), [k for k in keys if not k.startswith(own)][:3]
        assert not any(k.startswith(other) for k in keys)


@pytest.mark.parametrize("name,scoring,bias", [("clip_bigg", "softmax", 0.0), ("siglip", "sigmoid", -10.0),
                                               ("align", "softmax", 0.0), ("siglip2", "sigmoid", -10.0)])
def test_scoring_constants_in_tags_metadata_and_summary(registered_families, checkpoints, name, scoring, bias):
    from transformers import AutoModel

    summary = registered_families[name]
    full = AutoModel.from_pretrained(checkpoints[name])
    scale = 1.0 / float(full.temperature) if name == "align" else float(full.logit_scale.exp())
    assert summary["scoring"]["function"] == scoring
    assert summary["scoring"]["scale"] == pytest.approx(scale, rel=1e-6)
    assert summary["scoring"]["bias"] == pytest.approx(bias)
    for tower in ("text", "image"):
        mv = MlflowClient().get_model_version_by_alias(summary["models"][tower]["name"], "champion")
        assert mv.tags["scoring"] == scoring and float(mv.tags["score_scale"]) == pytest.approx(scale, rel=1e-6)
        assert mv.tags["family"] == summary["family"] and float(mv.tags["score_bias"]) == pytest.approx(bias)
        meta = mlflow.models.get_model_info(summary["models"][tower]["uri"]).metadata
        assert meta["scoring"] == scoring and meta["family"] == summary["family"]


def test_every_request_shape_and_bad_rows_for_another_family(registered_families):
    from mlflow.exceptions import MlflowException

    text = mlflow.pyfunc.load_model(registered_families["siglip"]["models"]["text"]["uri"])
    image = mlflow.pyfunc.load_model(registered_families["siglip2"]["models"]["image"]["uri"])
    np.testing.assert_array_equal(text.predict(["a cat"]), text.predict(pd.DataFrame({"input": ["a cat"]})))
    good = b64(IMAGES[0])
    np.testing.assert_array_equal(image.predict(pd.Series([good])), image.predict(pd.DataFrame({"x": [good]})))
    with pytest.raises(MlflowException, match=r"row 1: .*not an image"):
        image.predict([good, b64(b"not an image at all")])
    with pytest.raises(MlflowException, match="row 0: .*null"):
        text.predict([None])


def test_unknown_model_type_lists_the_families(tmp_path):
    from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint

    for model_type, extra in (("bert", ""), ("blip-2", "BLIP-2 is out of scope")):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ModelLoadError) as e:
            resolve_checkpoint(str(tmp_path / model_type))
        assert f"model_type {model_type!r}" in str(e.value) and extra in str(e.value)
        for family in ("align", "altclip", "chinese_clip", "clip", "metaclip_2", "siglip", "siglip2"):
            assert repr(family) in str(e.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_served_equals_local(registered_families, name, monkeypatch):
    """MLflow's own scoring app (what `mlflow models serve` runs; mlflow.pyfunc.scoring_server.init) on each
    family's towers, loaded by alias and driven in process over HTTP semantics: served == local. The real
    server process is tests/test_serving.py's (test_plain_mlflow_models_serve_text and the rest)."""
    import asyncio

    import httpx
    from mlflow.pyfunc import scoring_server

    async def served(app, rows):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            return await client.post("/invocations", json={"inputs": rows}, timeout=60)

    # init marks this process as serving (_MLFLOW_IS_IN_SERVING_ENVIRONMENT, which turns on max_rows):
    # monkeypatch puts it back for the rest of the session
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")
    for tower, rows in (("text", TEXTS), ("image", [b64(x) for x in IMAGES])):
        model = mlflow.pyfunc.load_model(registered_families[name]["models"][tower]["uri"])
        r = asyncio.run(served(scoring_server.init(model), rows))
        assert r.status_code == 200, r.text[:500]
        local = mlflow.pyfunc.load_model(registered_families[name]["models"][tower]["uri"]).predict(rows)
        assert np.abs(np.asarray(r.json()["predictions"], dtype=np.float32) - local).max() <= 1e-6
