"""Stage 3, encode: the tower's forward on one micro-batch, through the model's engine.

The runtime (clip_pyfunc.runtime) picks the device and precision and holds the engine; these
functions hand it arrays (padding token ids first) and get the vectors back, fp32 (n, dim).
"""

from __future__ import annotations

from typing import Sequence


def encode_pixels(engine, pixels):
    """Run the image tower on a float32 array (n, 3, H, W); return its vectors (n, dim) fp32."""
    return engine.image_features(pixels)


def encode_patches(engine, patches, mask, shapes):
    """Run a NaFlex image tower on patch sequences (n, P, D) with their mask (n, P) and grid
    shapes (n, 2); return its vectors (n, dim) fp32."""
    return engine.patch_features(patches, mask, shapes)


def encode_token_ids(engine, ids: Sequence[Sequence[int]], spec):
    """Run the text tower on id lists padded as the TextSpec says; return its vectors (n, dim) fp32."""
    from clip_pyfunc.stages.preprocess import pad_ids

    input_ids, mask = pad_ids(ids, spec.pad_id, spec.width(max(len(row) for row in ids)))
    return engine.text_features(input_ids, mask if spec.attention_mask else None)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group row positions into micro-batches of similar length (longest first).

    Padding is to the longest row of each batch, so mixing a 70-token caption with 5-token
    queries would make every query pay for 70 positions.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
