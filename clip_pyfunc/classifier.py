"""Where models logged before the regrouping by role find `ClipZeroShotClassifier` (now clip_pyfunc.models.classifier).

Their models-from-code file imports `clip_pyfunc.classifier`. A fresh process loads their own copy of
the package; a process that has imported today's package already (a notebook, the app, a Spark
worker) finds the class here instead.
"""

from clip_pyfunc.models.classifier import ClipZeroShotClassifier

__all__ = ["ClipZeroShotClassifier"]
