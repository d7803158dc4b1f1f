"""Stage 3, encode: tower forward passes in micro-batches, under inference mode.

The caller (the loader) owns the device and precision; these functions take a ready
`Runtime` and only move tensors and run the forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Where and how forwards run.

    Attributes:
        device: torch.device the tower lives on.
        precision: Resolved precision: "fp32", "fp16", "bf16" or "int8".
        input_dtype: dtype of floating inputs (pixel values) fed to the tower.
        autocast_dtype: dtype for torch.autocast around the forward, or None.
        batch_size: Rows per forward.
    """

    device: object
    precision: str
    input_dtype: object
    autocast_dtype: object | None
    batch_size: int

    def forward_context(self):
        """Inference mode, plus autocast when the precision asks for it."""
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        return stack


def encode_pixels(model, pixels, runtime: Runtime):
    """Run the image tower on a float32 array (n, 3, H, W); return its vectors (n, dim) fp32."""
    import torch

    from clip_pyfunc.checkpoint import features

    batch = torch.from_numpy(pixels).to(runtime.device, runtime.input_dtype, non_blocking=True)
    with runtime.forward_context():
        return features(model.get_image_features(pixel_values=batch)).float()


def encode_patches(model, patches, mask, shapes, runtime: Runtime):
    """Run a NaFlex image tower on patch sequences (n, P, D) with their mask (n, P) and grid
    shapes (n, 2); return its vectors (n, dim) fp32."""
    import torch

    from clip_pyfunc.checkpoint import features

    with runtime.forward_context():
        out = model.get_image_features(
            pixel_values=torch.from_numpy(patches).to(runtime.device, runtime.input_dtype),
            pixel_attention_mask=torch.from_numpy(mask).to(runtime.device),
            spatial_shapes=torch.from_numpy(shapes).to(runtime.device),
        )
        return features(out).float()


def encode_token_ids(model, ids: Sequence[Sequence[int]], spec, runtime: Runtime):
    """Run the text tower on id lists padded as the TextSpec says; return its vectors (n, dim) fp32."""
    import torch

    from clip_pyfunc.checkpoint import features
    from clip_pyfunc.preprocess import pad_ids

    input_ids, mask = pad_ids(ids, spec.pad_id, spec.pad_to)
    kwargs = {"input_ids": torch.from_numpy(input_ids).to(runtime.device)}
    if spec.attention_mask:
        kwargs["attention_mask"] = torch.from_numpy(mask).to(runtime.device)
    with runtime.forward_context():
        return features(model.get_text_features(**kwargs)).float()


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group row positions into micro-batches of similar length (longest first).

    Padding is to the longest row of each batch, so mixing a 70-token caption with 5-token
    queries would make every query pay for 70 positions.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
