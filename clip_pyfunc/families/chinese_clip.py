"""Chinese-CLIP: a BERT text tower pooled at [CLS] under the attention mask, top-level projections."""

from clip_pyfunc.families.base import Family

CHINESE_CLIP = Family(model_type="chinese_clip", model_class="ChineseCLIPModel")
