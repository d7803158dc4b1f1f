"""Stage 2, preprocess: images -> pixel arrays and strings -> token ids, from the checkpoint's configs.

Nothing here is hard-coded: sizes, crop, mean, std and resampling come from the saved
preprocessor_config.json, the context length from the text config. The image path
reproduces transformers' CLIPImageProcessor (resize shortest edge, center crop, rescale,
normalise) with the same arithmetic, and resamples only the crop window for extreme aspect
ratios, whose full resize would be huge.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Sequence

from clip_pyfunc.errors import InvalidInput, ModelLoadError

_SUPPORTED_STEPS = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                    "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb"}
# Resized images up to this many crops in area are resized whole (exactly as transformers does).
_MAX_FULL_RESIZE = 8


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """The image preprocessing a checkpoint declares (transformers CLIPImageProcessor terms).

    Attributes:
        shortest_edge: Resize so the shorter edge is this long (aspect kept); None with `resize_hw`.
        resize_hw: Resize to exactly (height, width) instead; None with `shortest_edge`.
        crop_hw: Center crop to (height, width); None for no crop.
        resample: PIL resampling filter number (3 = bicubic).
        rescale: Multiplier from 0..255 to 0..1; None for no rescale.
        mean: Per-channel mean; None for no normalisation.
        std: Per-channel std.
    """

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    resample: int
    rescale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of the tensor the vision tower receives."""
        if self.crop_hw:
            return self.crop_hw
        if self.resize_hw:
            return self.resize_hw
        raise ModelLoadError("a preprocessor config without crop must resize to a fixed height and width")

    @property
    def draft_edge(self) -> int:
        """Shortest edge a reduced-scale decode must keep so the exact resize still downsamples."""
        return self.shortest_edge or min(self.resize_hw or self.output_hw)


def read_image_spec(artifact_dir: str) -> ImageSpec:
    """Read preprocessor_config.json from an image artifact.

    Raises:
        ModelLoadError: The file is missing, or declares a step clip-pyfunc does not implement.
    """
    path = os.path.join(artifact_dir, "preprocessor_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read image preprocessing config {path}: {e}") from e
    unknown = {k for k, v in cfg.items() if v and k.startswith("do_") and k not in _SUPPORTED_STEPS}
    if unknown:
        raise ModelLoadError(f"{path} asks for steps {sorted(unknown)}; supported: {sorted(_SUPPORTED_STEPS)}")
    if not cfg.get("do_convert_rgb", True):
        raise ModelLoadError(f"{path} sets do_convert_rgb false; clip-pyfunc always feeds RGB")
    size = _size_dict(cfg.get("size"), default_to_square=cfg.get("default_to_square", False))
    crop = _size_dict(cfg.get("crop_size"), default_to_square=True)
    do_resize = cfg.get("do_resize", True)
    spec = ImageSpec(
        shortest_edge=size.get("shortest_edge") if do_resize else None,
        resize_hw=(size["height"], size["width"]) if do_resize and "height" in size else None,
        crop_hw=(crop["height"], crop["width"]) if cfg.get("do_center_crop", True) else None,
        resample=int(cfg.get("resample", 3)),
        rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
        mean=tuple(cfg["image_mean"]) if cfg.get("do_normalize", True) else None,
        std=tuple(cfg["image_std"]) if cfg.get("do_normalize", True) else None,
    )
    if do_resize and spec.shortest_edge is None and spec.resize_hw is None:
        raise ModelLoadError(f"{path}: size {cfg.get('size')!r} needs 'shortest_edge' or 'height' and 'width'")
    if spec.crop_hw and spec.shortest_edge and max(spec.crop_hw) > spec.shortest_edge:
        raise ModelLoadError(f"{path}: crop {spec.crop_hw} is larger than the resized shortest edge")
    spec.output_hw  # noqa: B018 - validates that the output size is fixed
    return spec


def _size_dict(value, *, default_to_square: bool) -> dict:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    return dict(value)


def resize_and_crop(img, spec: ImageSpec, reducing_gap: float | None = None):
    """Resize (shortest edge or fixed size) and center crop one RGB image, as CLIPImageProcessor does.

    Pixels equal the processor's (full resize, then crop), except for aspect ratios past 8:1,
    where only the crop window is resampled. `reducing_gap` (PIL's) first shrinks large images
    by an integer factor with a box filter, keeping at least that many times the target size:
    faster on big PNGs, close to (not equal to) the exact resize.
    """
    width, height = img.size
    if spec.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(spec.shortest_edge * long / short)
        new_w, new_h = (spec.shortest_edge, new_long) if width <= height else (new_long, spec.shortest_edge)
    elif spec.resize_hw:
        new_h, new_w = spec.resize_hw
    else:
        new_w, new_h = width, height
    if not spec.crop_hw:
        if (new_w, new_h) == (width, height):
            return img
        return img.resize((new_w, new_h), spec.resample, reducing_gap=reducing_gap)
    crop_h, crop_w = spec.crop_hw
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    if top < 0 or left < 0:
        raise InvalidInput(f"image resizes to {new_w}x{new_h}, smaller than the crop {crop_w}x{crop_h}")
    if (new_w, new_h) == (width, height):
        return img.crop((left, top, left + crop_w, top + crop_h))
    if new_w * new_h <= _MAX_FULL_RESIZE * crop_w * crop_h:
        # The reference's own order, bit for bit: resize everything, then crop.
        full = img.resize((new_w, new_h), spec.resample, reducing_gap=reducing_gap)
        return full.crop((left, top, left + crop_w, top + crop_h))
    # Very elongated images (a 6000x1 strip would resize to 224 x 1.3 M): resample only the crop
    # window. PIL keeps the full resize's scale and filter support, so pixels match to within 2 levels.
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    return img.resize((crop_w, crop_h), spec.resample, box=box)


def images_to_array(images: Sequence, spec: ImageSpec):
    """Preprocess RGB images into one float32 array (n, 3, H, W) ready for the vision tower."""
    return crops_to_array([resize_and_crop(img, spec) for img in images], spec)


def crops_to_array(crops: Sequence, spec: ImageSpec):
    """Rescale and normalise already resized and cropped RGB images into (n, 3, H, W) float32."""
    import numpy as np

    out_h, out_w = spec.output_hw
    batch = np.empty((len(crops), 3, out_h, out_w), dtype=np.float32)
    for i, crop in enumerate(crops):
        batch[i] = crop_to_array(crop, spec)
    return batch


def crop_to_array(crop, spec: ImageSpec):
    """Rescale and normalise one resized and cropped RGB image into (3, H, W) float32.

    Raises:
        InvalidInput: The crop is not the size the tower expects.
    """
    import numpy as np

    pixels = np.asarray(crop)
    out_h, out_w = spec.output_hw
    if pixels.shape != (out_h, out_w, 3):
        raise InvalidInput(f"image preprocessed to {pixels.shape[:2]}, expected {(out_h, out_w)}")
    table = _value_table(spec)
    out = np.empty((3, out_h, out_w), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=out[c])
    return out


@functools.lru_cache(maxsize=8)
def _value_table(spec: ImageSpec):
    """Each channel's float32 output for each of the 256 byte values: a lookup per pixel then
    gives the processor's own arithmetic (rescale in float64, cast, normalise in float32) exactly."""
    import numpy as np

    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    x = (levels.astype(np.float64) * spec.rescale).astype(np.float32) if spec.rescale else levels.astype(np.float32)
    if spec.mean is not None:
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1)
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True, kw_only=True)
class TextSpec:
    """Tokenisation limits of a text artifact."""

    max_length: int
    pad_id: int
    truncate: bool


def tokenize(tokenizer, texts: Sequence[str], spec: TextSpec) -> list[list[int] | InvalidInput]:
    """Tokenise each row to ids with BOS/EOS, truncated to the context length (or an error).

    Truncation keeps BOS, the first `max_length - 2` tokens and EOS, exactly as the
    tokenizer's own `truncation=True, max_length=...` does.
    """
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False, padding=False)["input_ids"]
    out: list[list[int] | InvalidInput] = []
    for row, ids in enumerate(encoded):
        if len(ids) <= spec.max_length:
            out.append(ids)
        elif spec.truncate:
            out.append(ids[: spec.max_length - 1] + ids[-1:])
        else:
            out.append(InvalidInput(
                f"text is {len(ids)} tokens, over the model's context length of {spec.max_length} "
                "(truncate_text is false; shorten it or enable truncation)", row,
            ))
    return out


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int):
    """Pad id lists to the longest row: (input_ids, attention_mask) int64 arrays."""
    import numpy as np

    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask
