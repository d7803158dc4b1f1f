"""The fast path judged by its pixels: how far its preprocessed tensor lands from the family's
reference image processor, and what it costs per image.

A model's cosine on one set of weights is a weak judge of a preprocessing path (tiny or random
weights can be insensitive or oversensitive), so the fast path is held to the reference
processor's own output, in 0..255 levels: |fast - reference| * std / rescale per channel.
"""

from __future__ import annotations

import io
import tempfile

# One reference processor per resize kind transformers ships, at its class's defaults
# (the shapes of openai/clip-vit-base-patch32, google/siglip-base-patch16-224,
# google/siglip2-base-patch16-naflex and kakaobrain/align-base).
RESIZE_KINDS = {
    "shortest_edge_crop": "CLIPImageProcessorPil",  # shortest edge 224, center crop 224, bicubic
    "squash": "SiglipImageProcessorPil",  # 224x224, aspect not kept, bicubic
    "naflex": "Siglip2ImageProcessorPil",  # aspect kept, <= 256 patches of 16, bilinear
    "resize_crop_align": "EfficientNetImageProcessorPil",  # 346x346, crop 289, to [-1, 1]
}
# Photo-like JPEG sizes from 300 px to 12 MP and past it (width, height).
SIZES = ((300, 225), (640, 480), (1224, 1632), (2000, 1500), (2400, 1800), (3840, 2160), (4000, 3000))
SUBSAMPLINGS = ("4:2:0", "4:4:4")


def reference_processors() -> dict:
    """{resize kind: (transformers' processor, the ImageSpec clip-pyfunc reads from its saved config)}."""
    import transformers

    from clip_pyfunc.stages.preprocess import read_image_spec

    out = {}
    for kind, name in RESIZE_KINDS.items():
        processor = getattr(transformers, name)()
        with tempfile.TemporaryDirectory() as folder:
            processor.save_pretrained(folder)
            out[kind] = (processor, read_image_spec(folder))
    return out


def fast_pixels(data: bytes, spec, limits=None, torch_resize: bool = True):
    """The tensor the fast path feeds the tower for these JPEG bytes ((3, H, W), or NaFlex's patches);
    `torch_resize` False is the OpenVINO engine's PIL resample."""
    from clip_pyfunc.stages.decode import ImageLimits, decode_image
    from clip_pyfunc.errors import InvalidInput
    from clip_pyfunc.stages.preprocess import fast_draft_edge, preprocess_image

    limits = limits or ImageLimits(max_bytes=1 << 30, max_pixels=1 << 30)
    img = decode_image(data, limits, fast_draft_edge(spec))
    if isinstance(img, InvalidInput):
        raise img
    out = preprocess_image(img, spec, fast=True, torch_resize=torch_resize)
    return out[0] if spec.naflex else out


def reference_pixels(data: bytes, processor):
    """The family processor's tensor for the same bytes, decoded in full and turned upright by PIL."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return processor(images=img, return_tensors="np")["pixel_values"][0]


def level_error(fast, reference, spec) -> tuple[float, float]:
    """(max, mean) |fast - reference| in 0..255 levels (the normalisation undone per channel)."""
    import numpy as np

    scale = np.ones(3, np.float64) / (spec.rescale or 1.0)
    if spec.std is not None:
        scale *= np.asarray(spec.std, np.float64)
    if spec.top_std is not None:
        scale *= np.asarray(spec.top_std, np.float64)
    diff = np.abs(fast.astype(np.float64) - reference[: len(fast)].astype(np.float64))
    diff = diff.reshape(len(diff), -1, 3) * scale if spec.naflex else diff * scale.reshape(3, 1, 1)
    return float(diff.max()), float(diff.mean())


def measure_pixels(sizes=SIZES, subsamplings=SUBSAMPLINGS, quality: int = 92) -> list[dict]:
    """Levels from the reference for camera-like JPEGs (samples.camera_jpeg: texture and grain) of
    each size and chroma subsampling, through each resize kind."""
    from clip_pyfunc.dev.samples import camera_jpeg

    processors = reference_processors()
    rows = []
    for width, height in sizes:
        for subsampling in subsamplings:
            data = camera_jpeg(width, height, seed=width + height, quality=quality, subsampling=subsampling)
            for kind, (processor, spec) in processors.items():
                worst, mean = level_error(fast_pixels(data, spec), reference_pixels(data, processor), spec)
                rows.append({"size": f"{width}x{height}", "subsampling": subsampling, "resize": kind,
                             "max_levels": round(worst, 2), "mean_levels": round(mean, 4)})
    return rows


def run() -> dict:
    """`clip-pyfunc bench-pixels`: every size, subsampling and resize kind, with the worst of each."""
    from clip_pyfunc.benchmarks.common import machine_info

    rows = measure_pixels()
    return {"benchmark": "fast_path_pixels", "machine": machine_info(), "rows": rows,
            "max_levels": max(r["max_levels"] for r in rows), "max_mean_levels": max(r["mean_levels"] for r in rows),
            "bound": {"max_levels": 3, "mean_levels": 0.25}}
