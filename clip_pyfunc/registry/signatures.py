"""What the logged models declare to MLflow: signatures, input examples and the request contract."""

from __future__ import annotations

import base64
import io

# The request contract, written where MLflow shows it (model metadata, version description),
# because the signature itself carries no input schema (see `model_signature`).
INPUT_CONTRACT = (
    "a DataFrame with a column 'input' (or exactly one column of any name), a list, a pandas "
    "Series or a 1-D array"
)


def model_signature(normalize: bool = True):
    """The pinned signature: an array of floats out and the `normalize` param; no input schema.

    MLflow enforces an input schema before our code runs, and no schema accepts every shape
    users send: a named `input` column refuses `predict(["a cat"])` and Series, and an unnamed
    column makes MLflow pass on only the first column of a wider DataFrame, so a frame whose
    first column is an id would be embedded silently. Without an input schema MLflow passes the
    request through untouched and `models.request.input_values` reads every shape, naming the columns
    of a frame it cannot read. Output and params are still declared and enforced (Unity
    Catalog needs the output schema), and the input contract is in the metadata and description.
    The `normalize` default is the model_config's, because MLflow fills in a param's declared
    default before the model sees the request.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(Array(DataType.float))]),
        params=ParamSchema([ParamSpec("normalize", DataType.boolean, normalize)]),
    )


def combined_signature(normalize: bool = True):
    """The combined model's signature: `image_features` and `text_features` (each may be null) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(Array(DataType.float), name, required=False)
                        for name in ("image_features", "text_features")]),
        params=ParamSchema([ParamSpec("normalize", DataType.boolean, normalize)]),
    )


def input_example(tower: str):
    """A small request the logged model answers: a caption, or a 16x16 PNG in base64."""
    import pandas as pd

    if tower == "text":
        return pd.DataFrame({"input": ["a photo of a cat"]})
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode("ascii")
    if tower == "combined":
        return pd.DataFrame({"image": [image, ""], "text": ["", "a photo of a cat"]})
    return pd.DataFrame({"input": [image]})


def classifier_signature(top_k: int):
    """The classifier's pinned signature: `labels` and `scores` arrays out, its params declared."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(Array(DataType.string), "labels"), ColSpec(Array(DataType.double), "scores")]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, top_k),
                            ParamSpec("candidate_labels", DataType.string, [], (-1,)),
                            ParamSpec("hypothesis_template", DataType.string, "")]),
    )
