"""Stage 4, postprocess: fp32 L2 normalisation and the float32 (n, dim) output contract."""

from __future__ import annotations


def finish(embeddings, normalize: bool):
    """Return embeddings as a float32 numpy array (n, dim), L2-normalised in fp32 when asked.

    Normalisation matches transformers' CLIP (`x / x.norm(dim=-1, keepdim=True)`).
    """
    import numpy as np

    out = embeddings.float()
    if normalize:
        out = out / out.norm(p=2, dim=-1, keepdim=True)
    return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
