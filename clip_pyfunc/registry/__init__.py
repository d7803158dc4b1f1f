"""Build, log and register the models, and look them up.

The public face is `register_models` and `register_classifier` (publish): `build` makes the tower
artifacts once (each engine's files, the fidelity measurement in `precision`, int8 in `quantize`),
then every model is logged (`signatures`, `requirements`) and published last; `lookup` finds
registered models again.
"""

from clip_pyfunc.registry.publish import register_classifier, register_models

__all__ = ["register_classifier", "register_models"]
