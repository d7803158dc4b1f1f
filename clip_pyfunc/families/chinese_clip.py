"""Chinese-CLIP: a BERT text tower pooled at [CLS] under the attention mask, top-level projections."""

from clip_pyfunc.families import Family, register

CHINESE_CLIP = register(Family(model_type="chinese_clip", model_class="ChineseCLIPModel"))
