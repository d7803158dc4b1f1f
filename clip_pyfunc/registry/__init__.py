"""Log and register the models, and look them up: signatures, requirements, precision measurement, publish, lookups.

The public face is `register_models` and `register_classifier`; the rooms beside them are
`signatures`, `requirements`, `precision`, `publish` and `lookup`.
"""

from clip_pyfunc.registry.publish import register_classifier, register_models

__all__ = ["register_classifier", "register_models"]
