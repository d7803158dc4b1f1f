"""SigLIP 2 NaFlex: SigLIP's text rules (its Siglip2Tokenizer lowercases by itself) and images as
variable-size patch sequences, resized to keep their aspect ratio within `max_num_patches`,
with a patch mask and spatial shapes."""

from clip_pyfunc.families.base import Family, exp

SIGLIP2 = Family(
    model_type="siglip2", model_class="Siglip2Model",
    text_children=("text_model",), image_children=("vision_model",),
    pad_to_max_length=True, image_inputs="naflex",
    scoring="sigmoid", scale=lambda p: exp(p["logit_scale"]), bias=lambda p: p["logit_bias"],
)
