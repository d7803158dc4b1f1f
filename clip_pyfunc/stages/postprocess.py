"""Stage 4, postprocess: fp32 L2 normalisation and the float32 (n, dim) output contract."""

from __future__ import annotations


def finish(embeddings, normalize: bool):
    """Return an engine's vectors (float32 numpy, (n, dim)) as a contiguous float32 array, L2-normalised
    in fp32 when asked.

    Normalisation is transformers' CLIP formula (`x / x.norm(dim=-1, keepdim=True)`); numpy's
    norm may differ from torch's in the last bit.
    """
    import numpy as np

    out = np.asarray(embeddings, dtype=np.float32)
    if normalize:
        out = out / np.linalg.norm(out, ord=2, axis=-1, keepdims=True)
    return np.ascontiguousarray(out, dtype=np.float32)
