"""Model families: one small adapter per transformers `model_type`, gathered in one mapping.

A family says which full model class computes its vectors, which top-level submodules and
parameters each tower needs, the text rules its reference pipeline follows (padding length,
lowercasing, attention mask), how its image inputs are shaped, and how its scores are made.
The stage modules ask the adapter; none of them tests a family's name.
"""

from __future__ import annotations

import functools

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.families.base import SCORINGS, Family


@functools.cache
def families() -> dict[str, Family]:
    """`model_type` -> Family, for every family module of this package (imported on first use).

    Raises:
        ValueError: A family declares a scoring that is not one of SCORINGS.
    """
    from clip_pyfunc.families import align, altclip, chinese_clip, clip, metaclip_2, siglip, siglip2

    found = {}
    for module in (align, altclip, chinese_clip, clip, metaclip_2, siglip, siglip2):
        for family in (v for v in vars(module).values() if isinstance(v, Family)):
            if family.scoring not in SCORINGS:
                raise ValueError(f"scoring {family.scoring!r} is not one of {SCORINGS}")
            found[family.model_type] = family
    return found


def family_for(model_type: object, where: str = "the checkpoint") -> Family:
    """The adapter of a `model_type`.

    Raises:
        ModelLoadError: The model_type is not a supported family; the message lists them.
    """
    known = families()
    if model_type not in known:
        hint = " (BLIP-2 is out of scope: its image side is 32 query vectors, not one)" if model_type == "blip-2" else ""
        raise ModelLoadError(
            f"{where} has model_type {model_type!r}, which is not a supported dual-encoder family{hint}; "
            f"supported: {sorted(known)}"
        )
    return known[model_type]
