"""Spark job throughput vs in-process predict, on the same rows and model, in one run.

What a user times: the whole `clip-pyfunc embed-table` command, from its start to its exit, on a
small and a large table, in interleaved pairs. A command's time is taken as a fixed part plus a
per-row part; from each pair:

- marginal rate = (large - small rows) / (t(large) - t(small)), rows/s;
- fixed cost = t(small) - small rows / marginal rate, seconds (JVM, session, workers' start and
  imports, model loads, the write and the exit);
- marginal / in-process: the marginal rate over `predict` in this process on the same rows, in
  batches of the model's batch size after one warm-up batch, measured before and after the pairs
  (their mean).

The machine's matmul ceiling is measured before and after as well, so a slowed machine shows.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from clip_pyfunc.benchmarks.common import b64, machine_info, photo_jpeg


def _ours_vs_spark_udf(spark, model_uri: str, src: str, tmp: str, tasks: int) -> dict:
    """The same rows in `tasks` tasks: our per-worker cached model vs stock `mlflow.pyfunc.spark_udf`."""
    import mlflow
    from pyspark.sql.types import ArrayType, FloatType

    from clip_pyfunc.batch.spark import embed_dataframe

    df = spark.read.parquet(src).repartition(tasks)
    start = time.perf_counter()
    # An explicit (default-valued) model_config makes a fresh cache key: the workers load it here.
    ours, loads = embed_dataframe(df, model_uri, input_col="input", model_config={"fast_decode": True})
    ours.write.parquet(os.path.join(tmp, "ours.parquet"))
    ours_s = time.perf_counter() - start
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=ArrayType(FloatType()), env_manager="local")
    start = time.perf_counter()
    df.select("id", udf("input").alias("embedding")).write.parquet(os.path.join(tmp, "stock.parquet"))
    stock_s = time.perf_counter() - start
    return {"tasks": tasks, "ours_seconds": round(ours_s, 2), "ours_model_loads": loads.value,
            "spark_udf_seconds": round(stock_s, 2), "spark_udf_over_ours_time": round(stock_s / ours_s, 3)}


def _in_process_rate(model_uri: str, images: list[str]) -> tuple[float, int]:
    """rows/s of `predict` on `images` in batches of the model's batch size (after one warm-up batch), and
    that batch size."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    batch = model.unwrap_python_model().config.batch_size
    frame = pd.DataFrame({"input": images})
    model.predict(frame.iloc[:batch])
    start = time.perf_counter()
    for i in range(0, len(frame), batch):
        model.predict(frame.iloc[i : i + batch])
    return len(frame) / (time.perf_counter() - start), batch


def _command_seconds(model_uri: str, table: str, output: str, master: str) -> tuple[float, dict]:
    """Wall seconds of one `clip-pyfunc embed-table` command, start to exit, and its JSON report."""
    import json

    command = [sys.executable, "-m", "clip_pyfunc.cli", "embed-table", "--model-uri", model_uri, "--input", table,
               "--id-col", "id", "--input-col", "input", "--output", output, "--master", master]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"embed-table failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout)


def table_sizes(rows, pairs: int) -> tuple[int, int]:
    """The (small, large) table sizes of `rows`, checked with `pairs`.

    Raises:
        InvalidInput: Not two different sizes of 1 or more, or pairs under 1.
    """
    from clip_pyfunc.errors import InvalidInput

    small, large = sorted(rows)
    if small < 1 or large <= small or pairs < 1:
        raise InvalidInput(f"--rows must be two different sizes of 1 or more (got {list(rows)}), "
                           f"--pairs 1 or more (got {pairs})")
    return small, large


def run(model_uri: str, rows: tuple[int, int] = (128, 384), pairs: int = 3, master: str = "local[2]",
        width: int = 640, height: int = 480, tasks: int = 8, spark_udf: bool = False) -> dict:
    """Marginal rate and fixed cost of `embed-table` beside in-process predict (see the module docstring).

    Args:
        model_uri: A registered image model.
        rows: The small and the large table's rows (640x480 base64 JPEGs by default).
        pairs: Interleaved (small, large) command pairs; the medians are reported beside each pair.
        master: The Spark master of the commands.
        tasks: Tasks for the per-task reload comparison (with `spark_udf`).
        spark_udf: Also run the same rows through stock `mlflow.pyfunc.spark_udf` beside our job.

    Returns:
        A JSON-ready report.

    Raises:
        InvalidInput: As table_sizes.
    """
    import pandas as pd

    from clip_pyfunc.benchmarks.bench import matmul_gflops

    small, large = table_sizes(rows, pairs)
    images = [b64(photo_jpeg(width, height, seed=i % 16)) for i in range(large)]
    ceiling_before = matmul_gflops()
    before, batch = _in_process_rate(model_uri, images)
    report_pairs = []
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-bench-spark-") as tmp:
        tables = {}
        for n in (small, large):
            tables[n] = os.path.join(tmp, f"t{n}.parquet")
            pd.DataFrame({"id": range(n), "input": images[:n]}).to_parquet(tables[n])
        for i in range(pairs):
            seconds, reports = {}, {}
            for n in (small, large):
                seconds[n], reports[n] = _command_seconds(model_uri, tables[n], os.path.join(tmp, f"out-{i}-{n}"),
                                                          master)
            spread = seconds[large] - seconds[small]
            # The machine's noise can make the large command no slower than the small one: no rate then.
            marginal = (large - small) / spread if spread > 0 else None
            report_pairs.append({"seconds": {str(n): round(s, 2) for n, s in seconds.items()},
                                 "marginal_rows_per_s": round(marginal, 2) if marginal else None,
                                 "fixed_seconds": round(seconds[small] - small / marginal, 2) if marginal else None,
                                 "model_loads": {str(n): r["model_loads"] for n, r in reports.items()},
                                 "failed": sum(r["failed"] for r in reports.values())})
        after, _ = _in_process_rate(model_uri, images)
        in_process = (before + after) / 2
        for pair in report_pairs:
            rate = pair["marginal_rows_per_s"]
            pair["marginal_over_in_process"] = round(rate / in_process, 3) if rate else None
        udf = None
        if spark_udf:
            from clip_pyfunc.batch.spark import spark_session, stop_session

            spark = spark_session(master, batch_rows=batch)
            try:
                udf = _ours_vs_spark_udf(spark, model_uri, tables[large], tmp, tasks)
            finally:
                stop_session(spark)
    return {
        "benchmark": "spark",
        "model_uri": model_uri,
        "rows": [small, large],
        "image": f"{width}x{height} JPEG, base64",
        "master": master,
        "machine": machine_info(),
        "matmul_gflops": {"before": ceiling_before, "after": matmul_gflops()},
        "in_process": {"rows_per_s_before": round(before, 2), "rows_per_s_after": round(after, 2),
                       "rows_per_s": round(in_process, 2), "batch": batch},
        "pairs": report_pairs,
        "median": {key: statistics.median(values) if (values := [p[key] for p in report_pairs if p[key]]) else None
                   for key in ("marginal_rows_per_s", "marginal_over_in_process", "fixed_seconds")},
        "per_task_reload": udf,
    }
