"""Spark job throughput vs in-process predict, on the same rows and model, in one run."""

from __future__ import annotations

import os
import tempfile
import time

from clip_pyfunc.benchmarks.common import b64, machine_info, photo_jpeg


def run(model_uri: str, rows: int = 128, master: str = "local[2]", width: int = 640, height: int = 480) -> dict:
    """rows/s of `run_job` on `master` vs `predict` in this process (batch = the model's batch size)."""
    import mlflow
    import pandas as pd

    from clip_pyfunc.spark import run_job, spark_session

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
        finally:
            spark.stop()
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
    }
