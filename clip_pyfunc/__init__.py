"""clip-pyfunc: any CLIP checkpoint as two MLflow pyfunc embedding models, text and image.

Importing the package is cheap: torch, transformers and pyspark load only where used.
"""

from clip_pyfunc.errors import ClipPyfuncError, InvalidInput, ModelLoadError

__version__ = "0.1.0"

__all__ = ["ClipPyfuncError", "InvalidInput", "ModelLoadError", "__version__"]
