"""Zero-shot scoring: cosine similarities -> per-label scores, by the family's rule.

Scores follow the family, as transformers' zero-shot-image-classification pipeline does: a
softmax over labels of scale*cos for CLIP-like families (scale = exp(logit_scale), or
1/temperature for ALIGN), an independent sigmoid(scale*cos + bias) per label for SigLIP.
The classifier model and `evaluate` both score with this one function.
"""

from __future__ import annotations


def scores(similarities, scoring: str, scale: float, bias: float):
    """Scores (n, labels) from cosine similarities, by the family's rule (float64)."""
    import numpy as np

    logits = scale * np.asarray(similarities, dtype=np.float64) + bias
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
