"""ALIGN: a BERT text tower ([CLS], projected) and an EfficientNet image tower (mean-pooled, no
projection). Scores are cosine / `temperature`, a plain parameter (not a log-scale)."""

from clip_pyfunc.families.base import Family

ALIGN = Family(
    model_type="align", model_class="AlignModel",
    image_children=("vision_model",),
    scale=lambda p: 1.0 / p["temperature"],
)
