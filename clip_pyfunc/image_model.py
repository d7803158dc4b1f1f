"""Where models logged before the regrouping by role find `ClipImageEmbedding` (now clip_pyfunc.models.image).

Their models-from-code file imports `clip_pyfunc.image_model`. A fresh process loads their own copy of
the package; a process that has imported today's package already (a notebook, the app, a Spark
worker) finds the class here instead.
"""

from clip_pyfunc.models.image import ClipImageEmbedding

__all__ = ["ClipImageEmbedding"]
