"""Models-from-code entry for the image embedding model (logged as `python_model=` this file)."""

from mlflow.models import set_model

from clip_pyfunc.models.image import ClipImageEmbedding

set_model(ClipImageEmbedding())
