"""Batch-embed Spark tables with a registered model: reader -> embed (pyfunc in a pandas UDF) -> writer.

The registered pyfunc model runs inside `mapInPandas`: loaded at most once per Python worker
process (cached in this module, counted with an accumulator), fed Arrow batches of a bounded
number of rows, with torch threads set so that concurrent workers x threads <= cores. Every
input row gives exactly one output row: the id columns, the embedding, or a null embedding
and an `error` saying what was wrong with that row.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
import dataclasses
from dataclasses import dataclass

from clip_pyfunc.errors import ClipPyfuncError, InvalidInput

EMBEDDING_COL, ERROR_COL = "embedding", "error"
INPUT_FORMATS = ("auto", "parquet", "images", "table")
_WORKER_MODELS: dict[str, object] = {}  # per Python worker process: config key -> loaded model
_STARTING: list = []  # driver: threads running the job that starts a session's worker daemon


class EmbedJobError(ClipPyfuncError):
    """The batch job refused to publish its output (bad rows with --fail-on-error, bad arguments)."""


@dataclass(frozen=True, kw_only=True)
class JobCounts:
    """What a finished job reports."""

    rows: int
    embedded: int
    failed: int
    model_loads: int
    seconds: float


# A local job's JVM lives for one command and mostly moves Arrow batches. It starts sooner with
# the C1 compiler only, no web UI, and the classes it loads mapped from an archive
# (class_archive_options). Its Python workers fork from a daemon that has imported torch,
# transformers and MLflow (spark_daemon), which starts while the JVM still sets up the
# session (_start_workers). None of it is applied where spark-defaults.conf or the caller's
# conf sets the same key, nor under spark-submit.
JVM_QUICK_START = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"
DAEMON_KEY, DAEMON_MODULE = "spark.python.daemon.module", "clip_pyfunc.spark_daemon"
# Spark keeps one daemon per worker environment, and its SQL engine adds this variable to the
# environment of its Python workers: the RDD job that starts the daemon early must carry it too.
SQL_WORKER_ENV = {"spark.executorEnv.SPARK_SIMPLIFIED_TRACEBACK": "1"}
CLAIM_S = 120  # a claim to record the class archive whose JVM has not shown by then is void
RECORDING_WAIT_S = 1800  # the same, where the process table cannot be read


def local_quick_start(conf: dict[str, str] | None = None) -> dict[str, str]:
    """The settings a local session outside spark-submit gets (see spark_session), less the
    keys that `conf` or the installation's spark-defaults.conf sets."""
    conf = conf or {}
    keep = [k for k in (JAVA_OPTIONS_KEY, "spark.ui.enabled", DAEMON_KEY) if k not in conf and not _site_sets(k)]
    settings = {"spark.ui.enabled": "false", DAEMON_KEY: DAEMON_MODULE}
    if JAVA_OPTIONS_KEY in keep:  # only then does the archive matter: recording is not free
        from pyspark import SparkContext

        archive = class_archive_options(conf) if SparkContext._gateway is None else ""  # a JVM runs already
        settings[JAVA_OPTIONS_KEY] = f"{JVM_QUICK_START} {archive}".strip()
    return {k: v for k, v in settings.items() if k in keep}


def spark_session(master: str | None = None, app_name: str = "clip-pyfunc", batch_rows: int = 64,
                  conf: dict[str, str] | None = None, start_workers: bool = True):
    """Get or create the session; `master` None keeps spark-submit's, else local[*].

    Arrow batches are capped at `batch_rows` rows (Spark's default is 10,000, which for
    images means gigabytes per batch). `conf` adds settings (e.g. spark.sql.warehouse.dir).
    A local master outside spark-submit also gets local_quick_start(), key by key, where
    neither `conf` nor the installation's spark-defaults.conf sets that key. With
    `start_workers`, its Python worker daemon starts at once, in the background: for
    sessions that will run Python tasks; stop them with stop_session.
    """
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    planned = planned_master(master)
    settings = {"spark.sql.execution.arrow.pyspark.enabled": "true", "spark.python.worker.reuse": "true",
                "spark.ui.showConsoleProgress": "true"}
    if is_local(planned) and not _submitted():  # spark-submit started the JVM with its own options
        settings.update(local_quick_start(conf))
    settings.update(conf or {})
    early = (start_workers and settings.get(DAEMON_KEY) == DAEMON_MODULE and SparkContext._active_spark_context is None
             and settings.get("spark.sql.execution.pyspark.udf.simplifiedTraceback.enabled", "true") != "false")
    if early:
        for k, v in SQL_WORKER_ENV.items():
            settings.setdefault(k, v)
        _start_workers(planned, app_name, settings)
    builder = SparkSession.builder.appName(app_name).master(planned)
    for k, v in settings.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    return spark


def _start_workers(master: str, app_name: str, settings: dict[str, str]) -> None:
    """Start the SparkContext, then its Python worker daemon in the background with a one-task job.

    Spark starts the daemon at the first Python task; its imports (about 5 s of one core)
    then run while the JVM builds the session and the driver plans the job, instead of after.
    A failure here is left for the real job to meet and report.
    """
    import threading

    from pyspark import SparkConf, SparkContext

    sc = SparkContext.getOrCreate(SparkConf().setMaster(master).setAppName(app_name).setAll(list(settings.items())))

    def one_task():
        try:
            sc.parallelize([0], 1).map(lambda x: x).count()
        except Exception:  # noqa: BLE001 - the session stopped first, or the job's own tasks report it
            pass

    thread = threading.Thread(target=one_task, name="clip-pyfunc-start-workers", daemon=True)
    thread.start()
    _STARTING.append(thread)


def stop_session(spark, wait_s: float = 60) -> None:
    """Stop the session once its worker daemon has started (see _start_workers).

    A session stopped while the daemon still imports (a job that fails on its arguments)
    waits for it either way; this way the JVM does not also log a crashed Python worker.

    Args:
        spark: The session.
        wait_s: The longest wait for the daemon's start before stopping anyway.
    """
    while _STARTING:
        _STARTING.pop().join(wait_s)
    spark.stop()


def class_archive_options(conf: dict[str, str] | None = None) -> str:
    """JVM options that map the local JVM's classes from a class-data archive, or record one.

    The first local session with this Java and these Spark jars records the classes the JVM
    loaded into an archive when it exits (-XX:ArchiveClassesAtExit: that session starts
    slower, and its JVM writes about 180 MB after the command ends); later ones map them
    (-XX:SharedArchiveFile), which starts the session and its first job seconds sooner on
    2 cores. The archive lives in the user's cache (XDG_CACHE_HOME), named by the Java binary
    and the jars, so an upgrade records a new one (and removes the old). While one JVM
    records (until it has written the file), other sessions run without one (_recording).

    Four things would make the JVM fail rather than run without an archive, so none of them
    reaches it: a directory with files on the class path (a Spark conf directory, Hadoop's,
    an extra class path: the JVM refuses to record then); a JDK without a base archive, which
    cannot record (tried first with `java -version`); a truncated archive (each file version
    tried once with `java -version`, removed if it fails); a file gone between the checks.
    CDS messages are off: recording prints hundreds.

    Args:
        conf: The session's own settings (an extra class path there rules recording out).

    Returns:
        The options, or '' where none apply.
    """
    try:
        return _class_archive_options(conf or {})
    except OSError:
        return ""


def _class_archive_options(conf: dict[str, str]) -> str:
    """class_archive_options, raising OSError where a file changed under it."""
    import hashlib

    import pyspark

    java = _java_binary()
    jars = os.path.join(_spark_home(), "jars")
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clip-pyfunc", "spark-cds")
    if java is None or not os.path.isdir(jars) or any(c.isspace() or c in "'\"" for c in folder):
        return ""
    stamp = [java, os.stat(java).st_mtime_ns, jars, os.stat(jars).st_mtime_ns, JVM_QUICK_START]
    name = f"spark-{pyspark.__version__}-{hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]}.jsa"
    archive = os.path.join(folder, name)
    if _recording(archive):
        return ""
    if os.path.isfile(archive):
        if _archive_maps(java, archive):
            return f"-XX:SharedArchiveFile={archive} -Xlog:cds*=off"
        os.remove(archive)
    if _class_path_has_folders(conf):
        return ""
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f"probe-{os.getpid()}.jsa")
    try:
        records = os.access(folder, os.W_OK) and _java_starts(java, f"-XX:ArchiveClassesAtExit={probe}")
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    if not records:
        return ""
    try:  # one recorder: whoever creates the marker first
        marker = os.open(f"{archive}.recording", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return ""
    with os.fdopen(marker, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    for old in os.listdir(folder):  # archives of an earlier Java or Spark
        if old.startswith("spark-") and not old.startswith(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, old))
    return f"-XX:ArchiveClassesAtExit={archive} -Xlog:cds*=off"


def _recording(archive: str) -> bool:
    """True while a JVM records `archive` (it writes it after its driver has exited), or for
    CLAIM_S after a session claimed it while the file is not there. Clears a finished claim."""
    marker = f"{archive}.recording"
    if not os.path.exists(marker):
        return False
    flag = f"-XX:ArchiveClassesAtExit={archive}".encode()
    if os.path.isdir("/proc"):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if flag in f.read():
                    return True
        if os.path.exists(archive):  # and its writer is gone: done
            os.remove(marker)
            return False
        wait_s = CLAIM_S
    else:  # no process table to read: trust the claim for longer
        wait_s = RECORDING_WAIT_S
    if time.time() - os.stat(marker).st_mtime < wait_s:
        return True
    os.remove(marker)
    return False


def _class_path_has_folders(conf: dict[str, str]) -> bool:
    """True when the driver's class path will hold a directory with files, or entries we cannot
    see: Spark's conf directory, Hadoop's and YARN's, or an extra class path."""
    if any(os.environ.get(v) for v in ("SPARK_CLASSPATH", "SPARK_DIST_CLASSPATH", "HADOOP_CONF_DIR", "YARN_CONF_DIR")):
        return True
    if conf.get("spark.driver.extraClassPath") or _site_sets("spark.driver.extraClassPath"):
        return True
    conf_dir = _spark_conf_dir()
    return os.path.isdir(conf_dir) and bool(os.listdir(conf_dir))


def _archive_maps(java: str, archive: str) -> bool:
    """True when `java` starts with `archive` (checked once per file version, then remembered)."""
    stat = os.stat(archive)
    version, checked = f"{stat.st_size}:{stat.st_mtime_ns}", f"{archive}.ok"
    with contextlib.suppress(OSError), open(checked, encoding="utf-8") as f:
        if f.read() == version:
            return True
    ok = _java_starts(java, f"-XX:SharedArchiveFile={archive}")
    if ok:
        with contextlib.suppress(OSError), open(checked, "w", encoding="utf-8") as f:
            f.write(version)
    return ok


def _java_starts(java: str, archive_option: str) -> bool:
    """True when `java -version` runs with `archive_option` and the session's JVM options."""
    import subprocess

    try:  # no crash report or core file where it aborts
        return subprocess.run([java, archive_option, "-Xlog:cds*=off", *JVM_QUICK_START.split(),
                               f"-XX:ErrorFile={os.devnull}", "-XX:-CreateCoredumpOnCrash", "-version"],
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _java_binary() -> str | None:
    """The java that spark-submit runs: JAVA_HOME's, else the one on PATH (resolved), or None."""
    import shutil

    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    return os.path.realpath(java) if java and os.path.isfile(java) else None


def planned_master(master: str | None = None) -> str:
    """The master a session will get: `master`, else spark-submit's, else local[*]."""
    if master:
        return master
    from pyspark import SparkConf, SparkContext

    if _submitted():  # SparkConf reads the submitted settings only through the running JVM
        SparkContext._ensure_initialized()
    return SparkConf().get("spark.master", "local[*]")


def _submitted() -> bool:
    """True when spark-submit launched this Python process (its JVM is already running)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _spark_home() -> str:
    """The Spark installation the launcher runs: SPARK_HOME, else pyspark's own folder."""
    import pyspark

    return os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__)


def _spark_conf_dir() -> str:
    """Spark's conf directory: SPARK_CONF_DIR, else the installation's conf/."""
    return os.environ.get("SPARK_CONF_DIR") or os.path.join(_spark_home(), "conf")


def _site_sets(key: str) -> bool:
    """True when the installation's spark-defaults.conf sets `key` (a site's JVM options win)."""
    try:
        with open(os.path.join(_spark_conf_dir(), "spark-defaults.conf"), encoding="utf-8") as f:
            return any(line.split(None, 1)[:1] == [key] for line in f)
    except OSError:
        return False


def is_local(master: str) -> bool:
    """True for Spark's local masters (local, local[N], local[*], local[N,F])."""
    return master == "local" or master.startswith("local[")


def worker_threads(spark) -> int:
    """torch threads per Python worker so that concurrent tasks x threads <= cores per executor."""
    conf = spark.sparkContext.getConf()
    master = conf.get("spark.master", "local[*]")
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    if master.startswith("local"):
        slots = spark.sparkContext.defaultParallelism
        return max(1, (os.cpu_count() or 1) // max(1, slots))
    return max(1, task_cpus)


def resolve_model_uri(model_uri: str) -> str:
    """Pin an alias to its current version on the driver, so every worker loads the same one."""
    from clip_pyfunc.registry import pin_model_uri

    return pin_model_uri(model_uri)


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A registered model as a job's workers load it.

    Attributes:
        requested: The URI the caller gave (an alias, a version, a path).
        uri: The pinned model URI (models:/name/version).
        load_from: What the workers pass to load_model: `uri`, or a copy on the local disk.
        fields: The result columns (see output_fields).
        checked: The driver already compared the model's requirements with this environment.
    """

    requested: str
    uri: str
    load_from: str
    fields: tuple
    checked: bool = False


def prepare_model(model_uri: str, local_copy: str | None = None) -> ModelSource:
    """Pin the model and read its result columns; with `local_copy` (a directory), download it
    there once and check its requirements once, for workers that share this machine's disk.

    A local job's workers then load from disk instead of each copying the model out of the
    registry, and skip the requirements check (both about a second each). Nothing here needs
    the JVM, so the CLI runs it while Spark starts. The directory must outlive every action on
    a DataFrame embedded with the result (run_job and the CLI remove it after the job).
    """
    uri = resolve_model_uri(model_uri)
    fields = tuple(output_fields(uri))
    if local_copy is None:
        return ModelSource(requested=model_uri, uri=uri, load_from=uri, fields=fields)
    import mlflow
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=local_copy)
    requirements = os.path.join(path, "requirements.txt")
    if not os.path.exists(requirements):  # the workers run MLflow's own check instead
        return ModelSource(requested=model_uri, uri=uri, load_from=path, fields=fields)
    with open(requirements, encoding="utf-8") as f:
        pins = [line.strip() for line in f if line.strip() and not line.lstrip().startswith(("#", "-"))]
    warn_dependency_requirement_mismatches(pins)
    return ModelSource(requested=model_uri, uri=uri, load_from=path, fields=fields, checked=True)


def embed_dataframe(df, model_uri: str | ModelSource, *, input_col: str = "input", normalize: bool | None = None,
                    model_config: dict | None = None, threads: int | None = None):
    """Add `embedding` (array<float>) and `error` (string) columns computed by a registered model.

    Args:
        df: Spark DataFrame with `input_col` (text, base64 strings or binary image bytes).
        model_uri: A pyfunc model URI, e.g. models:/clip_image_embedding@champion, or a
            ModelSource from prepare_model.
        input_col: Column to embed; it is dropped from the result (other columns pass through).
        normalize: L2-normalise the vectors; None keeps the model's default (its model_config).
        model_config: Overrides of the logged model_config (precision, batch_size, limits...).
        threads: torch threads per worker; None derives it from the session (see worker_threads).

    Returns:
        (DataFrame, accumulator of model loads). One output row per input row.

    Raises:
        EmbedJobError: `input_col` is missing.
    """
    import mlflow
    from pyspark.sql.types import StringType, StructField, StructType

    source = model_uri if isinstance(model_uri, ModelSource) else prepare_model(model_uri)
    results = list(source.fields)
    names = [f.name for f in results]
    combined_inputs, combined_outputs = _combined_columns()
    if names == list(combined_outputs):  # the combined model reads its own two columns, either may be absent
        inputs = [c for c in combined_inputs if c in df.columns]
        if not inputs:
            raise EmbedJobError(f"the combined model reads columns {list(combined_inputs)}; columns: {df.columns}")
    elif input_col not in df.columns:
        raise EmbedJobError(f"input column {input_col!r} not in the table; columns: {df.columns}")
    else:
        inputs = [input_col]
    spark = df.sparkSession
    slots = spark.sparkContext.defaultParallelism
    if df.rdd.getNumPartitions() < slots:  # a small file is one partition: spread it over every slot
        df = df.repartition(slots)
    config = dict(model_config or {})
    config.setdefault("num_threads", threads or worker_threads(spark))
    tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    loads = spark.sparkContext.accumulator(0)
    keep = [f for f in df.schema.fields if f.name not in inputs]
    schema = StructType(keep + results + [StructField(ERROR_COL, StringType(), True)])
    key = json.dumps([source.uri, config, tracking_uri], sort_keys=True)

    def embed_batches(batches):
        model = _worker_model(key, source, config, tracking_uri, registry_uri, loads)
        for pdf in batches:
            yield _embed_pandas(model, pdf, inputs, normalize, names)

    return df.mapInPandas(embed_batches, schema=schema), loads


def output_fields(model_uri: str) -> list:
    """The result columns a model gives a table, from its signature: `embedding` (array<float>)
    for the embedding models, `labels` (array<string>) and `scores` (array<double>) for the
    classifier, `image_features` and `text_features` (array<float>) for the combined model."""
    import mlflow
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StringType, StructField

    outputs = mlflow.models.get_model_info(model_uri).signature.outputs
    names = outputs.input_names() if outputs is not None and outputs.has_input_names() else []
    if names == ["labels", "scores"]:
        return [StructField("labels", ArrayType(StringType()), True), StructField("scores", ArrayType(DoubleType()), True)]
    if names == list(_combined_columns()[1]):
        return [StructField(name, ArrayType(FloatType()), True) for name in names]
    return [StructField(EMBEDDING_COL, ArrayType(FloatType()), True)]


def _combined_columns() -> tuple[tuple[str, str], tuple[str, ...]]:
    """The combined model's input and output columns.

    Imported on use: the model module imports MLflow (over a second), which a job's driver
    should import beside the JVM's start, not before it.
    """
    from clip_pyfunc.combined_model import IMAGE_COLUMN, OUTPUT_COLUMNS, TEXT_COLUMN

    return (IMAGE_COLUMN, TEXT_COLUMN), OUTPUT_COLUMNS


def _worker_model(key: str, source: ModelSource, config: dict, tracking_uri: str, registry_uri: str, loads):
    """The model for `key` in this Python worker, loaded on first use only.

    A module-level function, so the closure above refers to it by import and every task in
    a reused worker sees the same cache (a closure's own globals would be pickled per task).
    """
    import mlflow

    model = _WORKER_MODELS.get(key)
    if model is None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        model = mlflow.pyfunc.load_model(source.load_from, model_config=config,
                                         suppress_warnings=source.checked).unwrap_python_model()
        _WORKER_MODELS[key] = model
        loads.add(1)
    return model


def _embed_pandas(model, pdf, inputs: list[str], normalize: bool | None, names: list[str]):
    """Embed one pandas batch; bad rows get null results and their reason."""
    # The combined model takes its columns as a frame; the others take the one column's cells.
    values = pdf[inputs] if getattr(model, "table_inputs", None) else pdf[inputs[0]].tolist()
    rows = len(pdf)
    try:
        columns, errors = model.table_columns(values, normalize=normalize)
    except InvalidInput as e:  # a whole-batch problem (should not happen per row): mark every row
        columns, errors = {}, [InvalidInput(e.reason, row) for row in range(rows)]
    reasons: dict[int, str] = {}
    for e in errors:  # a row may fail in several fields (combined model): keep every reason
        reasons[e.row] = f"{reasons[e.row]}; {e.reason}" if e.row in reasons else e.reason
    out = pdf.drop(columns=inputs)
    for name in names:
        out[name] = columns.get(name, [None] * rows)
    out[ERROR_COL] = [reasons.get(row) for row in range(rows)]
    return out


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


def run_job(spark, *, model_uri: str | ModelSource, source: str, output: str, id_col: str | None = None,
            input_col: str | None = None, input_format: str = "auto", fail_on_error: bool = False,
            normalize: bool | None = None, model_config: dict | None = None) -> dict:
    """Embed a table and publish the result only when the job succeeded.

    `model_uri` is a model URI or a ModelSource from prepare_model (the CLI prepares it while
    Spark starts). With a URI and a local master, the model is copied to local disk once for
    the job's workers, and the copy is removed at the end.

    The output is written to a staging location first, counted, then swapped in for the
    previous output (a re-run replaces it; a failed run leaves the old output untouched and
    no partial output behind).

    Returns:
        A JSON-ready report: rows, embedded, failed, model loads, seconds, rows/s, output.

    Raises:
        EmbedJobError: Bad arguments, or bad rows with `fail_on_error`.
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
        is_table = not _looks_like_path(output)
        staging = f"{output}__staging_{uuid.uuid4().hex[:8]}" if is_table else f"{output}.staging-{uuid.uuid4().hex[:8]}"
        try:
            if is_table:
                embedded.write.mode("error").saveAsTable(staging)
            else:
                embedded.write.mode("error").parquet(staging)
            rows, failed = _count_written(spark, staging, is_table)
            counts = JobCounts(rows=rows, embedded=rows - failed, failed=failed,
                               model_loads=loads.value, seconds=round(time.perf_counter() - start, 2))
            if fail_on_error and counts.failed:
                written = spark.table(staging) if is_table else spark.read.parquet(staging)
                examples = [f"{r[id_col]}: {r[ERROR_COL]}" for r in written.where(F.col(ERROR_COL).isNotNull())
                            .select(id_col, ERROR_COL).limit(5).collect()]
                raise EmbedJobError(f"{counts.failed} of {counts.rows} rows failed (--fail-on-error); "
                                    f"nothing was written. First: {examples}")
            _publish(spark, staging, output, is_table)
        finally:
            _drop(spark, staging, is_table)
    report = dict(counts.__dict__, output=output, model_uri=model.requested, model_version_uri=model.uri,
                  master=spark.sparkContext.master,
                  rows_per_s=round(counts.rows / counts.seconds, 2) if counts.seconds else None)
    print(f"clip-pyfunc embed-table: {counts.rows} rows, {counts.embedded} embedded, {counts.failed} failed, "
          f"model loaded {counts.model_loads}x, {counts.seconds}s", file=sys.stderr, flush=True)
    return report


def _count_written(spark, staging: str, is_table: bool) -> tuple[int, int]:
    """Rows, and rows with an error, read back from the written output.

    A local job's parquet output is counted from its files' footers: row counts, and the
    error column's null counts, which Spark writes. That is milliseconds, where a Spark job
    is about 0.8 s. Anything else, or footers without those counts, is counted by Spark.
    """
    counted = None if is_table else _count_footers(spark, staging)
    if counted is not None:
        return counted
    from pyspark.sql import functions as F

    written = spark.table(staging) if is_table else spark.read.parquet(staging)
    row = written.agg(F.count(F.lit(1)).alias("rows"), F.count(ERROR_COL).alias("failed")).first()
    return row["rows"], row["failed"]


def _count_footers(spark, location: str) -> tuple[int, int] | None:
    """(rows, failed) from the footers of a parquet directory on this machine; None where it is
    elsewhere (a cluster's executors wrote to their own disks or to another file system) or a
    footer lacks the counts."""
    if not is_local(spark.sparkContext.master):
        return None
    fs, path = _hadoop_fs(spark, location)
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


def _looks_like_path(output: str) -> bool:
    return "/" in output or output.endswith(".parquet") or "://" in output


def _publish(spark, staging: str, output: str, is_table: bool) -> None:
    if is_table:
        spark.sql(f"DROP TABLE IF EXISTS {output}")
        spark.sql(f"ALTER TABLE {staging} RENAME TO {output}")
        return
    fs, path = _hadoop_fs(spark, output)
    jvm = spark.sparkContext._jvm
    if fs.exists(path):
        fs.delete(path, True)
    if not fs.rename(jvm.org.apache.hadoop.fs.Path(staging), path):
        raise EmbedJobError(f"could not move {staging} to {output}")


def _drop(spark, staging: str, is_table: bool) -> None:
    if is_table:
        spark.sql(f"DROP TABLE IF EXISTS {staging}")
        return
    fs, path = _hadoop_fs(spark, staging)
    if fs.exists(path):
        fs.delete(path, True)


def _hadoop_fs(spark, location: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(location)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), path


if __name__ == "__main__":  # spark-submit clip_pyfunc/spark.py --model-uri ... (same flags as embed-table)
    from clip_pyfunc.cli import main

    sys.exit(main(["embed-table", *sys.argv[1:]]))
