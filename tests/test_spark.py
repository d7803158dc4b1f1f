"""Batch embedding on real local Spark (local[2]) with the registered tiny models."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import b64, encode, photo
from clip_pyfunc.batch.spark import embed_dataframe, prepare_model, run_job
from clip_pyfunc.batch.spark.classes import _java_binary, class_archive_options
from clip_pyfunc.batch.spark.daemon import TORCH_STACK, read_plan, write_plan
from clip_pyfunc.batch.spark.embed import worker_modules
from clip_pyfunc.batch.spark.session import (DAEMON_KEY, DAEMON_MODULE, PLAN_ENV, is_local, local_quick_start,
                                             worker_threads)
from clip_pyfunc.errors import EmbedJobError
from clip_pyfunc.registry.lookup import local_artifacts
from clip_pyfunc.settings import load_settings

pytestmark = [pytest.mark.spark]


def _varied_images(n: int = 50):
    fmts = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]
    out = []
    for i in range(n):
        img = photo(20 + 7 * i, 15 + 5 * (i % 9), seed=i)
        if i % 5 == 1:
            img = img.convert("L")
        out.append(encode(img, fmts[i % len(fmts)]))
    return out


BAD_ROWS = {7: "%%% not base64", 19: b64(b"definitely not an image"), 33: None, 44: ""}


@pytest.fixture(scope="module")
def image_table(tmp_path_factory):
    images = [b64(x) for x in _varied_images()]
    for row, value in BAD_ROWS.items():
        images[row] = value
    path = str(tmp_path_factory.mktemp("tables") / "products.parquet")
    pd.DataFrame({"product_id": [f"p{i:03d}" for i in range(len(images))], "image_b64": images}).to_parquet(path)
    return path, images


def _read(spark, path):
    return spark.read.parquet(path).toPandas().sort_values(spark.read.parquet(path).columns[0]).reset_index(drop=True)


def test_parquet_table_equals_local_predict_with_error_rows(spark, image_table, image_model, registered, tmp_path):
    path, images = image_table
    out_path = str(tmp_path / "emb.parquet")
    report = run_job(spark, model_uri=registered["models"]["image"]["uri"], source=path, output=out_path,
                     id_col="product_id", input_col="image_b64")
    assert (report["rows"], report["embedded"], report["failed"]) == (50, 46, 4)
    out = _read(spark, out_path)
    assert list(out.columns) == ["product_id", "embedding", "error"]
    assert list(out["product_id"]) == [f"p{i:03d}" for i in range(50)]  # one row per input, keyed
    good = [i for i in range(50) if i not in BAD_ROWS]
    want = image_model.predict(pd.DataFrame({"input": [images[i] for i in good]}))
    got = np.stack([np.asarray(out["embedding"][i], dtype=np.float32) for i in good])
    assert np.abs(got - want).max() <= 1e-6
    for row in BAD_ROWS:
        assert out["embedding"][row] is None and isinstance(out["error"][row], str)
    assert "invalid base64" in out["error"][7] and "not an image" in out["error"][19]
    assert "null" in out["error"][33] and "empty" in out["error"][44]
    assert out["error"][good].isna().all()


def test_stock_spark_udf_with_a_positional_column(spark, image_table, image_model, text_model, registered):
    """MLflow's own spark_udf, as the guides call it: a positional column of another name."""
    import mlflow
    from pyspark.sql.functions import col

    path, images = image_table
    good = [i for i in range(len(images)) if i not in BAD_ROWS]
    df = (spark.read.parquet(path).withColumnRenamed("image_b64", "image_base64")
          .where(~col("product_id").isin([f"p{i:03d}" for i in BAD_ROWS])))
    udf = mlflow.pyfunc.spark_udf(spark, registered["models"]["image"]["uri"], env_manager="local")
    out = df.withColumn("embedding", udf(col("image_base64"))).toPandas().sort_values("product_id")
    want = image_model.predict([images[i] for i in good])
    assert np.abs(np.stack(out["embedding"].to_list()) - want).max() <= 1e-6
    texts = ["a red bicycle", "", "ünï"]
    text_udf = mlflow.pyfunc.spark_udf(spark, registered["models"]["text"]["uri"], env_manager="local")
    got = spark.createDataFrame(pd.DataFrame({"k": range(3), "caption": texts})).select(
        "k", text_udf("caption").alias("e")).toPandas().sort_values("k")
    assert np.abs(np.stack(got["e"].to_list()) - text_model.predict(texts)).max() <= 1e-6


def test_stock_spark_udf_takes_spark_default_batches_of_10000_rows(spark, registered, text_model):
    """The guide's call on Spark's default Arrow batches (10,000 rows): 12,000 texts in one partition
    must all come back, although a served request is limited to max_rows (1024)."""
    import mlflow

    texts = [f"a photo of item {i}" for i in range(12_000)]
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(key)
    spark.conf.unset(key)  # Spark's default
    try:
        assert int(spark.conf.get(key)) == 10_000
        udf = mlflow.pyfunc.spark_udf(spark, registered["models"]["text"]["uri"], result_type="array<float>")
        frame = spark.createDataFrame(pd.DataFrame({"k": range(len(texts)), "input": texts})).coalesce(1)
        got = frame.select("k", udf("input").alias("e")).toPandas().sort_values("k")
    finally:
        spark.conf.set(key, previous)
    assert len(got) == 12_000 and got["e"].notna().all()
    sample = [0, 1023, 1024, 9_999, 10_000, 11_999]
    assert np.abs(np.stack(got["e"].iloc[sample].to_list()) - text_model.predict([texts[i] for i in sample])).max() <= 1e-6


def test_model_loads_once_per_worker_not_per_task(spark, image_table, registered):
    path, _ = image_table
    df = spark.read.parquet(path).repartition(8)  # 8 tasks on 2 worker slots
    # A model_config no other test uses: a fresh cache key, so the workers must load it here.
    embedded, loads = embed_dataframe(df, registered["models"]["image"]["uri"], input_col="image_b64",
                                      model_config={"batch_size": 7})
    assert embedded.count() == 50
    assert embedded.rdd.getNumPartitions() == 8
    assert 1 <= loads.value <= 2, loads.value
    assert worker_threads(spark) == max(1, (os.cpu_count() or 1) // 2)


def test_image_directory_via_binary_file(spark, registered, image_model, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    raw = _varied_images(6)
    for i, data in enumerate(raw):
        (folder / ("sub" if i % 2 else "") / f"img{i}.bin").write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    report = run_job(spark, model_uri=registered["models"]["image"]["uri"], source=str(folder),
                     output=str(tmp_path / "dir.parquet"))
    assert (report["rows"], report["failed"]) == (7, 1)
    out = spark.read.parquet(str(tmp_path / "dir.parquet")).toPandas().set_index("path")
    for i, data in enumerate(raw):
        key = next(p for p in out.index if p.endswith(f"/img{i}.bin"))
        want = image_model.predict(pd.DataFrame({"input": [data]}))[0]
        assert np.abs(np.asarray(out.loc[key, "embedding"]) - want).max() <= 1e-6
    assert "not an image" in out.loc[next(p for p in out.index if p.endswith("notes.txt")), "error"]


def test_text_table_and_table_output(spark, registered, text_model, tmp_path):
    texts = ["a red bicycle", "", "ünïcödé ✓", None, "a very long caption " * 40]
    spark.createDataFrame(pd.DataFrame({"id": range(5), "caption": texts})).write.parquet(str(tmp_path / "t.parquet"))
    report = run_job(spark, model_uri=registered["models"]["text"]["uri"], source=str(tmp_path / "t.parquet"),
                     output="caption_embeddings", id_col="id", input_col="caption")
    assert (report["rows"], report["failed"]) == (5, 1)
    out = spark.table("caption_embeddings").toPandas().sort_values("id").reset_index(drop=True)
    good = [0, 1, 2, 4]
    want = text_model.predict(pd.DataFrame({"input": [texts[i] for i in good]}))
    assert np.abs(np.stack([out["embedding"][i] for i in good]) - want).max() <= 1e-6
    assert "null" in out["error"][3]
    assert not [t for t in spark.catalog.listTables() if "staging" in t.name]


def test_rerun_replaces_and_failed_run_leaves_old_output(spark, image_table, registered, tmp_path):
    path, _ = image_table
    out_path = str(tmp_path / "emb.parquet")
    kw = dict(model_uri=registered["models"]["image"]["uri"], source=path, output=out_path,
              id_col="product_id", input_col="image_b64")
    run_job(spark, **kw)
    run_job(spark, **kw)
    assert spark.read.parquet(out_path).count() == 50  # replaced, not appended
    before = sorted(os.listdir(out_path))
    with pytest.raises(EmbedJobError, match=r"4 of 50 rows failed \(--fail-on-error\); nothing was written"):
        run_job(spark, fail_on_error=True, **kw)
    assert sorted(os.listdir(out_path)) == before
    assert not glob.glob(out_path + ".staging-*")
    fresh = str(tmp_path / "never.parquet")
    with pytest.raises(EmbedJobError):
        run_job(spark, fail_on_error=True, **dict(kw, output=fresh))
    assert not os.path.exists(fresh) and not glob.glob(fresh + ".staging-*")


def test_bad_arguments_are_named(spark, image_table, registered, tmp_path):
    path, _ = image_table
    with pytest.raises(EmbedJobError, match=r"column 'pic' not in"):
        run_job(spark, model_uri=registered["models"]["image"]["uri"], source=path, output=str(tmp_path / "o"),
                id_col="product_id", input_col="pic")


@pytest.mark.slow
def test_cli_embed_table(image_table, registered, tmp_path):
    path, _ = image_table
    out = subprocess.run(
        ["clip-pyfunc", "embed-table", "--model-uri", registered["models"]["image"]["uri"], "--input", path,
         "--input-col", "image_b64", "--id-col", "product_id", "--output", str(tmp_path / "cli.parquet"),
         "--master", "local[2]"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert (report["rows"], report["embedded"], report["failed"]) == (50, 46, 4)
    fail = subprocess.run(
        ["clip-pyfunc", "embed-table", "--model-uri", registered["models"]["image"]["uri"], "--input", path,
         "--input-col", "image_b64", "--id-col", "product_id", "--output", str(tmp_path / "cli2.parquet"),
         "--master", "local[2]", "--fail-on-error"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert fail.returncode == 2 and "rows failed (--fail-on-error)" in fail.stderr
    # Refused before the job, while the worker daemon still starts: a clear error, and no
    # crashed-worker report from stopping the session under it.
    bad = subprocess.run(
        ["clip-pyfunc", "embed-table", "--model-uri", registered["models"]["image"]["uri"], "--input", path,
         "--input-col", "no_such_col", "--id-col", "product_id", "--output", str(tmp_path / "cli3.parquet"),
         "--master", "local[2]"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert bad.returncode == 2 and "column 'no_such_col' not in" in bad.stderr and bad.stdout == ""
    assert "Python worker exited unexpectedly" not in bad.stderr, bad.stderr[-3000:]


@pytest.mark.slow
def test_spark_notebook(registered, tiny_checkpoint, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CLIP_WORKDIR", str(tmp_path))
    path = os.path.join(os.path.dirname(__file__), "..", "notebooks", "04_batch_embed_with_spark.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert "'rows': 8" in str(nb.cells[3].outputs) and "'failed': 2" in str(nb.cells[3].outputs)
    assert "score" in str(nb.cells[5].outputs)


@pytest.mark.slow
def test_mlproject_embed_table_entry_point(image_table, registered, tmp_path):
    path, _ = image_table
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run(
        ["mlflow", "run", root, "-e", "embed_table", "--env-manager", "local", "--experiment-name", "clip-pyfunc",
         "-P", f"model_uri={registered['models']['image']['uri']}", "-P", f"input={path}",
         "-P", f"output={tmp_path / 'project.parquet'}", "-P", "input_col=image_b64", "-P", "id_col=product_id",
         "-P", "master=local[2]"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"},  # set by earlier runs
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"failed": 4' in out.stdout


@pytest.mark.slow
def test_spark_submit_runs_the_same_job_on_the_submitted_master(image_table, registered, tmp_path):
    """spark-submit of the job's entry file gives the same report as the job in process, and under spark-submit
    the JVM holds the submitted settings: the job runs on the submitted master (not local[*]), and the report
    says which. (One spark-submit for both, where two tests each started their own.)"""
    import sys

    path, _ = image_table
    script = os.path.join(os.path.dirname(__file__), "..", "clip_pyfunc", "cli", "spark_submit.py")
    out = subprocess.run(
        ["spark-submit", "--master", "local[1]", "--conf", f"spark.pyspark.python={sys.executable}", script,
         "--model-uri", registered["models"]["image"]["uri"], "--input", path, "--input-col", "image_b64",
         "--id-col", "product_id", "--output", str(tmp_path / "submitted.parquet")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # spark-submit's PythonRunner merges the script's stderr into its stdout: the report comes last.
    report = json.loads(out.stdout[out.stdout.rindex("\n{") :])
    assert (report["rows"], report["embedded"], report["failed"]) == (50, 46, 4)
    assert report["master"] == "local[1]"
    assert report["model_uri"] == registered["models"]["image"]["uri"]  # as given; the pinned version beside it
    assert report["model_version_uri"].rsplit("/", 1)[-1].isdigit()


@pytest.mark.parametrize("tower", ["text", "image"])
def test_every_family_through_the_spark_job(spark, registered_families, tower, tmp_path):
    """The Spark job gives each family's local vectors, one table per family and tower."""
    import mlflow

    rows = (["a photo of a cat", "A PHOTO of a DOG", "", None] if tower == "text"
            else [b64(encode(photo(60 + 10 * i, 45, i), "JPEG")) for i in range(3)] + ["%%% not base64"])
    source = str(tmp_path / "in.parquet")
    pd.DataFrame({"id": range(len(rows)), "value": rows}).to_parquet(source)
    for name, summary in sorted(registered_families.items()):
        uri = summary["models"][tower]["uri"]
        out = str(tmp_path / f"{name}.parquet")
        report = run_job(spark, model_uri=uri, source=source, output=out, id_col="id", input_col="value")
        assert (report["rows"], report["failed"]) == (4, 1), name
        got = spark.read.parquet(out).toPandas().sort_values("id").reset_index(drop=True)
        want = mlflow.pyfunc.load_model(uri).predict(rows[:3])
        assert np.abs(np.stack(got["embedding"][:3].to_list()) - want).max() <= 1e-6, name
        assert got["embedding"][3] is None and isinstance(got["error"][3], str)


def test_local_job_loads_the_model_from_the_local_disk(spark, registered, tmp_path):
    # Local workers share the driver's disk: a registry whose artifacts are a local folder is
    # read in place (nothing is copied), its requirements checked once, and that folder is what
    # the workers load. Other stores are downloaded into the copy directory.
    import mlflow

    source = prepare_model(registered["models"]["image"]["uri"], str(tmp_path / "copy"))
    artifacts = mlflow.get_experiment_by_name(load_settings().registry.experiment).artifact_location
    assert source.checked and os.path.realpath(source.load_from).startswith(os.path.realpath(artifacts))
    assert os.path.exists(os.path.join(source.load_from, "MLmodel"))
    assert not (tmp_path / "copy").exists() or not os.listdir(tmp_path / "copy")
    assert local_artifacts(f"file://{source.load_from}") == source.load_from
    assert local_artifacts(os.path.relpath(source.load_from)) == source.load_from  # absolute, for the workers
    assert local_artifacts("s3://bucket/model") is None and local_artifacts(str(tmp_path / "nothing")) is None
    assert local_artifacts("models:/no_such_model/1") is None  # the registry's error: download as before
    assert source.uri.rsplit("/", 1)[-1].isdigit()  # the alias was pinned to a version
    assert [f.name for f in source.fields] == ["embedding"]
    df = spark.createDataFrame(pd.DataFrame({"id": ["a", "b"], "input": [b64(encode(photo(40, 30), "JPEG"))] * 2}))
    out, _ = embed_dataframe(df, source)
    rows = out.orderBy("id").collect()
    assert [r["error"] for r in rows] == [None, None] and len(rows[0]["embedding"]) == len(rows[1]["embedding"])
    remote = prepare_model(registered["models"]["image"]["uri"])  # workers on other machines load from the registry
    assert not remote.checked and remote.load_from == remote.uri == source.uri


def test_local_masters_are_recognised():
    assert all(is_local(m) for m in ("local", "local[2]", "local[*]", "local[2,3]"))
    assert not any(is_local(m) for m in ("spark://h:7077", "yarn", "k8s://https://h", "localhost"))


def test_local_workers_fork_from_one_preloading_daemon(spark):
    # The early one-task RDD job and the SQL engine's mapInPandas tasks must share one daemon,
    # and it must be ours: Spark keeps a daemon per worker environment, so a mismatch would
    # start a second one (and import everything again) for the real job.
    def rdd_parent(_):
        yield os.getppid(), open(f"/proc/{os.getppid()}/cmdline", "rb").read().split(b"\0")[:3], "torch" in sys.modules

    def sql_parent(batches):
        for _ in batches:
            pass
        yield pd.DataFrame({"ppid": [os.getppid()]})

    assert spark.sparkContext.getConf().get(DAEMON_KEY) == DAEMON_MODULE
    (rdd_ppid, cmdline, torch_loaded), = spark.sparkContext.parallelize([0], 1).mapPartitions(rdd_parent).collect()
    sql_ppid, = [r.ppid for r in spark.range(1, numPartitions=1).mapInPandas(sql_parent, "ppid long").collect()]
    assert cmdline[1:] == [b"-m", DAEMON_MODULE.encode()] and sql_ppid == rdd_ppid and torch_loaded


def test_daemon_preloads_and_keeps_stdout_for_the_port(tmp_path):
    # Spark reads the daemon's port from its stdout: imports that print must not reach it.
    (tmp_path / "noisy_module.py").write_text("print('printed at import')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # Fork safety: the imports start no Python thread and touch no CUDA device.
    code = ("import sys, threading; from clip_pyfunc.batch.spark import daemon as d; "
            "failed = d.preload(d.PRELOAD + ('noisy_module', 'no_such_module')); import torch; "
            "assert threading.active_count() == 1 and not torch.cuda.is_initialized(); "
            "sys.stderr.write(repr([m for m in d.PRELOAD if m not in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout == "", (out.stdout, out.stderr[-2000:])
    assert "printed at import" in out.stderr and "could not preload no_such_module" in out.stderr
    assert out.stderr.rstrip().endswith("[]")  # every module of PRELOAD was imported
    # Started as Spark starts it, the first bytes on stdout are the port; it exits when stdin
    # closes, with pyspark's daemon's own status (1: its `finally` exits again after exit(0)).
    daemon = subprocess.Popen([sys.executable, "-m", DAEMON_MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env)
    try:
        port = int.from_bytes(daemon.stdout.read(4), "big")
        daemon.stdin.close()
        assert 0 < port < 65536 and daemon.wait(timeout=60) == 1
    finally:
        daemon.kill()


def _daemon_maps_torch(env: dict) -> bool:
    """Start our daemon as Spark does, read its port, and tell whether torch's library is mapped in it."""
    import select

    daemon = subprocess.Popen([sys.executable, "-m", DAEMON_MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env)
    try:
        assert select.select([daemon.stdout], [], [], 120)[0], "the daemon printed no port in 120 s"
        assert 0 < int.from_bytes(daemon.stdout.read(4), "big") < 65536  # the port: its imports are done
        with open(f"/proc/{daemon.pid}/maps", encoding="utf-8") as f:  # Linux, as CI
            return "libtorch" in f.read()
    finally:
        daemon.kill()
        daemon.communicate()


def test_daemon_imports_torch_only_where_the_plan_or_its_absence_says_so(tmp_path):
    # A local job's driver writes what its model needs beyond BASE; the daemon forks workers
    # only after it has read that plan, so a torch-free model's workers start without torch.
    plan = str(tmp_path / "plan.json")
    env = {**os.environ, PLAN_ENV: plan}
    write_plan(plan, ())
    assert not _daemon_maps_torch(env)
    write_plan(plan, TORCH_STACK)
    assert _daemon_maps_torch(env)
    env.pop(PLAN_ENV)
    assert _daemon_maps_torch(env)  # no plan (a session started by hand): any model may need torch
    # A plan that never comes or cannot be read: every model's needs, said on stderr.
    assert read_plan(str(tmp_path / "never.json"), wait_s=0.05) == TORCH_STACK
    (tmp_path / "bad.json").write_text("{not json")
    assert read_plan(str(tmp_path / "bad.json")) == TORCH_STACK
    assert read_plan(plan) == TORCH_STACK and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_worker_plan_adds_torch_only_where_a_tower_runs_on_torch(registered, tmp_path):
    # The plan comes from the model's towers as load_context would load them here.
    source = prepare_model(registered["models"]["image"]["uri"], str(tmp_path / "copy"))
    assert worker_modules(source, {"engine": "auto", "precision": "fp32"}) == ()
    assert worker_modules(source, {"engine": "openvino", "precision": "fp32"}) == ()
    assert worker_modules(source) == TORCH_STACK  # the tests' settings log engine "torch"
    text = prepare_model(registered["models"]["text"]["uri"], str(tmp_path / "text"))
    assert worker_modules(text, {"engine": "auto", "precision": "fp32"}) == ()
    # Not readable here (a remote URI, a config no tower runs): the daemon imports what any model may need.
    assert worker_modules(prepare_model(registered["models"]["image"]["uri"])) == TORCH_STACK
    assert worker_modules(source, {"engine": "auto", "precision": "fp16"}) == TORCH_STACK


def test_class_archive_is_recorded_then_checked_then_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    java = _java_binary()
    first = class_archive_options()
    archive = first.split("-XX:ArchiveClassesAtExit=", 1)[1].split()[0]
    assert archive.startswith(str(tmp_path / "cache" / "clip-pyfunc" / "spark-cds")) and not os.path.exists(archive)
    assert class_archive_options() == ""  # claimed, and its JVM has not written it yet: no second recorder
    recorder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", first])  # that flag on a command line
    try:
        for _ in range(100):  # until its exec has finished and the command line shows
            with open(f"/proc/{recorder.pid}/cmdline", "rb") as f:
                if f.read():
                    break
            time.sleep(0.05)
        os.utime(archive + ".recording", (time.time() - 600, time.time() - 600))
        assert class_archive_options() == ""  # however old the claim, while that process runs
    finally:
        recorder.kill()
        recorder.wait()
    assert class_archive_options() == first  # an old claim with no recorder and no file is void
    # A real archive (of what `java -version` loads), cut short: the JVM aborts on it rather
    # than running without it, so it is removed and recorded again.
    subprocess.run([java, f"-XX:ArchiveClassesAtExit={tmp_path / 'whole.jsa'}", "-Xlog:cds*=off", "-version"],
                   capture_output=True, check=True, timeout=120)
    with open(tmp_path / "whole.jsa", "rb") as f, open(archive, "wb") as out:
        out.write(f.read(4096))
    assert class_archive_options() == first and not os.path.exists(archive)
    with open(tmp_path / "whole.jsa", "rb") as f, open(archive, "wb") as out:
        out.write(f.read())
    assert class_archive_options() == f"-XX:SharedArchiveFile={archive} -Xlog:cds*=off"
    assert not os.path.exists(archive + ".recording")  # done: the marker is cleared
    assert os.path.exists(archive + ".ok")  # checked once; the next session skips the check
    assert [n for n in os.listdir(os.path.dirname(archive)) if n.startswith("probe-")] == []
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java"))
    assert class_archive_options() == ""


def test_no_recording_on_a_jdk_that_cannot(tmp_path, monkeypatch):
    # A JDK without a base archive refuses to start with -XX:ArchiveClassesAtExit; stand one
    # in with a `java` that passes its arguments on, plus -Xshare:off, to the real one.
    fake = tmp_path / "jdk" / "bin" / "java"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\nexec "{_java_binary()}" -Xshare:off "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert class_archive_options() == ""


def test_no_recording_where_the_class_path_holds_a_folder_with_files(tmp_path, monkeypatch):
    # The JVM refuses to write an archive then, at exit, and says so on its stdout.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "conf").mkdir()
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path / "conf"))
    assert "ArchiveClassesAtExit" in class_archive_options()  # an empty folder is fine
    os.remove(next((tmp_path / "cache").rglob("*.recording")))  # that claim would refuse the next two
    (tmp_path / "conf" / "log4j2.properties").write_text("rootLogger.level = warn\n")
    assert class_archive_options() == ""
    os.remove(tmp_path / "conf" / "log4j2.properties")
    assert class_archive_options({"spark.driver.extraClassPath": str(tmp_path)}) == ""
    assert not list((tmp_path / "cache").rglob("*.recording"))


def test_own_java_options_leave_the_archive_alone(tmp_path, monkeypatch):
    from pyspark import SparkContext

    monkeypatch.setattr(SparkContext, "_gateway", None)  # as before this process's first session
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert "ArchiveClassesAtExit" in local_quick_start()["spark.driver.extraJavaOptions"]
    os.remove(next((tmp_path / "cache").rglob("*.recording")))
    settings = local_quick_start({"spark.driver.extraJavaOptions": "-Xss4m", "spark.ui.enabled": "true"})
    assert settings == {DAEMON_KEY: DAEMON_MODULE}
    assert not list((tmp_path / "cache").rglob("*.recording"))  # nothing probed, nothing claimed
