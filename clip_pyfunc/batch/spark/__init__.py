"""Embed tables on Spark: session, reader -> embed (pyfunc in mapInPandas) -> writer, and the job that chains them.

The public face is what notebooks and jobs call; the rooms beside it are `session`, `classes`
(the JVM's class archive), `reader`, `embed`, `writer`, `job` and `daemon` (Spark's Python daemon).
"""

from clip_pyfunc.batch.spark.embed import embed_dataframe, prepare_model
from clip_pyfunc.batch.spark.job import embed_table, run_job
from clip_pyfunc.batch.spark.reader import read_input
from clip_pyfunc.batch.spark.session import spark_session, stop_session

__all__ = ["embed_dataframe", "embed_table", "prepare_model", "read_input", "run_job", "spark_session", "stop_session"]
