"""The Spark session a job runs in: local quick start, its Python worker daemon started early, stop.

A local job's JVM lives for one command and mostly moves Arrow batches. It starts sooner with
the C1 compiler only, no web UI, and the classes it loads mapped from an archive
(classes.class_archive_options). Its Python workers fork from a daemon that has imported MLflow
and the model's libraries (daemon: torch too, unless the job's plan says its model needs none),
which starts while the JVM still sets up the session (_start_workers). None of it is applied
where spark-defaults.conf or the caller's conf sets the same key, nor under spark-submit.
"""

from __future__ import annotations

import os
import sys

from clip_pyfunc.batch.spark.classes import JVM_QUICK_START, class_archive_options, site_sets


_STARTING: list = []  # driver: threads running the job that starts a session's worker daemon


JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"


DAEMON_KEY, DAEMON_MODULE = "spark.python.daemon.module", "clip_pyfunc.batch.spark.daemon"
# The executor environment variable naming the daemon's plan file (spark_session's worker_plan).
PLAN_ENV = "CLIP_PYFUNC_WORKER_PLAN"


# Spark keeps one daemon per worker environment, and its SQL engine adds this variable to the
# environment of its Python workers: the RDD job that starts the daemon early must carry it too.
SQL_WORKER_ENV = {"spark.executorEnv.SPARK_SIMPLIFIED_TRACEBACK": "1"}


def local_quick_start(conf: dict[str, str] | None = None) -> dict[str, str]:
    """The settings a local session outside spark-submit gets (see spark_session), less the
    keys that `conf` or the installation's spark-defaults.conf sets."""
    conf = conf or {}
    keep = [k for k in (JAVA_OPTIONS_KEY, "spark.ui.enabled", DAEMON_KEY) if k not in conf and not site_sets(k)]
    settings = {"spark.ui.enabled": "false", DAEMON_KEY: DAEMON_MODULE}
    if JAVA_OPTIONS_KEY in keep:  # only then does the archive matter: recording is not free
        from pyspark import SparkContext

        archive = class_archive_options(conf) if SparkContext._gateway is None else ""  # a JVM runs already
        settings[JAVA_OPTIONS_KEY] = f"{JVM_QUICK_START} {archive}".strip()
    return {k: v for k, v in settings.items() if k in keep}


def spark_session(master: str | None = None, app_name: str = "clip-pyfunc", batch_rows: int = 64,
                  conf: dict[str, str] | None = None, start_workers: bool = True, worker_plan: str | None = None):
    """Get or create the session; `master` None keeps spark-submit's, else local[*].

    Arrow batches are capped at `batch_rows` rows (Spark's default is 10,000, which for
    images means gigabytes per batch). `conf` adds settings (e.g. spark.sql.warehouse.dir).
    A local master outside spark-submit also gets local_quick_start(), key by key, where
    neither `conf` nor the installation's spark-defaults.conf sets that key. With
    `start_workers`, its Python worker daemon starts at once, in the background: for
    sessions that will run Python tasks; stop them with stop_session.

    `worker_plan` is a path where the caller will write (daemon.write_plan) what the job's model
    needs beyond daemon.BASE; our daemon waits for it before it forks workers. The caller must
    write it, even after a failure, or the workers wait up to daemon.PLAN_WAIT_S. Only a new
    session with our daemon uses it.
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
    our_new_daemon = settings.get(DAEMON_KEY) == DAEMON_MODULE and SparkContext._active_spark_context is None
    if worker_plan and our_new_daemon:
        settings[f"spark.executorEnv.{PLAN_ENV}"] = worker_plan
    early = (start_workers and our_new_daemon
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
