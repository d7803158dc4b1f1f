"""Publishing a Spark output (writer.publish) never holds less than one complete copy.

Each test runs the swap on real local Spark and real files, with a platform fault at one step:
the Hadoop FileSystem or Spark's catalog refuses a rename or a delete, another writer takes the
output path, or the process dies between two steps. Faults are injected at the edge of the real
parts (a wrapper that fails the Nth rename, then hands every other call to the real object).
After each, the old output or the new one is readable with its row count, and the error names
where the new one is kept.
"""

from __future__ import annotations

import glob
import logging
import os
import uuid

import pandas as pd
import pyarrow.parquet as pq
import pytest

from clip_pyfunc.batch.spark import run_job
from clip_pyfunc.batch.spark import writer
from clip_pyfunc.errors import EmbedJobError

pytestmark = [pytest.mark.spark]

OLD, NEW, OTHER = 3, 5, 2  # rows in the previous output, the new one, another writer's


class Crash(BaseException):
    """The process dying between two steps: no `except Exception` runs."""


class Faults:
    """What the platform does at the Nth rename or delete: "refuse", "crash", or a callable run first."""

    def __init__(self, rename: dict | None = None, delete: dict | None = None):
        self.plan = {"rename": rename or {}, "delete": delete or {}}
        self.calls = {"rename": 0, "delete": 0}

    def at(self, op: str):
        self.calls[op] += 1
        return self.plan[op].get(self.calls[op])


class FaultyFileSystem:
    """A real Hadoop FileSystem; a refused rename or delete returns false, as Hadoop's do."""

    def __init__(self, fs, faults: Faults):
        self._fs, self._faults = fs, faults

    def rename(self, source, target):
        return self._call("rename", self._fs.rename, source, target)

    def delete(self, path, recursive):
        return self._call("delete", self._fs.delete, path, recursive)

    def _call(self, op, real, *args):
        fault = self._faults.at(op)
        if fault == "refuse":
            return False
        if fault == "crash":
            raise Crash(op)
        if callable(fault):
            fault()
        return real(*args)

    def __getattr__(self, name):
        return getattr(self._fs, name)


class FaultySession:
    """A real SparkSession; a refused ALTER TABLE ... RENAME or DROP TABLE raises, as the catalog does."""

    def __init__(self, spark, faults: Faults):
        self._spark, self._faults = spark, faults

    def sql(self, query, *args, **kwargs):
        words = query.upper()
        op = "rename" if " RENAME TO " in words else "delete" if words.startswith("DROP TABLE") else None
        fault = self._faults.at(op) if op else None
        if fault == "refuse":
            raise RuntimeError(f"injected: the catalog refused {query}")
        if fault == "crash":
            raise Crash(query)
        if callable(fault):
            fault()
        return self._spark.sql(query, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._spark, name)


class Output:
    """A previous output (OLD rows) and a staging copy (NEW rows) of one kind, and how to read them."""

    def __init__(self, spark, tmp_path, is_table: bool, monkeypatch, staged: bool = True):
        self.spark, self.is_table, self.monkeypatch = spark, is_table, monkeypatch
        self.output = f"emb_{uuid.uuid4().hex[:8]}" if is_table else str(tmp_path / "emb.parquet")
        self.staging = f"{self.output}__staging_test" if is_table else f"{self.output}.staging-test"
        self.write(self.output, OLD)
        if staged:
            self.write(self.staging, NEW)

    def write(self, location: str, rows: int) -> None:
        frame = self.spark.range(rows)
        if self.is_table:
            frame.write.saveAsTable(location)
        else:
            frame.write.parquet(location)

    def rows(self, location: str) -> int | None:
        """Rows of a complete copy at `location`, None where there is none."""
        if self.is_table:
            return self.spark.table(location).count() if self.spark.catalog.tableExists(location) else None
        return pq.read_table(location).num_rows if os.path.exists(location) else None

    def previous_copies(self) -> list[str]:
        if self.is_table:
            rows = self.spark.sql(f"SHOW TABLES LIKE '{self.output}__previous_*'").collect()
            return [r["tableName"] for r in rows if not r["isTemporary"]]
        return glob.glob(self.output + ".previous-*")

    def faulty(self, faults: Faults):
        """The session to publish with; for folders, the file systems the writer gets are faulty."""
        if self.is_table:
            return FaultySession(self.spark, faults)
        real = writer.hadoop_fs

        def hadoop_fs(spark, location):
            fs, path = real(spark, location)
            return FaultyFileSystem(fs, faults), path

        self.monkeypatch.setattr(writer, "hadoop_fs", hadoop_fs)
        return self.spark

    def publish(self, faults: Faults) -> None:
        writer.publish(self.faulty(faults), self.staging, self.output, self.is_table)


@pytest.fixture(params=["folder", "table"])
def out(request, spark, tmp_path, monkeypatch):
    return Output(spark, tmp_path, request.param == "table", monkeypatch)


# Renames in order: 1 the previous output aside, 2 the staging copy in, 3 the previous output back.


def test_refused_move_aside_keeps_both(out):
    with pytest.raises(EmbedJobError) as e:
        out.publish(Faults(rename={1: "refuse"}))
    assert (out.rows(out.output), out.rows(out.staging)) == (OLD, NEW)
    assert f"new output is kept at {out.staging}" in str(e.value)
    assert f"previous output is still at {out.output}" in str(e.value)


def test_refused_swap_moves_the_previous_output_back(out):
    with pytest.raises(EmbedJobError) as e:
        out.publish(Faults(rename={2: "refuse"}))
    assert (out.rows(out.output), out.rows(out.staging)) == (OLD, NEW)
    assert not out.previous_copies()
    assert f"moving the new output {out.staging} to {out.output} failed" in str(e.value)
    assert f"new output is kept at {out.staging}" in str(e.value)
    assert f"previous output is back at {out.output}" in str(e.value)
    out.monkeypatch.undo()  # the platform works again: the kept copy publishes, and nothing is left over
    out.publish(Faults())
    assert (out.rows(out.output), out.rows(out.staging), out.previous_copies()) == (NEW, None, [])


def test_refused_swap_and_move_back_name_both_copies_and_a_rerun_restores(out):
    with pytest.raises(EmbedJobError) as e:
        out.publish(Faults(rename={2: "refuse", 3: "refuse"}))
    previous, = out.previous_copies()
    assert (out.rows(out.output), out.rows(previous), out.rows(out.staging)) == (None, OLD, NEW)
    assert f"previous output is kept at {previous}" in str(e.value)
    assert f"new output is kept at {out.staging}" in str(e.value)
    out.monkeypatch.undo()  # the platform works again
    assert writer.restore_previous(out.spark, out.output, out.is_table) == previous
    assert (out.rows(out.output), out.previous_copies()) == (OLD, [])


def test_another_writer_taking_the_output_mid_swap_loses_nothing(out):
    # No injected refusal: the second rename and the move back fail for real, on a taken path.
    with pytest.raises(EmbedJobError) as e:
        out.publish(Faults(rename={2: lambda: out.write(out.output, OTHER)}))
    previous, = out.previous_copies()
    assert (out.rows(out.output), out.rows(previous), out.rows(out.staging)) == (OTHER, OLD, NEW)
    assert f"previous output is kept at {previous}" in str(e.value)
    assert f"new output is kept at {out.staging}" in str(e.value)


def test_crash_between_the_moves_leaves_the_previous_output_for_a_rerun(out, caplog):
    with pytest.raises(Crash):
        out.publish(Faults(rename={2: "crash"}))
    previous, = out.previous_copies()
    assert (out.rows(out.output), out.rows(previous), out.rows(out.staging)) == (None, OLD, NEW)
    out.monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger=writer.__name__):
        assert writer.restore_previous(out.spark, out.output, out.is_table) == previous
    assert (out.rows(out.output), out.previous_copies()) == (OLD, [])
    assert previous in caplog.text


def test_refused_removal_of_the_previous_output_publishes_and_names_it(out, caplog):
    with caplog.at_level(logging.WARNING, logger=writer.__name__):
        out.publish(Faults(delete={1: "refuse"}))
    previous, = out.previous_copies()
    assert (out.rows(out.output), out.rows(previous), out.rows(out.staging)) == (NEW, OLD, None)
    assert f"could not remove the previous output kept at {previous}" in caplog.text
    # A later job warns about it and leaves it, since the output is there.
    out.monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=writer.__name__):
        assert writer.restore_previous(out.spark, out.output, out.is_table) is None
    assert previous in caplog.text and out.rows(previous) == OLD


# The job: a failed swap keeps the staging copy; a re-run brings back what a killed swap left aside.


@pytest.fixture
def captions(spark, tmp_path):
    path = str(tmp_path / "captions.parquet")
    spark.createDataFrame(pd.DataFrame({"id": range(NEW), "caption": ["a red circle"] * NEW})).write.parquet(path)
    return path


def test_job_keeps_its_staging_copy_when_the_swap_fails(spark, registered, captions, tmp_path, monkeypatch):
    out = Output(spark, tmp_path, False, monkeypatch, staged=False)
    faulty = out.faulty(Faults(rename={2: "refuse"}))
    with pytest.raises(EmbedJobError) as e:
        run_job(faulty, model_uri=registered["models"]["text"]["uri"], source=captions, output=out.output,
                id_col="id", input_col="caption")
    staged, = glob.glob(out.output + ".staging-*")
    assert (out.rows(out.output), out.rows(staged)) == (OLD, NEW)
    assert f"new output is kept at {staged}" in str(e.value)
    assert "embedding" in pq.read_table(staged).column_names


def test_failed_rerun_still_restores_the_previous_output(spark, registered, captions, tmp_path, monkeypatch):
    out = Output(spark, tmp_path, False, monkeypatch)
    with pytest.raises(Crash):  # a job killed between the moves
        out.publish(Faults(rename={2: "crash"}))
    monkeypatch.undo()
    previous, = out.previous_copies()
    bad = str(tmp_path / "bad.parquet")
    spark.createDataFrame(pd.DataFrame({"id": [0], "caption": [None]})).write.parquet(bad)
    with pytest.raises(EmbedJobError, match="fail-on-error"):
        run_job(spark, model_uri=registered["models"]["text"]["uri"], source=bad, output=out.output,
                id_col="id", input_col="caption", fail_on_error=True)
    assert (out.rows(out.output), out.previous_copies()) == (OLD, [])
    assert not os.path.exists(previous)


def test_staging_and_previous_names_stay_beside_a_folder_given_with_a_slash(tmp_path):
    output = str(tmp_path / "emb.parquet") + "/"
    for name in (writer.staging_location(output, False), writer.previous_location(output, False)):
        assert os.path.dirname(name) == str(tmp_path), name
    assert writer.previous_location("db.emb", True).startswith("db.emb__previous_")
