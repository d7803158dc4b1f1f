"""A class-data archive for the local JVM: record it once, map it in every later session.

Only local sessions outside spark-submit use it (session.local_quick_start).
"""

from __future__ import annotations

import contextlib
import os
import time

# A local job's JVM lives for one command and mostly moves Arrow batches: it starts sooner with
# the C1 compiler only and the serial collector (the archive is recorded with the same options).
JVM_QUICK_START = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


CLAIM_S = 120  # a claim to record the class archive whose JVM has not shown by then is void


RECORDING_WAIT_S = 1800  # the same, where the process table cannot be read


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
    jars = os.path.join(spark_home(), "jars")
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
    if conf.get("spark.driver.extraClassPath") or site_sets("spark.driver.extraClassPath"):
        return True
    conf_dir = spark_conf_dir()
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


def spark_home() -> str:
    """The Spark installation the launcher runs: SPARK_HOME, else pyspark's own folder."""
    import pyspark

    return os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__)


def spark_conf_dir() -> str:
    """Spark's conf directory: SPARK_CONF_DIR, else the installation's conf/."""
    return os.environ.get("SPARK_CONF_DIR") or os.path.join(spark_home(), "conf")


def site_sets(key: str) -> bool:
    """True when the installation's spark-defaults.conf sets `key` (a site's JVM options win)."""
    try:
        with open(os.path.join(spark_conf_dir(), "spark-defaults.conf"), encoding="utf-8") as f:
            return any(line.split(None, 1)[:1] == [key] for line in f)
    except OSError:
        return False
