"""`evaluate` reads image files one batch at a time: memory does not grow with the data (no timing here)."""

from __future__ import annotations

import base64
import io
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clip_pyfunc.batch.evaluate.data import ImageFile, read_data
from clip_pyfunc.batch.evaluate.metrics import embed
from clip_pyfunc.errors import InvalidInput


def _png(seed: int, side: int = 128) -> bytes:
    """Noise: a PNG that does not compress, about 3 * side**2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _labelled_folder(root, n: int) -> int:
    """n noise PNGs in three class folders; returns their total size in bytes."""
    total = 0
    for i in range(n):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        data = _png(i)
        (folder / f"{i:04d}.png").write_bytes(data)
        total += len(data)
    return total


class _StubImageModel:
    """Stands in for the image model: checks each batch, returns zero vectors, keeps nothing."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.rows = 0

    def embed_rows(self, cells, normalize=True):
        assert len(cells) <= self.batch_size and all(c is None or isinstance(c, bytes) for c in cells)
        self.rows += len(cells)
        return np.zeros((len(cells), 4), np.float32), []


def test_rows_keep_file_references_not_image_bytes(tmp_path):
    _labelled_folder(tmp_path / "labels", 6)
    data = read_data(str(tmp_path / "labels"))
    assert data.kind == "labels" and len(data.images) == 6
    assert all(isinstance(ref, ImageFile) for ref in data.images.refs)
    first = data.images.refs[0].path
    assert data.images[0] == open(first, "rb").read()
    assert data.images[1:3] == [open(r.path, "rb").read() for r in data.images.refs[1:3]]

    # A data file mixing a path, a missing path, base64 and an empty cell: only the files are deferred.
    png = _png(99, side=32)  # its base64 is longer than a file name may be
    rows = [{"image": "labels/class0/0000.png", "label": "a"}, {"image": "labels/nope.png", "label": "b"},
            {"image": base64.b64encode(png).decode("ascii"), "label": "c"}, {"image": "", "label": "d"}]
    pd.DataFrame(rows).to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    data = read_data(str(tmp_path / "rows.jsonl"))
    refs = data.images.refs
    assert isinstance(refs[0], ImageFile) and isinstance(refs[1], ImageFile)
    assert isinstance(refs[2], str) and isinstance(refs[3], InvalidInput)
    loaded = list(data.images)
    assert isinstance(loaded[0], bytes)
    assert isinstance(loaded[1], InvalidInput) and "cannot read image file" in loaded[1].reason
    assert loaded[2] is refs[2]

    # Raw bytes a parquet file holds stay as they are.
    pd.DataFrame({"image": [png], "label": ["a"]}).to_parquet(tmp_path / "rows.parquet")
    assert read_data(str(tmp_path / "rows.parquet")).images[0] == png


def _peak_bytes(folder: str, batch_size: int) -> int:
    """Peak traced memory of reading the data set and embedding its images with the stub model."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        data = read_data(folder)
        model = _StubImageModel(batch_size)
        vectors, errors, _, handed = embed(model, data.images, batch_size)
        assert not errors and handed == model.rows == len(data.images) == len(vectors)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small = _labelled_folder(tmp_path / "small", 20)
    large = _labelled_folder(tmp_path / "large", 200)
    read_data(str(tmp_path / "small"))  # imports and first-call caches before measuring
    peaks = {name: _peak_bytes(str(tmp_path / name), batch_size=8) for name in ("small", "large")}
    # 180 more files (about 9 MB) may cost a few bytes per row, not the files: holding every image
    # would add all of them.
    assert peaks["large"] - peaks["small"] < 0.05 * (large - small), (peaks, large - small)
    assert peaks["large"] < 0.2 * large, (peaks, large)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_embed_fills_every_row_once(tmp_path, batch_size):
    _labelled_folder(tmp_path / "labels", 10)
    data = read_data(str(tmp_path / "labels"))
    data.images.refs[4] = ImageFile(str(tmp_path / "gone.png"))
    model = _StubImageModel(batch_size)
    vectors, errors, _, handed = embed(model, data.images, batch_size)
    assert vectors.shape == (10, 4) and vectors.dtype == np.float32
    assert list(errors) == [4] and "cannot read image file" in errors[4] and handed == 9
    assert np.isnan(vectors[4]).all() and not np.isnan(np.delete(vectors, 4, axis=0)).any()
