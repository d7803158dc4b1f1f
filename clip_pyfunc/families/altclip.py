"""AltCLIP: an XLM-R text tower (positions start after the padding index) pooled at [CLS]."""

from clip_pyfunc.families.base import Family

ALTCLIP = Family(model_type="altclip", model_class="AltCLIPModel", position_offset=2)
