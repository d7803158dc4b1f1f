"""Preprocessing from the checkpoint's own configs, checked against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import crops_to_array, images_to_array, photo
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.stages.preprocess import (ImageSpec, TextSpec, pad_ids, read_image_spec, resize_and_crop,
                                           resize_and_crop_fast, tokenize)


def test_spec_comes_from_checkpoint(tiny_checkpoint):
    spec = read_image_spec(tiny_checkpoint)
    assert spec.shortest_edge == 32 and spec.crop_hw == (32, 32) and spec.resample == 3
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (225, 1000), (31, 29), (1, 1), (3000, 100), (50, 2000)])
def test_resize_and_crop_equals_full_resize_then_crop(size):
    spec = ImageSpec(shortest_edge=224, resize_hw=None, crop_hw=(224, 224), resample=3, rescale=1 / 255,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = photo(*size)
    w, h = size
    short, long = min(w, h), max(w, h)
    new = (224, int(224 * long / short)) if w <= h else (int(224 * long / short), 224)
    full = img.resize(new, 3)
    left, top = (new[0] - 224) // 2, (new[1] - 224) // 2
    want = np.asarray(full.crop((left, top, left + 224, top + 224))).astype(int)
    got = np.asarray(resize_and_crop(img, spec)).astype(int)
    elongated = max(new) > 8 * 224
    assert np.abs(got - want).max() <= (2 if elongated else 0)


def test_pixels_match_transformers_processor(tiny_checkpoint):
    from transformers import CLIPImageProcessorPil

    imgs = [photo(640, 480, 1), photo(90, 200, 2)]
    want = CLIPImageProcessorPil.from_pretrained(tiny_checkpoint)(imgs, return_tensors="np")["pixel_values"]
    got = images_to_array(imgs, read_image_spec(tiny_checkpoint))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


def test_every_byte_value_normalises_exactly_as_transformers(tiny_checkpoint):
    """Normalisation is a per-channel lookup table: all 256 levels of each channel must give
    the processor's own float32 values, bit for bit."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    spec = read_image_spec(tiny_checkpoint)
    h, w = spec.output_hw
    levels = np.arange(h * w * 3) % 256
    rng = np.random.default_rng(0)
    pixels = np.stack([rng.permutation(levels[: h * w]), levels[h * w: 2 * h * w], levels[: h * w][::-1]], axis=-1)
    img = Image.fromarray(pixels.reshape(h, w, 3).astype(np.uint8), "RGB")
    assert len(np.unique(np.asarray(img)[:, :, 1])) == min(256, h * w)
    want = CLIPImageProcessorPil.from_pretrained(tiny_checkpoint)([img], return_tensors="np")["pixel_values"]
    got = crops_to_array([img], spec)
    assert np.array_equal(got, want)


def test_fixed_size_processor_config(tmp_path):
    cfg = {"image_processor_type": "CLIPImageProcessor",
           "do_resize": True, "size": {"height": 40, "width": 50}, "do_center_crop": False,
           "image_mean": [0, 0, 0], "image_std": [1, 1, 1], "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    spec = read_image_spec(str(tmp_path))
    assert spec.output_hw == (40, 50)
    assert images_to_array([photo(300, 100)], spec).shape == (1, 3, 40, 50)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1632, 1224), (100, 80), (2000, 240)])
@pytest.mark.parametrize("resample", [3, 2])
def test_fast_resize_stays_within_a_level_of_pil(size, resample):
    # The fast path resamples arrays with torch's antialiased kernels: PIL's filters, its own rounding.
    spec = ImageSpec(shortest_edge=224, resize_hw=None, crop_hw=(224, 224), resample=resample, rescale=None,
                     mean=None, std=None)
    img = photo(*size, seed=size[0])
    want = np.asarray(resize_and_crop(img, spec)).astype(int)
    got = resize_and_crop_fast(np.asarray(img).copy(), spec, 3.0)
    assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1


def test_fast_resize_without_crop_and_other_filters():
    fixed = ImageSpec(shortest_edge=None, resize_hw=(40, 50), crop_hw=None, resample=3, rescale=None, mean=None,
                      std=None)
    img = photo(300, 100)
    assert np.abs(resize_and_crop_fast(np.asarray(img).copy(), fixed, 3.0).astype(int)
                  - np.asarray(resize_and_crop(img, fixed))).max() <= 1
    lanczos = ImageSpec(shortest_edge=32, resize_hw=None, crop_hw=(32, 32), resample=1, rescale=None, mean=None,
                        std=None)  # torch has no antialiased Lanczos: PIL's own path
    assert np.array_equal(resize_and_crop_fast(np.asarray(img).copy(), lanczos, 3.0),
                          np.asarray(resize_and_crop(img, lanczos)))


def test_unsupported_processor_step_is_named(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "do_pad": True, "size": {"shortest_edge": 8}}))
    with pytest.raises(ModelLoadError, match=r"asks for steps \['do_pad'\]; supported"):
        read_image_spec(str(tmp_path))


def test_unsupported_processor_class_is_named(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    with pytest.raises(ModelLoadError, match=r"image processor ViTImageProcessor is not supported; supported: .*Siglip"):
        read_image_spec(str(tmp_path))


def test_truncation_matches_tokenizer(reference):
    tok = reference["tokenizer"]
    texts = ["the cat " * 100, "short"]
    got = tokenize(tok, texts, TextSpec(max_length=77, pad_id=tok.pad_token_id, truncate=True))
    want = tok(texts, truncation=True, max_length=77)["input_ids"]
    assert got == want and len(got[0]) == 77


def test_pad_to_longest_in_batch_not_77():
    ids, mask = pad_ids([[1, 5, 2], [1, 2]], pad_id=2)
    assert ids.shape == (2, 3) and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
