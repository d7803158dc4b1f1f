"""The Family adapter: what one dual-encoder family declares (see clip_pyfunc.families)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True, kw_only=True)
class Family:
    """How one dual-encoder family is loaded, fed and scored.

    Attributes:
        model_type: The `model_type` in the checkpoint's config.json.
        model_class: The full transformers model class (its get_text_features /
            get_image_features are the reference computation of the vectors).
        text_children: Top-level submodules the text tower needs (the encoder and, where the
            family keeps it at the top level, its projection).
        image_children: Likewise for the image tower.
        pad_to_max_length: Pad text to the text config's max_position_embeddings. Families that
            pool the last position (SigLIP) need it; families that pool CLS or EOS under a
            mask do not, and pad to the longest row of each batch instead.
        lowercase: Lowercase text before tokenising, given the loaded tokenizer (where the
            family's reference lowercases and the tokenizer does not do it by itself).
        position_offset: Positions the text embeddings reserve (XLM-R style models start
            counting after the padding index, so 2 of max_position_embeddings are unusable).
        image_inputs: "pixels" (a fixed-size (3, H, W) tensor) or "naflex" (variable-size
            patch sequences with a mask and spatial shapes).
        scoring: "softmax" over labels or an independent per-label "sigmoid".
        scale: Score multiplier from the checkpoint's top-level parameters (float values).
        bias: Score offset from the same parameters (0 where the family has none).
    """

    model_type: str
    model_class: str
    text_children: tuple[str, ...] = ("text_model", "text_projection")
    image_children: tuple[str, ...] = ("vision_model", "visual_projection")
    pad_to_max_length: bool = False
    lowercase: Callable[[object], bool] = lambda tokenizer: False
    position_offset: int = 0
    image_inputs: str = "pixels"
    scoring: str = "softmax"
    scale: Callable[[dict], float] = lambda p: exp(p["logit_scale"])
    bias: Callable[[dict], float] = lambda p: 0.0

    def children(self, tower: str) -> tuple[str, ...]:
        """Top-level submodules the given tower ("text" or "image") keeps."""
        return self.text_children if tower == "text" else self.image_children


def exp(x: float) -> float:
    """e**x, for the families' `scale` (exp(logit_scale))."""
    import math

    return math.exp(x)
