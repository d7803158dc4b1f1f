"""int8 at registration: NNCF's static post-training quantization of the image tower's OpenVINO IR.

Calibrated on the user's own images (`register --int8 --calibration-data DIR_OR_TABLE`) or on
the built-in samples, at most MAX_CALIBRATION_IMAGES. What quantization costs is the lowest
cosine between torch fp32 and the int8 IR on the same preprocessed pixels, measured on two sets
the quantizer never sees:
- a held-out share of the calibration images (HELD_OUT_SHARE, at least MIN_HELD_OUT where the set
  leaves MIN_CALIBRATION to calibrate on): what will be served, as far as the user's images show it;
- the shipped varied set (dev.samples.varied_images: VARIED_IMAGES photo-like images of every
  colour, texture, tone, size and aspect ratio): what a narrow calibration set cannot show. A
  quantizer calibrated on near-copies of one picture held 0.9998 on its own hold-out and 0.87 on
  varied pictures (issue 35).
The int8 IR is kept, and offered as `precision: int8`, only where both held
runtime.INT8_OFFER_COSINE (int8_verdict). The calibration set's diversity (calibration_diversity)
is reported beside them, and a set under CALIBRATION_DIVERSITY_MIN is named too uniform to judge.
"""

from __future__ import annotations

import dataclasses
import math
import os

from clip_pyfunc.artifacts.towers import CheckpointInfo
from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.registry.lookup import local_models
from clip_pyfunc.registry.precision import lowest_cosine
from clip_pyfunc.runtime import INT8_OFFER_COSINE
from clip_pyfunc.runtime.engines import REFERENCE
from clip_pyfunc.runtime.engines.openvino_engine import IR_INT8_FILE, OpenVINOEngine, ir_path
from clip_pyfunc.stages.postprocess import finish
from clip_pyfunc.settings import RuntimeConfig

ENGINE = OpenVINOEngine.name  # the engine whose IR this quantizes
MAX_CALIBRATION_IMAGES = 300
HELD_OUT_SHARE = 0.2  # of the calibration images, never seen by the quantizer, measure the cosine
MIN_HELD_OUT = 8  # held out where the set allows: fewer say little (2 at the least)
MIN_CALIBRATION = 8  # images the quantizer keeps before MIN_HELD_OUT is taken from a small set
# The share of the pixel variance of 16x16 thumbnails that lies between the calibration images: 0 for
# copies of one picture, near 1 for unrelated pictures. Measured: 30 noised copies of one picture
# 0.0000-0.0002 (noise of sd 4 to 32), brightness-jittered copies 0.11, 30 crops of two real photos
# 0.87, the built-in samples 0.81, the varied set 1.0. Under this, the set is too uniform to judge int8.
CALIBRATION_DIVERSITY_MIN = 0.2
THUMBNAIL_EDGE = 16
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


def split_held_out(items: list) -> tuple[list, list]:
    """(calibrate, held out): every fifth item held out, at least MIN_HELD_OUT where MIN_CALIBRATION
    remain, at least 2; spread evenly over the items, so a folder per class gives each its share."""
    n = len(items)
    count = max(2, min(max(math.ceil(n * HELD_OUT_SHARE), MIN_HELD_OUT), n - MIN_CALIBRATION))
    picks = {int((i + 0.5) * n / count) for i in range(count)}
    return [x for i, x in enumerate(items) if i not in picks], [x for i, x in enumerate(items) if i in picks]


def calibration_diversity(images: list) -> float:
    """How different the calibration images are from one another: the share of the pixel variance
    of their THUMBNAIL_EDGE-square thumbnails that lies between images, rounded to 4 places.

    0 for copies of one picture (grain averages out in the thumbnail), near 1 for unrelated
    pictures; see CALIBRATION_DIVERSITY_MIN for measured values.

    Args:
        images: Decoded images, PIL images or (H, W, 3) uint8 arrays.
    """
    import numpy as np
    from PIL import Image

    thumbs = np.stack([np.asarray((im if isinstance(im, Image.Image) else Image.fromarray(im)).convert("RGB").resize(
        (THUMBNAIL_EDGE, THUMBNAIL_EDGE), Image.BOX), dtype=np.float32) for im in images])
    total = float(thumbs.var())
    return round(float(thumbs.var(axis=0).mean()) / total, 4) if total > 0 else 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Measure:
    """What int8 cost at registration, and on what.

    Attributes:
        held_out: The lowest cosine to torch fp32 on the held-out calibration images.
        held_out_images: How many.
        varied: The lowest cosine to torch fp32 on the shipped varied set.
        varied_images: How many.
        diversity: The calibration set's calibration_diversity.
        calibration_images: How many images it was measured over (calibrated on and held out).
    """

    held_out: float
    held_out_images: int
    varied: float
    varied_images: int
    diversity: float
    calibration_images: int

    @property
    def cosine(self) -> float:
        """The figure the runtime reads (fidelity["openvino"]["int8"]): the lower of the two."""
        return min(self.held_out, self.varied)

    @property
    def too_uniform(self) -> bool:
        return self.diversity < CALIBRATION_DIVERSITY_MIN


def int8_verdict(measure: Int8Measure) -> tuple[bool, str]:
    """Whether the int8 IR is offered, and the note the summary and tags carry.

    Offered only where both the held-out calibration images and the shipped varied set held
    runtime.INT8_OFFER_COSINE. A calibration set under CALIBRATION_DIVERSITY_MIN is named too
    uniform to judge: its hold-out shows the cost on near-copies of its own pictures only, so the
    offer then rests on the varied set.

    Returns:
        (offered, note).
    """
    m = measure
    # Never offered on an empty set: a lowest cosine over no images is no measurement.
    offered = (m.held_out >= INT8_OFFER_COSINE and m.varied >= INT8_OFFER_COSINE and m.held_out_images > 0
               and m.varied_images > 0)
    few = " (few)" if m.held_out_images < MIN_HELD_OUT else ""
    note = (f"{'offered' if offered else 'not offered'}: lowest cosine to torch fp32 {m.held_out} on "
            f"{m.held_out_images} held-out calibration images{few} and {m.varied} on {m.varied_images} shipped "
            f"varied images, bar {INT8_OFFER_COSINE} on both; calibration diversity {m.diversity} over "
            f"{m.calibration_images} images")
    if m.too_uniform:
        note += (f", under {CALIBRATION_DIVERSITY_MIN}: the calibration set is too uniform to judge int8 (its "
                 "hold-out cannot show the cost on other pictures), so the offer rests on the varied set; "
                 "calibrate on images like those you will serve")
    return offered, note


def quantize_image_tower(info: CheckpointInfo, towers: dict[str, str], source: str | None) -> CheckpointInfo:
    """Write the image tower's int8 IR, measure it on held-out and varied images, keep it where both held.

    Returns:
        The description with `fidelity["openvino"]["int8"]` set (the lower held-out cosine to torch fp32),
        `measurement_notes["openvino int8"]` saying what it was measured on (int8_verdict), and
        `unavailable["openvino"]["int8"]` saying why no int8 IR was kept, where none was. The caller
        writes it into the artifacts.

    Raises:
        ModelLoadError: The calibration data cannot be read, or has too few good images (8).
    """
    import nncf
    import openvino as ov

    from clip_pyfunc.dev.samples import varied_images
    from clip_pyfunc.stages.decode import decode_image

    missing = info.unavailable.get(ENGINE, {})
    if "image" in missing:
        return _refuse(info, f"the image tower has no OpenVINO IR ({missing['image']})")
    (fp32,) = local_models(towers, RuntimeConfig(device="cpu", engine=ENGINE, precision="fp32"), ("image",))
    cells = read_calibration_images(source)
    rows = [(cell, fp32._prepare(cell)) for cell in cells]
    good = [(cell, r) for cell, r in rows if not isinstance(r, Exception)]
    if len(good) < 8:
        raise ModelLoadError(f"--calibration-data gave {len(good)} images that decode; int8 needs at least 8")
    calibrate, held_out = split_held_out(good)
    diversity = calibration_diversity([decode_image(cell, fp32.limits) for cell, _ in good])
    varied = [r for r in map(fp32._prepare, varied_images()) if not isinstance(r, Exception)]
    naflex = fp32.image_spec.naflex

    model = ov.Core().read_model(ir_path(towers["image"]))
    quantized = nncf.quantize(model, nncf.Dataset([_inputs(r, naflex) for _, r in calibrate]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibrate))
    ov.save_model(quantized, os.path.join(towers["image"], IR_INT8_FILE), compress_to_fp16=False)
    (reference,) = local_models(towers, RuntimeConfig(device="cpu", engine=REFERENCE[0], precision=REFERENCE[1]),
                                ("image",))
    int8 = OpenVINOEngine.load(towers["image"], "image", dataclasses.replace(fp32.runtime, precision="int8"))
    measure = Int8Measure(held_out=_cost(reference, int8, [r for _, r in held_out], naflex),
                          held_out_images=len(held_out), varied=_cost(reference, int8, varied, naflex),
                          varied_images=len(varied), diversity=diversity, calibration_images=len(good))
    offered, note = int8_verdict(measure)
    fidelity = {**info.fidelity, ENGINE: {**info.fidelity.get(ENGINE, {}), "int8": measure.cosine}}
    info = dataclasses.replace(info, fidelity=fidelity, measurement_notes={**info.measurement_notes,
                                                                          f"{ENGINE} int8": note})
    if not offered:
        os.remove(ir_path(towers["image"], "int8"))
        os.remove(ir_path(towers["image"], "int8").removesuffix(".xml") + ".bin")
        return _refuse(info, f"int8 {note}")
    return info


def _inputs(prepared, naflex: bool) -> dict:
    """One preprocessed image as the IR's inputs, batch of one."""
    import numpy as np

    if naflex:
        patches, mask, shape = prepared
        return {"pixel_values": patches[None], "pixel_attention_mask": mask[None],
                "spatial_shapes": np.asarray([shape], dtype=np.int64)}
    return {"pixel_values": prepared[None]}


def _cost(reference, int8, prepared: list, naflex: bool, batch: int = 16) -> float:
    """The lowest cosine between torch fp32 and the int8 IR on the same preprocessed images."""
    import numpy as np

    lowest = 1.0
    for start in range(0, len(prepared), batch):
        rows = [_inputs(r, naflex) for r in prepared[start:start + batch]]
        stacked = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        if naflex:
            want, got = reference.engine.patch_features(*stacked.values()), int8.patch_features(*stacked.values())
        else:
            want = reference.engine.image_features(stacked["pixel_values"])
            got = int8.image_features(stacked["pixel_values"])
        lowest = min(lowest, lowest_cosine(finish(want, True), finish(got, True)))
    return lowest


def _refuse(info: CheckpointInfo, reason: str) -> CheckpointInfo:
    """The description with why no int8 IR was kept."""
    return dataclasses.replace(info, unavailable={**info.unavailable,
                                                  ENGINE: {**info.unavailable.get(ENGINE, {}), "int8": reason}})
