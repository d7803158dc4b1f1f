"""CLIP: OpenAI, and the OpenCLIP/LAION, MetaCLIP and DFN exports in transformers format.

Text pools at the EOS position under a causal mask, so padding to the longest row is exact.
The projections sit at the top level and are sized by the top-level `projection_dim`, whatever
the sub-configs say (LAION's bigG export keeps 512 there beside 1280; transformers issue 25622).
"""

from clip_pyfunc.families.base import Family

CLIP = Family(model_type="clip", model_class="CLIPModel")
