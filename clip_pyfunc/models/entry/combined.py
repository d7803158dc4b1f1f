"""Models-from-code entry for the combined image+text model (logged as `python_model=` this file)."""

from mlflow.models import set_model

from clip_pyfunc.models.combined import ClipImageTextEmbedding

set_model(ClipImageTextEmbedding())
