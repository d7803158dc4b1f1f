"""The combined image+text pyfunc model: both towers behind one input splitter (Azure ML's contract).

Each row has an `image` (base64, raw bytes, or a URL when the model_config allows URLs) and a
`text`; either may be empty or null, not both. The answer has `image_features` and
`text_features` per row, each null where that input was empty. The rows of each modality are
embedded together by the text and image models' own stages, so the vectors are exactly theirs.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlflow.pyfunc

from clip_pyfunc.stages.decode import is_missing
from clip_pyfunc.errors import InvalidInput, combine_row_errors, preview
from clip_pyfunc.models.request import array_cells, invalid_input_as_400, served_row_limit

IMAGE_COLUMN, TEXT_COLUMN = "image", "text"
OUTPUT_COLUMNS = ("image_features", "text_features")
CONTRACT = (
    "a DataFrame (or records, or {'image': [...], 'text': [...]}) with columns 'image' (base64 or raw bytes, "
    "or an https URL when allow_urls is set) and 'text'; either may be empty or null in a row, not both"
)


class ClipImageTextEmbedding(mlflow.pyfunc.PythonModel):
    """Image and text embeddings of one checkpoint in one request: the text and image models, side by side.

    Output: a DataFrame with `image_features` and `text_features` (float32 vectors as lists, or
    None), L2-normalised unless the `normalize` param (default: the model_config's) is false.
    """

    table_inputs = (IMAGE_COLUMN, TEXT_COLUMN)  # the columns a Spark job hands to `table_columns`

    def load_context(self, context) -> None:
        """Load both towers once, each by its own model class."""
        from clip_pyfunc.models.image import ClipImageEmbedding
        from clip_pyfunc.models.text import ClipTextEmbedding

        self.image, self.text = ClipImageEmbedding(), ClipTextEmbedding()
        self.image.load_context(context)
        self.text.load_context(context)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Embed each row's image and text.

        Args:
            context: MLflow's context (unused).
            model_input: See CONTRACT.
            params: `normalize` (bool; default the model_config's `normalize`).

        Returns:
            pandas DataFrame with `image_features` and `text_features`.

        Raises:
            MlflowException: INVALID_PARAMETER_VALUE naming the bad rows and fields.
        """
        with invalid_input_as_400():
            images, texts = split_rows(model_input, served_row_limit(self.image.config.max_rows))
            columns, errors = self.embed_pairs(images, texts, self.image.read_params(params)["normalize"], True)
            if errors:
                raise combine_row_errors(errors)
        import pandas as pd

        return pd.DataFrame(columns, columns=list(OUTPUT_COLUMNS))

    def embed_pairs(self, images: Sequence[object], texts: Sequence[object], normalize: bool = True,
                    stop_on_error: bool = False) -> tuple[dict[str, list], list[InvalidInput]]:
        """Embed the present images and texts, each modality batched by its own model.

        Returns:
            ({"image_features": [list or None per row], "text_features": [...]}, row errors naming
            the field), sorted by row.
        """
        errors = [InvalidInput("neither image nor text; send at least one (empty or null means absent)", row,
                                "empty")
                  for row, (image, text) in enumerate(zip(images, texts)) if _absent(image) and _absent(text)]
        columns = {}
        for field, model, values in (("image", self.image, images), ("text", self.text, texts)):
            rows = [row for row, value in enumerate(values) if not _absent(value)]
            vectors, bad = model.embed_rows([values[row] for row in rows], normalize=normalize,
                                            stop_on_error=stop_on_error) if rows else ([], [])
            errors.extend(e.at(rows[e.row], f"{field}: {e.reason}") for e in bad)
            failed = {rows[e.row] for e in bad}
            cells: list = [None] * len(values)
            for i, row in enumerate(rows):
                if row not in failed:
                    cells[row] = vectors[i].tolist()
            columns[f"{field}_features"] = cells
        errors.sort(key=lambda e: e.row)
        return columns, errors

    def table_columns(self, frame, *, normalize: bool | None = None):
        """Per-row output columns for table jobs (Spark), from a frame with `image` and/or `text`."""
        images, texts = split_rows(frame, None)
        return self.embed_pairs(images, texts, self.image.config.normalize if normalize is None else normalize)


def split_rows(model_input, max_rows: int | None) -> tuple[list[object], list[object]]:
    """Return the `image` and `text` cells of a request, one of each per row (None where a column is absent).

    Raises:
        InvalidInput: Neither column, columns of different lengths, an unsupported type, or more
            rows than `max_rows` (None: no limit).
    """
    import numpy as np
    import pandas as pd

    frame = model_input
    if isinstance(frame, dict):  # served `inputs`/`instances` arrive as {column: numpy array}
        for name, value in frame.items():
            shape = np.shape(value) if isinstance(value, (np.ndarray, pd.Series)) else ()
            if len(shape) > 1 and shape[1:] != (1,):
                raise InvalidInput(f"column {str(name)!r} has shape {shape}; send one cell per row")
        columns = {k: array_cells(np.atleast_1d(np.asarray(v))) if isinstance(v, (np.ndarray, pd.Series)) else
                   (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in frame.items()}
        try:
            frame = pd.DataFrame(columns)
        except ValueError as e:
            raise InvalidInput(f"the columns of the request differ in length ({e})") from e
    elif isinstance(frame, (list, tuple)) and all(isinstance(r, dict) for r in frame):
        frame = pd.DataFrame(list(frame))
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInput(f"expected {CONTRACT}; got {type(model_input).__name__} {preview(model_input)}")
    names = [str(c) for c in frame.columns]
    if IMAGE_COLUMN not in names and TEXT_COLUMN not in names:
        raise InvalidInput(f"expected columns {IMAGE_COLUMN!r} and/or {TEXT_COLUMN!r}, got columns {names}")
    if max_rows is not None and len(frame) > max_rows:
        raise InvalidInput(f"{len(frame)} rows, over the limit of {max_rows} rows per call (max_rows)")
    empty = [None] * len(frame)
    images = frame[IMAGE_COLUMN].tolist() if IMAGE_COLUMN in names else empty
    texts = frame[TEXT_COLUMN].tolist() if TEXT_COLUMN in names else empty
    return images, texts


def _absent(value: object) -> bool:
    """An empty cell: null, NaN, or a string of only whitespace (Azure sends "" for no input)."""
    return is_missing(value) or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (bytes, bytearray)) and not value)
