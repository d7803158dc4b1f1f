"""Model families: one small adapter per transformers `model_type`, registered in one mapping.

A family says which full model class computes its vectors, which top-level submodules and
parameters each tower needs, the text rules its reference pipeline follows (padding length,
lowercasing, attention mask), how its image inputs are shaped, and how its scores are made.
The stage modules ask the adapter; none of them tests a family's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from clip_pyfunc.errors import ModelLoadError

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
    scale: Callable[[dict], float] = lambda p: _exp(p["logit_scale"])
    bias: Callable[[dict], float] = lambda p: 0.0

    def children(self, tower: str) -> tuple[str, ...]:
        """Top-level submodules the given tower ("text" or "image") keeps."""
        return self.text_children if tower == "text" else self.image_children


def _exp(x: float) -> float:
    import math

    return math.exp(x)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the mapping (each family module calls this once)."""
    if family.scoring not in SCORINGS:
        raise ValueError(f"scoring {family.scoring!r} is not one of {SCORINGS}")
    FAMILIES[family.model_type] = family
    return family


def family_for(model_type: object, where: str = "the checkpoint") -> Family:
    """The adapter of a `model_type`.

    Raises:
        ModelLoadError: The model_type is not a supported family; the message lists them.
    """
    _load_all()
    if model_type not in FAMILIES:
        hint = " (BLIP-2 is out of scope: its image side is 32 query vectors, not one)" if model_type == "blip-2" else ""
        raise ModelLoadError(
            f"{where} has model_type {model_type!r}, which is not a supported dual-encoder family{hint}; "
            f"supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def _load_all() -> None:
    from clip_pyfunc.families import align, altclip, chinese_clip, clip, metaclip_2, siglip, siglip2  # noqa: F401
