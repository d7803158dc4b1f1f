"""Stage 3, encode: tower forward passes in micro-batches, under inference mode.

The runtime (clip_pyfunc.runtime) owns the device and precision; these functions take a ready
`Runtime` and only move tensors and run the forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from clip_pyfunc.runtime import Runtime


def features(output):
    """The vectors of a get_*_features call: `.pooler_output` in transformers 5, the tensor before."""
    return getattr(output, "pooler_output", output)


def encode_pixels(model, pixels, runtime: Runtime):
    """Run the image tower on a float32 array (n, 3, H, W); return its vectors (n, dim) fp32."""
    import torch

    batch = torch.from_numpy(pixels).to(runtime.device, runtime.input_dtype, non_blocking=True)
    with runtime.forward_context():
        return features(model.get_image_features(pixel_values=batch)).float()


def encode_patches(model, patches, mask, shapes, runtime: Runtime):
    """Run a NaFlex image tower on patch sequences (n, P, D) with their mask (n, P) and grid
    shapes (n, 2); return its vectors (n, dim) fp32."""
    import torch

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

    from clip_pyfunc.stages.preprocess import pad_ids

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
