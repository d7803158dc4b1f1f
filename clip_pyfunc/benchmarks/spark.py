"""Spark job throughput vs in-process predict, on the same rows and model, in one run."""

from __future__ import annotations

import os
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


def run(model_uri: str, rows: int = 128, master: str = "local[2]", width: int = 640, height: int = 480,
        tasks: int = 8) -> dict:
    """rows/s of `run_job` on `master` vs `predict` in this process (batch = the model's batch size),
    then the same rows in `tasks` tasks with our per-worker model cache vs stock spark_udf."""
    import mlflow
    import pandas as pd

    from clip_pyfunc.batch.spark import run_job, spark_session, stop_session

    images = [b64(photo_jpeg(width, height, seed=i % 16)) for i in range(rows)]
    frame = pd.DataFrame({"id": range(rows), "input": images})
    model = mlflow.pyfunc.load_model(model_uri)
    batch = model.unwrap_python_model().config.batch_size
    model.predict(frame.iloc[:2][["input"]])  # warm-up
    start = time.perf_counter()
    for i in range(0, rows, batch):
        model.predict(frame.iloc[i : i + batch][["input"]])
    local_s = time.perf_counter() - start
    del model

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.parquet")
        frame.to_parquet(src)
        spark = spark_session(master, batch_rows=batch)
        try:
            spark.read.parquet(src).count()  # JVM and first-job warm-up outside the timing
            start = time.perf_counter()
            report = run_job(spark, model_uri=model_uri, source=src, output=os.path.join(tmp, "out.parquet"),
                             id_col="id", input_col="input")
            spark_s = time.perf_counter() - start
            partitions = spark.read.parquet(src).rdd.getNumPartitions()
            reload = _ours_vs_spark_udf(spark, model_uri, src, tmp, tasks)
        finally:
            stop_session(spark)
    return {
        "benchmark": "spark",
        "model_uri": model_uri,
        "rows": rows,
        "image": f"{width}x{height} JPEG, base64",
        "machine": machine_info(),
        "in_process": {"seconds": round(local_s, 2), "rows_per_s": round(rows / local_s, 2), "batch": batch},
        "spark": {"master": master, "seconds": round(spark_s, 2), "rows_per_s": round(rows / spark_s, 2),
                  "input_partitions": partitions, "model_loads": report["model_loads"],
                  "failed": report["failed"]},
        "ratio_spark_over_in_process": round((rows / spark_s) / (rows / local_s), 3),
        "per_task_reload": reload,
    }
