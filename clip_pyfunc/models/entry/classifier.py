"""Models-from-code entry for the zero-shot classifier (logged as `python_model=` this file)."""

from mlflow.models import set_model

from clip_pyfunc.models.classifier import ClipZeroShotClassifier

set_model(ClipZeroShotClassifier())
