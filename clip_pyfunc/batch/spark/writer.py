"""The job's writer: write to a staging location, count it, then swap it in for the previous output.

The swap (publish) never holds less than one complete copy: the previous output is moved aside,
not deleted, until the new one is in place.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from clip_pyfunc.batch.spark.session import is_local
from clip_pyfunc.errors import EmbedJobError, one_line
from clip_pyfunc.models.request import ERROR_COL

log = logging.getLogger(__name__)


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


def staging_location(output: str, is_table: bool) -> str:
    """A fresh name beside `output` for the job to write to before publish swaps it in."""
    return _beside(output, is_table, "staging", uuid.uuid4().hex[:8])


def previous_location(output: str, is_table: bool) -> str:
    """A fresh name beside `output` that publish moves the previous output to while it swaps.

    The name carries the time (UTC) so that the newest of several sorts last:
    `<output>.previous-YYYYMMDDHHMMSS-xxxxxx` for a folder, `<output>__previous_YYYYMMDDHHMMSS_xxxxxx`
    for a table.
    """
    return _beside(output, is_table, "previous", f"{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"
                                                 f"{'_' if is_table else '-'}{uuid.uuid4().hex[:6]}")


def _beside(output: str, is_table: bool, role: str, token: str) -> str:
    # rstrip: "out/" + ".staging-x" would name a folder inside the output, which the swap moves away.
    return f"{output}__{role}_{token}" if is_table else f"{output.rstrip('/')}.{role}-{token}"


def publish(spark, staging: str, output: str, is_table: bool) -> None:
    """Swap the staging table or folder in for `output`, never holding less than one complete copy.

    Three steps: move the previous output (where there is one) aside to previous_location, move
    the staging copy to `output`, then remove the previous copy. Moves are Hadoop FileSystem
    renames for a folder and `ALTER TABLE ... RENAME TO` for a table, and refuse a target that
    exists. Where the second step fails, the previous copy is moved back to `output`. The
    staging copy is not removed on failure: the error names where it is kept.

    A process killed between the steps leaves `output` missing and the previous copy at
    `<output>.previous-<time>-<id>` (a table: `<output>__previous_<time>_<id>`); the next job on
    the same output moves it back (restore_previous). Where the third step fails, the output is
    published and the previous copy is left behind; a warning names it.

    On an object store whose rename is a copy (S3A, GCS), a failed move can leave a folder half
    copied: the error still names every location that was involved.

    Args:
        spark: The session.
        staging: The written and counted new output (a table name or a folder).
        output: The table name or folder to publish to.
        is_table: True for tables, False for folders.

    Raises:
        EmbedJobError: A move failed. The message names where the new output is kept (the
            staging location) and where the previous one is.
    """
    previous, moved_aside = None, False
    step = f"checking whether {output} exists"
    try:
        if exists(spark, output, is_table):
            previous = previous_location(output, is_table)
            step = f"moving the previous output {output} aside to {previous}"
            move(spark, output, previous, is_table)
            moved_aside = True
        step = f"moving the new output {staging} to {output}"
        move(spark, staging, output, is_table)
    except Exception as e:
        where = _after_failed_swap(spark, staging, output, previous, is_table, moved_aside)
        raise EmbedJobError(f"could not publish {output}: {step} failed ({one_line(e)}). {where}") from e
    if previous:
        try:
            drop(spark, previous, is_table)
            if exists(spark, previous, is_table):
                raise EmbedJobError(f"{previous} is still there after the delete")
        except Exception as e:  # noqa: BLE001 - the new output is in place; the old copy is only left over
            log.warning("published %s, but could not remove the previous output kept at %s (%s); delete it "
                        "once the new output is checked", output, previous, one_line(e))


def _after_failed_swap(spark, staging: str, output: str, previous: str | None, is_table: bool,
                       moved_aside: bool) -> str:
    """Move the previous output back where it was moved aside, and say where each copy is now."""
    if not previous:
        old = f"Nothing was moved from {output}."
    elif not moved_aside:
        old = f"The previous output is still at {output}."
    else:
        try:
            move(spark, previous, output, is_table)
            old = f"The previous output is back at {output}."
        except Exception as e:  # noqa: BLE001 - reported in the job's error, with where the copy is
            old = (f"The previous output is kept at {previous} (moving it back to {output} failed: {one_line(e)}; "
                   f"a job run on {output} while it is missing moves it back).")
    try:
        staged = exists(spark, staging, is_table)
    except Exception:  # noqa: BLE001 - say where it should be
        staged = True
    new = (f"The new output is kept at {staging}." if staged else
           f"The new output is no longer at {staging}: look for it at {output}.")
    return f"{old} {new}"


def restore_previous(spark, output: str, is_table: bool) -> str | None:
    """Move back the newest previous copy that an interrupted publish left beside a missing `output`.

    Where `output` exists, previous copies are left alone (on an object store a half-copied
    output may stand beside the only complete copy) and a warning names them.

    Returns:
        The location restored from, or None.

    Raises:
        EmbedJobError: The move back failed; the message names where the copy is.
    """
    left = previous_copies(spark, output, is_table)
    if not left:
        return None
    if exists(spark, output, is_table):
        log.warning("previous outputs left by an interrupted publish of %s: %s; delete them once %s is checked",
                    output, ", ".join(left), output)
        return None
    try:
        move(spark, left[-1], output, is_table)
    except Exception as e:
        raise EmbedJobError(f"{output} is missing and an interrupted publish left the previous output at "
                            f"{left[-1]}; moving it back failed ({one_line(e)})") from e
    log.warning("%s was missing after an interrupted publish: moved the previous output back from %s",
                output, left[-1])
    return left[-1]


def previous_copies(spark, output: str, is_table: bool) -> list[str]:
    """Locations of previous copies of `output` that publish moved aside (previous_location), oldest first."""
    if is_table:
        namespace, _, name = output.rpartition(".")
        rows = spark.sql(f"SHOW TABLES {f'IN {namespace} ' if namespace else ''}LIKE '{name}__previous_*'").collect()
        names = [r["tableName"] for r in rows if not r["isTemporary"]]
        return sorted(f"{namespace}.{n}" if namespace else n for n in names)
    fs, path = hadoop_fs(spark, output.rstrip("/"))
    parent, prefix = path.getParent(), f"{path.getName()}.previous-"
    if parent is None or not fs.exists(parent):
        return []
    names = [s.getPath().getName() for s in fs.listStatus(parent)]
    return sorted(f"{output.rstrip('/')}{n[len(path.getName()):]}" for n in names if n.startswith(prefix))


def move(spark, source: str, target: str, is_table: bool) -> None:
    """Rename a table or folder; refuses a target that exists (Hadoop would move a folder into it).

    Raises:
        EmbedJobError: The target exists, or the file system refused the rename.
    """
    if exists(spark, target, is_table):
        raise EmbedJobError(f"cannot move {source} to {target}: {target} exists")
    if is_table:
        spark.sql(f"ALTER TABLE {source} RENAME TO {target}")
        return
    fs, path = hadoop_fs(spark, source)
    to = hadoop_fs(spark, target)[1]
    if not fs.rename(path, to):
        raise EmbedJobError(f"the file system refused to move {source} to {target} (rename returned false)")
    inside = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(to, path.getName())
    if fs.exists(inside):  # the target appeared after the check, and Hadoop moved the folder into it
        where = f"moved it back to {source}" if fs.rename(inside, path) else f"it is at {inside.toString()}"
        raise EmbedJobError(f"cannot move {source} to {target}: {target} appeared meanwhile (another writer?) and "
                            f"the file system put {source} inside it; {where}")


def exists(spark, location: str, is_table: bool) -> bool:
    """True where the table or folder is there."""
    if is_table:
        return spark.catalog.tableExists(location)
    fs, path = hadoop_fs(spark, location)
    return fs.exists(path)


def drop(spark, staging: str, is_table: bool) -> None:
    """Remove the staging (or previous) table or folder, where it is still there."""
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
