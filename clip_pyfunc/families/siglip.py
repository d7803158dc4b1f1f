"""SigLIP, and SigLIP 2 at fixed resolution (which loads as `siglip`).

The text tower pools the *last* position, so text is padded to max_length (64 for the released
models) with no attention mask, as the reference does; padding to the longest row changes every
vector. SigLIP 2's Gemma tokenizer does not lowercase by itself while its reference pipeline
does, so text is lowercased where the tokenizer is a Gemma one. Scores are an independent
sigmoid per label of exp(logit_scale)*cos + logit_bias.
"""

from clip_pyfunc.families.base import Family, exp


def gemma_tokenizer(tokenizer) -> bool:
    """SigLIP 2 ships a Gemma tokenizer with no lowercasing of its own (SigLIP 1's lowercases)."""
    return type(tokenizer).__name__.startswith("Gemma")


SIGLIP = Family(
    model_type="siglip", model_class="SiglipModel",
    text_children=("text_model",), image_children=("vision_model",),  # heads live inside the towers
    pad_to_max_length=True, lowercase=gemma_tokenizer,
    scoring="sigmoid", scale=lambda p: exp(p["logit_scale"]), bias=lambda p: p["logit_bias"],
)
