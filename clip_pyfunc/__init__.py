"""clip-pyfunc: any image-text dual encoder as MLflow pyfunc embedding models in one space.

Importing the package is cheap: torch, transformers and pyspark load only where used.
"""

import pkgutil

from clip_pyfunc.errors import ClipPyfuncError, InvalidInput, ModelLoadError

# A logged model ships only the rooms it imports (registry.requirements.MODEL_CODE), and MLflow puts
# that copy first on sys.path. A process that loads a model before it imports the rest of the
# package then finds the other rooms (search, batch, dev, ...) in the installed package.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"

__all__ = ["ClipPyfuncError", "InvalidInput", "ModelLoadError", "__version__"]
