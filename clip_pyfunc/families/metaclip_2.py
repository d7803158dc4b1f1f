"""MetaCLIP 2: CLIP's architecture with a multilingual (XLM-R style) tokenizer; EOS pooling."""

from clip_pyfunc.families.base import Family

METACLIP_2 = Family(model_type="metaclip_2", model_class="MetaClip2Model")
