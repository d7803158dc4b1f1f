"""The job's reader: a parquet path, a folder of image files (binaryFile) or a table."""

from __future__ import annotations

import os

from clip_pyfunc.errors import EmbedJobError


INPUT_FORMATS = ("auto", "parquet", "images", "table")


def read_input(spark, source: str, fmt: str = "auto", id_col: str | None = None, input_col: str | None = None):
    """Read a parquet path, a directory of image files (binaryFile) or a table.

    Returns:
        (DataFrame, id column, input column). A directory of images gives `path` and `content`.
    """
    if fmt not in INPUT_FORMATS:
        raise EmbedJobError(f"input format {fmt!r} is not one of {INPUT_FORMATS}")
    if fmt == "auto":
        if source.endswith(".parquet") or (os.path.isdir(source) and any(
                f.endswith(".parquet") for f in os.listdir(source))):
            fmt = "parquet"
        elif os.path.isdir(source):
            fmt = "images"
        elif os.path.exists(source):
            raise EmbedJobError(f"{source} is a file; --input takes a parquet path, an image directory or a table")
        else:
            fmt = "table"
    if fmt == "images":
        df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(source)
        return df.select("path", "content"), id_col or "path", input_col or "content"
    df = spark.read.parquet(source) if fmt == "parquet" else spark.table(source)
    if not id_col or not input_col:
        raise EmbedJobError("--id-col and --input-col are required for parquet and table inputs "
                            "(the combined model: --input-col image,text)")
    columns = [id_col, *input_col.split(",")]
    for col in columns:
        if col not in df.columns:
            raise EmbedJobError(f"column {col!r} not in {source}; columns: {df.columns}")
    return df.select(*columns), id_col, input_col
