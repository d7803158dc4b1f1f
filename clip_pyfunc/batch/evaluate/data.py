"""Evaluation data: read JSONL, CSV, parquet or a folder of images into rows of one kind.

The kinds and their columns are described in clip_pyfunc.batch.evaluate (the package docstring).
Image files are not read here: a row keeps its file's path, and `EvalData.images` reads the files
of one batch when the batch is embedded, so memory stays bounded by `evaluate.batch_size` at any
data size (only vectors and per-item results grow with the rows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from clip_pyfunc.errors import InvalidInput
from clip_pyfunc.models.request import EMBEDDING_COL, ERROR_COL
from clip_pyfunc.stages.decode import is_missing


FORMATS = ("negatives", "pairs", "labels")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A row's image file, read only when its batch is embedded."""

    path: str


class ImageRefs(Sequence):
    """Per row, an image as the data refers to it, read on access.

    `refs` holds ImageFile paths, base64 text, raw bytes (cells the data file itself held) or an
    InvalidInput. Indexing or slicing returns what the image stage takes: a file's bytes (read
    then, not kept), the base64 text or bytes as they are, or an InvalidInput (a missing file ...).
    """

    def __init__(self, refs: list):
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [_load(ref) for ref in self.refs[index]]
        return _load(self.refs[index])


@dataclass(kw_only=True)
class EvalData:
    """A data set read for evaluation: one row per item, images read per batch (ImageRefs).

    Attributes:
        kind: One of FORMATS.
        frame: The rows as read (what `mlflow.data` logs and digests).
        images: Per row: the image (ImageRefs: file bytes read on access, base64, bytes, or an InvalidInput).
        texts: Per row: the caption, or the positive caption ("negatives"), or the label ("labels").
        negatives: Per row, "negatives" only: the negative captions.
        source: Where the data came from.
    """

    kind: str
    frame: object
    images: ImageRefs
    texts: list
    negatives: list = field(default_factory=list)
    source: str = ""


def read_data(path: str, kind: str = "auto") -> EvalData:
    """Read an evaluation data set (see the module docstring for the formats).

    Raises:
        InvalidInput: The file cannot be read, or its columns fit no format (the message names them).
    """
    import pandas as pd

    if os.path.isdir(path):
        frame, base = _read_folder(path), path
    else:
        base = os.path.dirname(os.path.abspath(path))
        try:
            if path.endswith((".jsonl", ".json")):
                frame = pd.read_json(path, lines=path.endswith(".jsonl"), dtype=False)
            elif path.endswith(".csv"):
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            elif path.endswith(".parquet") or os.path.isdir(path):
                frame = pd.read_parquet(path)
            else:
                raise InvalidInput(f"--data {path!r}: use a .jsonl, .csv or .parquet file, or a folder of images")
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read --data {path!r}: {e}") from e
    columns = [str(c) for c in frame.columns]
    if kind == "auto":
        kind = ("negatives" if "negatives" in columns else "labels" if "label" in columns
                else "pairs" if "caption" in columns else None)
    needed = {"negatives": ("image", "positive", "negatives"), "pairs": ("image", "caption"),
              "labels": ("image", "label")}.get(kind)
    if needed is None or not set(needed) <= set(columns):
        raise InvalidInput(
            f"--data {path!r} has columns {columns}; expected one of: image+positive+negatives (negatives), "
            "image+caption (pairs), image+label (labels)"
        )
    texts = [_text(v) for v in frame[needed[1]].tolist()]
    data = EvalData(kind=kind, frame=frame, images=ImageRefs([_image_ref(v, base) for v in frame["image"].tolist()]),
                    texts=texts, source=os.path.abspath(path))
    if kind == "negatives":
        data.negatives = [_negatives(v) for v in frame["negatives"].tolist()]
    return data


def _read_folder(path: str):
    """A folder: one subfolder per class (labels), or images with captions.csv / captions.jsonl (pairs)."""
    import pandas as pd

    for name in ("captions.jsonl", "captions.csv"):
        captions = os.path.join(path, name)
        if os.path.exists(captions):
            frame = (pd.read_json(captions, lines=True, dtype=False) if name.endswith(".jsonl")
                     else pd.read_csv(captions, dtype=str, keep_default_na=False))
            if "file" in frame.columns and "image" not in frame.columns:
                frame = frame.rename(columns={"file": "image"})
            return frame
    rows = [{"image": os.path.join(label, f), "label": label}
            for label in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, label))
            for f in sorted(os.listdir(os.path.join(path, label))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not rows:
        raise InvalidInput(f"folder {path!r} has neither class subfolders of images nor captions.csv/.jsonl")
    return pd.DataFrame(rows)


def _text(value):
    if is_missing(value) or not isinstance(value, str) or not value.strip():
        return InvalidInput(f"empty or missing text: {value!r}")
    return value


def _negatives(value):
    if isinstance(value, str):  # CSV: a JSON list, or captions separated by "|"
        value = json.loads(value) if value.strip().startswith("[") else value.split("|")
    values = list(value) if not is_missing(value) and hasattr(value, "__iter__") and not isinstance(value, str) else []
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        return InvalidInput(f"negatives must be a non-empty list of captions, got {value!r}")
    return values


def _image_ref(value, base: str):
    """A cell of the image column: a path (against the data's folder), base64, raw bytes, or a URL."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        return InvalidInput(f"empty image reference: {value!r}")
    if value.startswith(("http://", "https://")):
        return InvalidInput(f"image URL {value[:60]!r}: evaluate reads files and base64; download the images first")
    full = value if os.path.isabs(value) else os.path.join(base, value)
    if value[:5].lower() == "data:" or (len(value) > 255 and not os.path.exists(full)):
        return value  # base64 (too long for a file name): the decode stage checks it
    return ImageFile(full)


def _load(ref):
    """What the image stage takes for one reference: a file's bytes (read now), else the reference itself."""
    if not isinstance(ref, ImageFile):
        return ref
    try:
        with open(ref.path, "rb") as f:
            return f.read()
    except OSError as e:
        return InvalidInput(f"cannot read image file {ref.path!r}: {e.strerror or e}")


def read_embeddings(path: str, data: EvalData):
    """Image vectors from an `embed-table` output (id = the data's image column, embedding)."""
    import numpy as np
    import pandas as pd

    table = pd.read_parquet(path)
    id_col = next((c for c in table.columns if c not in (EMBEDDING_COL, ERROR_COL)), None)
    if id_col is None or EMBEDDING_COL not in table.columns:
        raise InvalidInput(f"--image-embeddings {path!r} needs an id column and 'embedding'; got {list(table.columns)}")
    lookup = {str(k): v for k, v in zip(table[id_col], table[EMBEDDING_COL]) if v is not None}
    dim = len(next(iter(lookup.values()))) if lookup else 0
    out = np.full((len(data.frame), dim), np.nan, dtype=np.float32)
    for row, key in enumerate(data.frame["image"].astype(str)):
        if key in lookup:
            v = np.asarray(lookup[key], dtype=np.float32)
            out[row] = v / np.linalg.norm(v)
    return out
