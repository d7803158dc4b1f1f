"""int8 at registration: NNCF's static post-training quantization of the image tower's OpenVINO IR.

Calibrated on the user's own images (`register --int8 --calibration-data DIR_OR_TABLE`) or on
the built-in samples, at most MAX_CALIBRATION_IMAGES. A held-out part of the same images,
preprocessed once, goes through torch fp32 and the int8 IR: their lowest cosine is what
quantization costs. The int8 IR is kept, and offered
as `precision: int8`, only where that cosine holds runtime.INT8_OFFER_COSINE.
"""

from __future__ import annotations

import dataclasses
import os

from clip_pyfunc.artifacts.openvino import IR_INT8_FILE, compile_tower, ir_path
from clip_pyfunc.artifacts.towers import CheckpointInfo
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.registry.lookup import local_models
from clip_pyfunc.registry.precision import lowest_cosine
from clip_pyfunc.runtime import INT8_OFFER_COSINE, OpenVINOEngine
from clip_pyfunc.stages.postprocess import finish
from clip_pyfunc.settings import RuntimeConfig

MAX_CALIBRATION_IMAGES = 300
HELD_OUT_SHARE = 0.2  # of the calibration images, never seen by the quantizer, measure the cosine
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif")
TABLE_COLUMNS = ("input", "content", "image", "image_base64")


def read_calibration_images(source: str | None) -> list[object]:
    """The calibration images: cells the image model takes (bytes or base64), at most MAX_CALIBRATION_IMAGES.

    Args:
        source: A directory of image files (searched recursively, files in sorted order), a
            Parquet file or directory with a column named one of TABLE_COLUMNS (raw bytes, as
            Spark's binaryFile writes them, or base64), or None for the built-in samples (toy
            shapes, photo-like and camera-like JPEGs).

    Raises:
        ModelLoadError: The source is missing, holds no images, or has none of the columns.
    """
    if source is None:
        from clip_pyfunc.dev.samples import camera_jpeg, photo_jpeg, sample_images_b64

        return (sample_images_b64() + [photo_jpeg(640 + 32 * s, 480, seed=s) for s in range(24)]
                + [camera_jpeg(800, 600, seed=s) for s in range(16)])
    if not os.path.exists(source):
        raise ModelLoadError(f"--calibration-data {source!r} does not exist; give a directory of images or a "
                             "Parquet table")
    files = []
    if os.path.isdir(source) and not any(n.endswith(".parquet") for n in os.listdir(source)):
        for root, _, names in sorted(os.walk(source)):
            files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
        if not files:
            raise ModelLoadError(f"--calibration-data {source!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        out = []
        for path in _spread(files):
            with open(path, "rb") as f:
                out.append(f.read())
        return out
    import pandas as pd

    try:
        frame = pd.read_parquet(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--calibration-data {source!r} is neither an image directory nor Parquet: {e}") from e
    column = next((c for c in TABLE_COLUMNS if c in frame.columns), None)
    if column is None:
        raise ModelLoadError(f"--calibration-data {source!r} has columns {list(frame.columns)[:10]}; "
                             f"one of {TABLE_COLUMNS} must hold the images")
    return _spread([v for v in frame[column].tolist() if v is not None])


def _spread(items: list) -> list:
    """At most MAX_CALIBRATION_IMAGES items, evenly spaced over all of them (a folder per class gives
    every class its share, not the first classes alone)."""
    if len(items) <= MAX_CALIBRATION_IMAGES:
        return list(items)
    step = len(items) / MAX_CALIBRATION_IMAGES
    return [items[int(i * step)] for i in range(MAX_CALIBRATION_IMAGES)]


def quantize_image_tower(info: CheckpointInfo, towers: dict[str, str], source: str | None) -> CheckpointInfo:
    """Write the image tower's int8 IR, measure it on held-out images, keep it where it holds.

    Returns:
        The description with `openvino_cosine["int8"]` set (the held-out cosine to torch fp32), and
        `openvino_fallback["int8"]` saying why no int8 IR was kept, where none was.

    Raises:
        ModelLoadError: The calibration data cannot be read, or has too few good images (8).
    """
    import nncf
    import numpy as np
    import openvino as ov

    if "image" in info.openvino_fallback:
        return _refuse(info, towers, f"the image tower has no OpenVINO IR ({info.openvino_fallback['image']})")
    (fp32,) = local_models(towers, RuntimeConfig(device="cpu", engine="openvino", precision="fp32"), ("image",))
    cells = read_calibration_images(source)
    rows = [(cell, fp32._prepare(cell)) for cell in cells]
    good = [(cell, r) for cell, r in rows if not isinstance(r, Exception)]
    if len(good) < 8:
        raise ModelLoadError(f"--calibration-data gave {len(good)} images that decode; int8 needs at least 8")
    every = round(1 / HELD_OUT_SHARE)  # every fifth image is held out, spread like the rest
    held_out = good[every - 1::every] if len(good) >= 2 * every else good[-2:]
    calibrate = [g for g in good if not any(g is h for h in held_out)]
    naflex = fp32.image_spec.naflex

    def inputs(prepared):
        if naflex:
            patches, mask, shape = prepared
            return {"pixel_values": patches[None], "pixel_attention_mask": mask[None],
                    "spatial_shapes": np.asarray([shape], dtype=np.int64)}
        return {"pixel_values": prepared[None]}

    model = ov.Core().read_model(ir_path(towers["image"]))
    quantized = nncf.quantize(model, nncf.Dataset([inputs(r) for _, r in calibrate]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibrate))
    ov.save_model(quantized, os.path.join(towers["image"], IR_INT8_FILE), compress_to_fp16=False)
    # The same held-out pixels through torch fp32 and the int8 IR: the cosine is what quantization costs.
    (reference,) = local_models(towers, RuntimeConfig(device="cpu", engine="torch", precision="fp32"), ("image",))
    int8 = OpenVINOEngine(compile_tower(towers["image"], "int8", fp32.runtime.threads), fp32.runtime)
    batch = [inputs(r) for _, r in held_out]
    stacked = {k: np.concatenate([b[k] for b in batch]) for k in batch[0]}
    if naflex:
        want = reference.engine.patch_features(*stacked.values())
        got = int8.patch_features(*stacked.values())
    else:
        want, got = reference.engine.image_features(stacked["pixel_values"]), int8.image_features(
            stacked["pixel_values"])
    cosine = lowest_cosine(finish(want, True), finish(got, True))
    info = dataclasses.replace(info, openvino_cosine={**info.openvino_cosine, "int8": cosine})
    if cosine < INT8_OFFER_COSINE:
        os.remove(ir_path(towers["image"], "int8"))
        os.remove(ir_path(towers["image"], "int8").removesuffix(".xml") + ".bin")
        return _refuse(info, towers, f"int8 held a cosine of {cosine} to fp32 on {len(held_out)} held-out images, "
                                     f"under {INT8_OFFER_COSINE}; not offered")
    for path in towers.values():
        info.write(path)
    return info


def _refuse(info: CheckpointInfo, towers: dict[str, str], reason: str) -> CheckpointInfo:
    info = dataclasses.replace(info, openvino_fallback={**info.openvino_fallback, "int8": reason})
    for path in towers.values():
        info.write(path)
    return info
