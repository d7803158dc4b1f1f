"""The job's writer: write to a staging location, count it, then swap it in for the previous output."""

from __future__ import annotations

import os

from clip_pyfunc.batch.spark.session import is_local
from clip_pyfunc.errors import EmbedJobError
from clip_pyfunc.models.request import ERROR_COL


def count_written(spark, staging: str, is_table: bool) -> tuple[int, int]:
    """Rows, and rows with an error, read back from the written output.

    A local job's parquet output is counted from its files' footers: row counts, and the
    error column's null counts, which Spark writes. That is milliseconds, where a Spark job
    is about 0.8 s. Anything else, or footers without those counts, is counted by Spark.
    """
    counted = None if is_table else count_footers(spark, staging)
    if counted is not None:
        return counted
    from pyspark.sql import functions as F

    written = spark.table(staging) if is_table else spark.read.parquet(staging)
    row = written.agg(F.count(F.lit(1)).alias("rows"), F.count(ERROR_COL).alias("failed")).first()
    return row["rows"], row["failed"]


def count_footers(spark, location: str) -> tuple[int, int] | None:
    """(rows, failed) from the footers of a parquet directory on this machine; None where it is
    elsewhere (a cluster's executors wrote to their own disks or to another file system) or a
    footer lacks the counts."""
    if not is_local(spark.sparkContext.master):
        return None
    fs, path = hadoop_fs(spark, location)
    if fs.getUri().getScheme() != "file":
        return None
    import pyarrow
    import pyarrow.parquet as pq

    folder = fs.makeQualified(path).toUri().getPath()
    rows = failed = 0
    try:
        for name in sorted(os.listdir(folder)):
            if name.startswith(("_", ".")):  # _SUCCESS, checksum files
                continue
            meta = pq.ParquetFile(os.path.join(folder, name)).metadata
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                errors = [group.column(k).statistics for k in range(group.num_columns)
                          if group.column(k).path_in_schema == ERROR_COL]
                if len(errors) != 1 or errors[0] is None or not errors[0].has_null_count:
                    return None
                rows += group.num_rows
                failed += group.num_rows - errors[0].null_count
    except (OSError, pyarrow.ArrowInvalid):
        return None
    return rows, failed


def looks_like_path(output: str) -> bool:
    """True for a parquet path (a folder, a .parquet name or a URI); a table name has none of them."""
    return "/" in output or output.endswith(".parquet") or "://" in output


def publish(spark, staging: str, output: str, is_table: bool) -> None:
    """Swap the staging table or folder in for `output` (a previous output is replaced).

    Raises:
        EmbedJobError: The file system refused the rename.
    """
    if is_table:
        spark.sql(f"DROP TABLE IF EXISTS {output}")
        spark.sql(f"ALTER TABLE {staging} RENAME TO {output}")
        return
    fs, path = hadoop_fs(spark, output)
    jvm = spark.sparkContext._jvm
    if fs.exists(path):
        fs.delete(path, True)
    if not fs.rename(jvm.org.apache.hadoop.fs.Path(staging), path):
        raise EmbedJobError(f"could not move {staging} to {output}")


def drop(spark, staging: str, is_table: bool) -> None:
    """Remove the staging table or folder, where it is still there."""
    if is_table:
        spark.sql(f"DROP TABLE IF EXISTS {staging}")
        return
    fs, path = hadoop_fs(spark, staging)
    if fs.exists(path):
        fs.delete(path, True)


def hadoop_fs(spark, location: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(location)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path
