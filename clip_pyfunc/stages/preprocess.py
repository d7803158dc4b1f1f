"""Stage 2, preprocess: images -> pixel arrays and strings -> token ids, from the checkpoint's configs.

Nothing here is hard-coded: sizes, crop, mean, std and resampling come from the saved image
processor (with its class's defaults), the text rules from the checkpoint's description. The
image path reproduces transformers' CLIP, SigLIP, Chinese-CLIP, EfficientNet (ALIGN) and
SigLIP 2 NaFlex image processors (resize, center crop, rescale, offset, normalise, patches)
with the same arithmetic, and resamples only the crop window for extreme aspect
ratios, whose full resize would be huge.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Sequence

from clip_pyfunc.errors import InvalidInput, ModelLoadError

# Image processors whose steps this module reproduces (transformers' class names, either backend).
SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor", "ChineseCLIPImageProcessor",
                        "EfficientNetImageProcessor", "Siglip2ImageProcessor")
_SUPPORTED_STEPS = {"do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"}
# Resized images up to this many crops in area are resized whole (exactly as transformers does).
_MAX_FULL_RESIZE = 8
# PIL resampling filters (by number) that torch resamples with PIL's antialiased kernels.
_TORCH_FILTERS = {2: "bilinear", 3: "bicubic"}
# The fast path's integer pre-shrink keeps at least this many times the target (PIL's reducing_gap;
# 3 is close to exact). Used only for images PIL resizes (not JPEGs).
REDUCING_GAP = 3.0
# The fast path decodes a JPEG at a reduced DCT scale (1/2, 1/4, 1/8) only while its shorter edge
# stays >= this many times the target edge. Measured on grainy camera-like JPEGs against the
# reference processor (docs/BENCHMARKS.md, "Fast path pixels"): a 12 MP photo at 1/4 scale (2x)
# was a mean 0.33 levels off; at the 4x boundary (2400x1800 at 1/2) still 0.20, close to the
# 0.25 bound; at 6x the worst case measured is 0.16 (max 2 levels).
DRAFT_GAP = 6


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """The image preprocessing a checkpoint declares (transformers image-processor terms).

    Attributes:
        shortest_edge: Resize so the shorter edge is this long (aspect kept); None with `resize_hw`.
        resize_hw: Resize to exactly (height, width) instead; None with `shortest_edge`.
        crop_hw: Center crop to (height, width); None for no crop.
        resample: PIL resampling filter number (3 = bicubic, 2 = bilinear).
        rescale: Multiplier from 0..255 (1/255 to 0..1; ALIGN's 1/127.5); None for no rescale.
        offset: Subtracted after rescaling (1.0 for ALIGN's rescale_offset, to [-1, 1]).
        mean: Per-channel mean; None for no normalisation.
        std: Per-channel std.
        top_std: A second division by std (EfficientNet's include_top); None for none.
        patch_size: NaFlex only: images become sequences of patch_size x patch_size patches.
        max_num_patches: NaFlex only: resize (aspect kept) to at most this many patches.
    """

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    resample: int
    rescale: float | None
    offset: float = 0.0
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    top_std: tuple[float, float, float] | None = None
    patch_size: int | None = None
    max_num_patches: int | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready values (stored in the artifact's CheckpointInfo at registration)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ImageSpec:
        """Back from to_dict (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def naflex(self) -> bool:
        """Variable-size patch sequences instead of one fixed-size tensor."""
        return self.patch_size is not None

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of the tensor the vision tower receives (fixed-size families)."""
        if self.crop_hw:
            return self.crop_hw
        if self.resize_hw:
            return self.resize_hw
        raise ModelLoadError("a preprocessor config without crop must resize to a fixed height and width")

    @property
    def draft_edge(self) -> int:
        """Shortest edge a reduced-scale decode must keep so the exact resize still downsamples."""
        if self.naflex:
            return self.patch_size * int(self.max_num_patches ** 0.5)
        return self.shortest_edge or min(self.resize_hw or self.output_hw)


def read_image_spec(artifact_dir: str) -> ImageSpec:
    """Read the image processor an artifact (or checkpoint) carries, with its class's defaults.

    transformers loads it (PIL backend), so settings the file leaves out take the values of
    the family's own processor class (SigLIP does not crop, ALIGN rescales to [-1, 1]).

    Raises:
        ModelLoadError: Missing, of a class this module does not reproduce, or asking for a
            step it does not implement.
    """
    from transformers import AutoImageProcessor

    try:
        ip = AutoImageProcessor.from_pretrained(artifact_dir, backend="pil")
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read the image processor config in {artifact_dir}: {e}") from e
    name = type(ip).__name__.removesuffix("Pil").removesuffix("Fast")
    if name not in SUPPORTED_PROCESSORS:
        raise ModelLoadError(f"{artifact_dir}: image processor {name} is not supported; supported: {SUPPORTED_PROCESSORS}")
    unknown = {k for k, v in vars(ip).items() if k.startswith("do_") and v and k not in _SUPPORTED_STEPS}
    if unknown:
        raise ModelLoadError(f"{artifact_dir} asks for steps {sorted(unknown)}; supported: {sorted(_SUPPORTED_STEPS)}")
    if ip.do_convert_rgb is False:
        raise ModelLoadError(f"{artifact_dir} sets do_convert_rgb false; clip-pyfunc always feeds RGB")
    do_normalize = bool(ip.do_normalize)
    common = dict(
        resample=int(ip.resample),
        rescale=float(ip.rescale_factor) if ip.do_rescale else None,
        offset=1.0 if ip.do_rescale and getattr(ip, "rescale_offset", False) else 0.0,
        mean=tuple(ip.image_mean) if do_normalize else None,
        std=tuple(ip.image_std) if do_normalize else None,
        top_std=tuple(ip.image_std) if getattr(ip, "include_top", False) else None,
    )
    if name == "Siglip2ImageProcessor":
        return ImageSpec(shortest_edge=None, resize_hw=None, crop_hw=None, patch_size=int(ip.patch_size),
                         max_num_patches=int(ip.max_num_patches), **common)
    size, crop = ip.size, ip.crop_size
    do_resize = bool(ip.do_resize)
    spec = ImageSpec(
        shortest_edge=size.shortest_edge if do_resize and size.shortest_edge else None,
        resize_hw=(size.height, size.width) if do_resize and size.height and not size.shortest_edge else None,
        crop_hw=(crop.height, crop.width) if ip.do_center_crop and crop is not None else None,
        **common,
    )
    if do_resize and spec.shortest_edge is None and spec.resize_hw is None:
        raise ModelLoadError(f"{artifact_dir}: size {size!r} needs 'shortest_edge' or 'height' and 'width'")
    if spec.crop_hw and spec.shortest_edge and max(spec.crop_hw) > spec.shortest_edge:
        raise ModelLoadError(f"{artifact_dir}: crop {spec.crop_hw} is larger than the resized shortest edge")
    spec.output_hw  # noqa: B018 - validates that the output size is fixed
    return spec


def _resize_plan(width: int, height: int, spec: ImageSpec) -> tuple[int, int, tuple[int, int, int, int] | None]:
    """(new_w, new_h, crop box (left, top, right, bottom) or None) for an image of this size.

    Raises:
        InvalidInput: The image resizes to less than the crop.
    """
    if spec.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(spec.shortest_edge * long / short)
        new_w, new_h = (spec.shortest_edge, new_long) if width <= height else (new_long, spec.shortest_edge)
    elif spec.resize_hw:
        new_h, new_w = spec.resize_hw
    else:
        new_w, new_h = width, height
    if not spec.crop_hw:
        return new_w, new_h, None
    crop_h, crop_w = spec.crop_hw
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    if top < 0 or left < 0:
        raise InvalidInput(f"image resizes to {new_w}x{new_h}, smaller than the crop {crop_w}x{crop_h}", kind="image_shape")
    return new_w, new_h, (left, top, left + crop_w, top + crop_h)


def resize_and_crop(img, spec: ImageSpec, reducing_gap: float | None = None, window: bool = False):
    """Resize (shortest edge or fixed size) and center crop one RGB image, as CLIPImageProcessor does.

    Pixels equal the processor's (full resize, then crop), except for aspect ratios past 8:1,
    where only the crop window is resampled. `reducing_gap` (PIL's) first shrinks large images
    by an integer factor with a box filter, keeping at least that many times the target size:
    faster on big PNGs, close to (not equal to) the exact resize. `window` (the fast path)
    resamples only the crop window at every aspect ratio: the same scale and filter support, so
    within 1 level of the full resize (measured on 2 MP and 12 MP photos), and a quarter less
    work for a 4:3 photo under a square crop.
    """
    width, height = img.size
    new_w, new_h, box = _resize_plan(width, height, spec)
    if box is None:
        if (new_w, new_h) == (width, height):
            return img
        return img.resize((new_w, new_h), spec.resample, reducing_gap=reducing_gap)
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    if (new_w, new_h) == (width, height):
        return img.crop(box)
    if not window and new_w * new_h <= _MAX_FULL_RESIZE * crop_w * crop_h:
        # The reference's own order, bit for bit: resize everything, then crop.
        return img.resize((new_w, new_h), spec.resample, reducing_gap=reducing_gap).crop(box)
    # Very elongated images (a 6000x1 strip would resize to 224 x 1.3 M), or the fast path: resample
    # only the crop window. PIL keeps the full resize's scale and filter support, so pixels match
    # the full resize to within 1 level on photos (2 on the elongated strips measured before).
    sx, sy = width / new_w, height / new_h
    area = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return img.resize((crop_w, crop_h), spec.resample, box=area, reducing_gap=reducing_gap if window else None)


def fast_draft_edge(spec: ImageSpec) -> int:
    """The shorter edge a JPEG decoded at a reduced DCT scale must keep on the fast path (DRAFT_GAP x the target)."""
    return DRAFT_GAP * spec.draft_edge


def preprocess_image(img, spec: ImageSpec, *, fast: bool, torch_resize: bool = True):
    """One decoded RGB image -> what the vision tower takes.

    Args:
        img: A PIL RGB image, or on the fast path a JPEG's (H, W, 3) uint8 array
            (`decode.open_pixels`).
        spec: The checkpoint's image preprocessing.
        fast: Resample arrays with torch's antialiased kernels and shrink large PIL images by an
            integer factor first (REDUCING_GAP); otherwise exactly the reference processor's PIL steps.
        torch_resize: On the fast path, resample arrays with torch; False resamples them with PIL
            (the OpenVINO engine's choice, so its vectors are the same with or without torch installed).

    Returns:
        (3, H, W) float32; NaFlex: (patches (max_num_patches, p*p*3) float32, mask (max_num_patches,)
        int32, (rows, cols)).

    Raises:
        InvalidInput: The image resizes to less than the crop.
    """
    if spec.naflex:
        if fast:
            return image_to_patches(_resize_fast(img, *naflex_size(*_size(img), spec), spec, torch_resize), spec)
        return image_to_patches(resize_for_patches(img, spec), spec)
    if fast:
        return crop_to_array(resize_and_crop_fast(img, spec, REDUCING_GAP, torch_resize), spec)
    return crop_to_array(resize_and_crop(img, spec), spec)


def _size(img) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W, 3) array."""
    return (img.shape[1], img.shape[0]) if hasattr(img, "shape") else img.size


def _resize_fast(img, new_w: int, new_h: int, spec: ImageSpec, torch_resize: bool = True):
    """Resize to (new_w, new_h) on the fast path: arrays by torch's antialiased kernels, PIL images by PIL."""
    import numpy as np

    if not isinstance(img, np.ndarray) or not torch_resize or spec.resample not in _TORCH_FILTERS:
        from PIL import Image

        pil = img if not isinstance(img, np.ndarray) else Image.fromarray(img)
        return pil if pil.size == (new_w, new_h) else pil.resize((new_w, new_h), spec.resample, reducing_gap=REDUCING_GAP)
    if (new_w, new_h) == (img.shape[1], img.shape[0]):
        return img
    import torch

    pixels = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)  # NCHW view of channels-last memory
    resized = torch.nn.functional.interpolate(pixels, size=(new_h, new_w), mode=_TORCH_FILTERS[spec.resample],
                                              antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


def resize_and_crop_fast(image, spec: ImageSpec, reducing_gap: float, torch_resize: bool = True):
    """`resize_and_crop` for the fast path, returning an (H, W, 3) uint8 array.

    An array (a JPEG from `decode.open_pixels`) is resampled by torch's antialiased uint8
    kernels (channels-last, SIMD): about 6x faster than PIL's and within one level of its
    pixels. A PIL image (other formats), filters torch does not antialias and 8:1 aspect ratios
    take PIL's path, where `reducing_gap` first shrinks large images by an integer box filter.
    Without torch (`torch_resize` False) an array takes PIL's resize with no box pre-shrink: the
    reduced-scale decode has already done the shrinking, and a box pre-shrink on top of it
    measured a mean error past 0.25 levels on grainy photos. PIL's path resamples only the crop
    window (resize_and_crop's `window`).
    """
    import numpy as np

    if not isinstance(image, np.ndarray):
        return np.asarray(resize_and_crop(image, spec, reducing_gap, window=True))
    height, width = image.shape[:2]
    new_w, new_h, box = _resize_plan(width, height, spec)
    mode = _TORCH_FILTERS.get(spec.resample) if torch_resize else None
    crop_area = (box[2] - box[0]) * (box[3] - box[1]) if box else new_w * new_h
    if mode is None or new_w * new_h > _MAX_FULL_RESIZE * crop_area:
        from PIL import Image

        gap = reducing_gap if torch_resize else None
        return np.asarray(resize_and_crop(Image.fromarray(image), spec, gap, window=True))
    out = _resize_fast(image, new_w, new_h, spec, torch_resize)
    return out[box[1] : box[3], box[0] : box[2]] if box else out


def crop_to_array(crop, spec: ImageSpec):
    """Rescale and normalise one resized and cropped RGB image into (3, H, W) float32.

    Raises:
        InvalidInput: The crop is not the size the tower expects.
    """
    import numpy as np

    pixels = np.asarray(crop)
    out_h, out_w = spec.output_hw
    if pixels.shape != (out_h, out_w, 3):
        raise InvalidInput(f"image preprocessed to {pixels.shape[:2]}, expected {(out_h, out_w)}", kind="image_shape")
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
    if spec.offset:
        x = x - np.float32(spec.offset)
    if spec.mean is not None:
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1)
        x = (x - mean) / std
    if spec.top_std is not None:
        x = x / np.asarray(spec.top_std, dtype=np.float32).reshape(3, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def naflex_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """(width, height) a NaFlex image is resized to: aspect kept, sides multiples of the patch
    size, at most max_num_patches patches (transformers' own search, so sizes match exactly)."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    h, w = get_image_size_for_max_num_patches(height, width, spec.patch_size, spec.max_num_patches)
    return w, h


def resize_for_patches(img, spec: ImageSpec, reducing_gap: float | None = None):
    """Resize one RGB image to its NaFlex size (see naflex_size)."""
    size = naflex_size(*img.size, spec)
    return img if size == img.size else img.resize(size, spec.resample, reducing_gap=reducing_gap)


def image_to_patches(img, spec: ImageSpec):
    """Rescale and normalise a resized RGB image and cut it into a padded patch sequence.

    Returns:
        (patches (max_num_patches, p*p*3) float32, mask (max_num_patches,) int32, (rows, cols)),
        with patches row-major and channels last inside each patch, as Siglip2ImageProcessor.
    """
    import numpy as np

    pixels = np.asarray(img)
    h, w = pixels.shape[:2]
    p = spec.patch_size
    if h % p or w % p or (h // p) * (w // p) > spec.max_num_patches:
        raise InvalidInput(f"image preprocessed to {(h, w)}, not a grid of at most {spec.max_num_patches} patches", kind="image_shape")
    table = _value_table(spec)
    values = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=values[:, :, c])
    rows, cols = h // p, w // p
    grid = values.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    patches = np.zeros((spec.max_num_patches, p * p * 3), dtype=np.float32)
    patches[: rows * cols] = grid
    mask = np.zeros(spec.max_num_patches, dtype=np.int32)
    mask[: rows * cols] = 1
    return patches, mask, (rows, cols)


@dataclass(frozen=True, kw_only=True)
class TextSpec:
    """How a text artifact's rows become token ids (from its CheckpointInfo and tokenizer).

    Attributes:
        max_length: Most tokens, special tokens included; longer rows are truncated or refused.
        pad_id: Id that fills padded positions.
        truncate: Truncate over-long rows (False refuses them, naming the row).
        pad_to: Pad every row to this width (families that pool the last position), or None
            to pad each micro-batch to its longest row, rounded up to `length_step`.
        lowercase: Lowercase rows before tokenising.
        attention_mask: Feed the tower an attention mask.
        length_step: Without `pad_to`, a micro-batch is padded to a multiple of this many tokens (at most
            `max_length`), so that the engine sees a few sequence lengths, not one per longest row: OpenVINO
            keeps compiled kernels for each input shape it meets (docs/BENCHMARKS.md, issue 39). The
            vectors stay those of the unpadded rows: the padding is what shorter rows of the batch
            already get (masked, or after the position the family pools); a test compares them. 1: none.
    """

    max_length: int
    pad_id: int
    truncate: bool
    pad_to: int | None = None
    lowercase: bool = False
    attention_mask: bool = True
    length_step: int = 1

    def width(self, longest: int) -> int:
        """The padded width of a micro-batch whose longest row has `longest` ids."""
        if self.pad_to:
            return max(self.pad_to, longest)
        step = max(1, self.length_step)
        return max(longest, min(self.max_length, -(-longest // step) * step))


def tokenize(tokenizer, texts: Sequence[str], spec: TextSpec) -> list[list[int] | InvalidInput]:
    """Tokenise each row to ids with the tokenizer's special tokens, truncated to the context length
    (or an error).

    Truncation keeps the leading special tokens, the first tokens of the text and the final
    special token (EOS / [SEP] / </s>), exactly as the tokenizer's own `truncation=True,
    max_length=...` does.
    """
    rows = [t.lower() for t in texts] if spec.lowercase else list(texts)
    if hasattr(tokenizer, "encode_batch"):  # a tokenizers.Tokenizer (load_fast_tokenizer)
        encoded = [e.ids for e in tokenizer.encode_batch(rows, add_special_tokens=True)]
    else:
        encoded = tokenizer(rows, add_special_tokens=True, truncation=False, padding=False)["input_ids"]
    out: list[list[int] | InvalidInput] = []
    for row, ids in enumerate(encoded):
        if len(ids) <= spec.max_length:
            out.append(ids)
        elif spec.truncate:
            out.append(ids[: spec.max_length - 1] + ids[-1:])
        else:
            out.append(InvalidInput(
                f"text is {len(ids)} tokens, over the model's context length of {spec.max_length} "
                "(truncate_text is false; shorten it or enable truncation)", row, "over_limit",
            ))
    return out


TOKENIZER_FILE = "tokenizer.json"


def load_fast_tokenizer(artifact_dir: str):
    """The artifact's `tokenizer.json` as a bare `tokenizers.Tokenizer` (no transformers), with its
    own truncation and padding off: `tokenize` truncates and `pad_ids` pads.

    Raises:
        ModelLoadError: The file is missing or unreadable.
    """
    from tokenizers import Tokenizer

    path = os.path.join(artifact_dir, TOKENIZER_FILE)
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise ModelLoadError(f"cannot read the tokenizer {path}: {e}") from e
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """Pad id lists on the right to `width` (default: the longest row): (input_ids, attention_mask) int64."""
    import numpy as np

    width = max([len(r) for r in rows] + [width or 0])
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask
