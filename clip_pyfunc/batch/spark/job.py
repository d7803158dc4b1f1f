"""Batch-embed a table with a registered model: reader -> embed (pyfunc in mapInPandas) -> writer.

`run_job` chains the three (reader.read_input, embed.embed_dataframe, writer) in a session
from session.spark_session, and reports what it did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass

from clip_pyfunc.batch.spark.embed import ModelSource, embed_dataframe, prepare_model
from clip_pyfunc.batch.spark.reader import read_input
from clip_pyfunc.batch.spark.session import is_local
from clip_pyfunc.batch.spark.writer import (count_written, drop, looks_like_path, publish, restore_previous,
                                            staging_location)
from clip_pyfunc.errors import EmbedJobError
from clip_pyfunc.models.request import ERROR_COL


@dataclass(frozen=True, kw_only=True)
class JobCounts:
    """What a finished job reports."""

    rows: int
    embedded: int
    failed: int
    model_loads: int
    seconds: float


def run_job(spark, *, model_uri: str | ModelSource, source: str, output: str, id_col: str | None = None,
            input_col: str | None = None, input_format: str = "auto", fail_on_error: bool = False,
            normalize: bool | None = None, model_config: dict | None = None) -> dict:
    """Embed a table and publish the result only when the job succeeded.

    `model_uri` is a model URI or a ModelSource from prepare_model (the CLI prepares it while
    Spark starts). With a URI and a local master, the workers load the model from this disk:
    in place where the registry keeps it in a local folder, else from a copy downloaded once
    and removed at the end.

    The output is written to a staging location first, counted, then swapped in for the
    previous output (a re-run replaces it; a failed run leaves the old output untouched and
    no partial output behind). The swap (writer.publish) moves the previous output aside
    until the new one is in place; where it fails, the error names where each copy is, and the
    staging copy is kept. A previous output that a killed swap left aside while `output` is
    missing is moved back first.

    Returns:
        A JSON-ready report: rows, embedded, failed, model loads, seconds, rows/s, output.

    Raises:
        EmbedJobError: Bad arguments, bad rows with `fail_on_error`, or a failed swap (its
            message names where the new output and the previous one are kept).
    """
    from pyspark.sql import functions as F

    start = time.perf_counter()
    local = is_local(spark.sparkContext.master)
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-model-") as copy_dir:
        model = model_uri if isinstance(model_uri, ModelSource) else prepare_model(
            model_uri, copy_dir if local else None)
        if not local and model.load_from != model.uri:  # a driver-side copy is not on the executors' disks
            model = dataclasses.replace(model, load_from=model.uri, checked=False)
        df, id_col, input_col = read_input(spark, source, input_format, id_col, input_col)
        embedded, loads = embed_dataframe(df, model, input_col=input_col, normalize=normalize,
                                          model_config=model_config)
        is_table = not looks_like_path(output)
        restore_previous(spark, output, is_table)  # what a publish killed mid-swap left aside
        staging = staging_location(output, is_table)
        try:
            if is_table:
                embedded.write.mode("error").saveAsTable(staging)
            else:
                embedded.write.mode("error").parquet(staging)
            rows, failed = count_written(spark, staging, is_table)
            counts = JobCounts(rows=rows, embedded=rows - failed, failed=failed,
                               model_loads=loads.value, seconds=round(time.perf_counter() - start, 2))
            if fail_on_error and counts.failed:
                written = spark.table(staging) if is_table else spark.read.parquet(staging)
                examples = [f"{r[id_col]}: {r[ERROR_COL]}" for r in written.where(F.col(ERROR_COL).isNotNull())
                            .select(id_col, ERROR_COL).limit(5).collect()]
                raise EmbedJobError(f"{counts.failed} of {counts.rows} rows failed (--fail-on-error); "
                                    f"nothing was written. First: {examples}")
        except BaseException:
            drop(spark, staging, is_table)
            raise
        publish(spark, staging, output, is_table)  # a failed swap keeps the staging copy and names it
    report = dict(counts.__dict__, output=output, model_uri=model.requested, model_version_uri=model.uri,
                  master=spark.sparkContext.master,
                  rows_per_s=round(counts.rows / counts.seconds, 2) if counts.seconds else None)
    print(f"clip-pyfunc embed-table: {counts.rows} rows, {counts.embedded} embedded, {counts.failed} failed, "
          f"model loaded {counts.model_loads}x, {counts.seconds}s", file=sys.stderr, flush=True)
    return report


def embed_table(model_uri: str, source: str, output: str, *, master: str | None = None, id_col: str | None = None,
                input_col: str | None = None, input_format: str = "auto", fail_on_error: bool = False,
                model_config: dict | None = None, arrow_batch_rows: int = 64) -> dict:
    """`clip-pyfunc embed-table`: start a Spark session, embed `source` into `output` (`run_job`), stop it.

    While the JVM starts, a local job's model is found on (or copied to) the local disk, once for
    every worker, and the worker daemon is told whether the model needs torch (_prepare_and_plan).

    Args:
        model_uri: The registered model (checked by the caller: registry.lookup.model_info).
        source: A parquet path, a folder of images or a table name.
        output: A parquet path or a table name.
        master: Spark master URL (None: spark-submit's, else local[*]).
        arrow_batch_rows: Rows per Arrow batch sent to Python.
        id_col, input_col, input_format, fail_on_error, model_config: As `run_job`.

    Returns:
        `run_job`'s report.

    Raises:
        EmbedJobError: A local input path that does not exist, no such table or path as Spark reads it, or as
            `run_job`.
    """
    import os
    import re
    from concurrent.futures import ThreadPoolExecutor

    from pyspark.errors import AnalysisException

    from clip_pyfunc.batch.spark.session import planned_master, spark_session, stop_session

    # Only a local job reads this machine's disk; a scheme (dbfs:, s3://) or a cluster's default file
    # system is Spark's to resolve, and its AnalysisException below names what is missing.
    looks_like_file = "/" in source or source.endswith(".parquet")  # table names have neither
    has_scheme = re.match(r"^[A-Za-z][\w+.-]*:", source) is not None
    local = is_local(planned_master(master))
    if input_format != "table" and looks_like_file and not has_scheme and local and not os.path.exists(source):
        raise EmbedJobError(f"--input {source}: no such file or folder; give a parquet path, a folder of "
                            "images or a table name")
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-model-") as copy_dir, ThreadPoolExecutor(1) as pool:
        plan = os.path.join(copy_dir, "worker-plan.json") if local else None
        model = pool.submit(_prepare_and_plan, model_uri, copy_dir, plan, model_config)
        spark = spark_session(master, batch_rows=arrow_batch_rows, worker_plan=plan)
        try:
            return run_job(spark, model_uri=model.result() or model_uri, source=source, output=output,
                           id_col=id_col, input_col=input_col, input_format=input_format,
                           fail_on_error=fail_on_error, model_config=model_config)
        except AnalysisException as e:  # no such table or path, as Spark reads it
            reason = " ".join(str(e).split())
            raise EmbedJobError(f"--input {source} / --output {output}: {reason[:300]}") from e
        finally:
            stop_session(spark)


def _prepare_and_plan(model_uri: str, copy_dir: str, plan: str | None, model_config: dict | None) -> ModelSource | None:
    """embed_table's work beside the JVM's start, for a local job (`plan` set): give the workers the
    model on this disk (prepare_model into `copy_dir`) and write the worker daemon's plan
    (daemon.write_plan). Returns the ModelSource, or None for a job on a cluster.

    The plan is what the model's towers need (embed.worker_modules). A model that must be downloaded
    gets daemon.TORCH_STACK at once, before its download (the plan needs the model's files), so the
    daemon imports torch beside the download as it did before plans; the exact plan replaces it
    once the model is here, in case the daemon has not read it yet. A failed preparation writes an
    empty plan (the job fails before any worker needs torch), so the daemon never waits for it.
    Each plan replaces the last whole (write_plan), and the daemon reads it once.
    """
    from clip_pyfunc.batch.spark.daemon import TORCH_STACK, write_plan
    from clip_pyfunc.batch.spark.embed import worker_modules

    if plan is None:
        return None
    try:
        source = prepare_model(model_uri, copy_dir, before_download=lambda: write_plan(plan, TORCH_STACK))
        write_plan(plan, worker_modules(source, model_config))
        return source
    except BaseException:
        with contextlib.suppress(OSError):  # the preparation's own error is the one to report
            write_plan(plan, ())
        raise
