"""Models-from-code entry for the text embedding model (logged as `python_model=` this file)."""

from mlflow.models import set_model

from clip_pyfunc.models.text import ClipTextEmbedding

set_model(ClipTextEmbedding())
