"""The `clip-pyfunc` console script end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import free_port

NO_MODEL = "models:/no_such_model@champion"


def _run(args, cwd, **env):
    return subprocess.run(["clip-pyfunc", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env))


@pytest.mark.slow
def test_demo_registers_and_embeds_in_embedded_registry(tmp_path, tiny_checkpoint):
    env = {"MLFLOW_TRACKING_URI": ""}  # unset: MLflow's embedded default, ./mlflow.db
    out = _run(["demo", "--model", tiny_checkpoint], tmp_path, **env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert summary["models"]["text"]["uri"] == "models:/clip_text_embedding@champion"
    assert summary["demo"]["text_vectors"] == [4, 32] and summary["demo"]["image_vectors"] == [4, 32]  # 4 samples
    assert (tmp_path / "mlflow.db").exists()
    again = json.loads(_run(["register", "--model", tiny_checkpoint], tmp_path, **env).stdout)
    assert again["models"]["image"]["version"] == "2"


def test_random_checkpoint_and_bad_model_exit_2(tmp_path):
    out = _run(["random-checkpoint", str(tmp_path / "ck")], tmp_path)
    assert out.returncode == 0 and "meaningless" in json.loads(out.stdout)["warning"]
    assert (tmp_path / "ck" / "model.safetensors").exists()
    bad = _run(["register", "--model", str(tmp_path / "missing")], tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    conf = tmp_path / "c.yaml"
    conf.write_text("runtime:\n  precision: fp64\n")
    bad = _run(["register", "--conf", str(conf), "--model", str(tmp_path / "ck")], tmp_path)
    assert bad.returncode == 2 and "precision 'fp64'" in bad.stderr


@pytest.mark.slow
def test_mlproject_main_entry_point(tmp_path, tiny_checkpoint):
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run(
        ["mlflow", "run", root, "-e", "main", "--env-manager", "local", "-P", f"model={tiny_checkpoint}",
         "-P", "alias=staging", "--experiment-name", "clip-pyfunc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        # (mlflow.set_experiment in earlier tests exports MLFLOW_EXPERIMENT_ID, which `mlflow run` refuses
        # beside --experiment-name.)
        env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"},
             "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/proj.db"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"uri": "models:/clip_text_embedding@staging"' in out.stdout


def _fails_in_one_line(args, cwd) -> str:
    """Run the CLI on a foreseeable bad input: exit 2, one line on stderr (no traceback), nothing on stdout."""
    out = _run(args, cwd)
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stdout == "" and lines[0].startswith(f"clip-pyfunc {args[0]}: error: "), lines
    return lines[0]


@pytest.fixture
def bad_inputs(tmp_path, tracking_uri):
    """Files for the bad-input cases: a good parquet and evaluate data, a file that is not parquet."""
    import pandas as pd

    pd.DataFrame({"id": ["a"], "embedding": [[0.1, 0.2]], "error": [None]}).to_parquet(tmp_path / "table.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet")
    (tmp_path / "pairs.csv").write_text("image,caption\na.jpg,a cat\n")
    return tmp_path


@pytest.mark.parametrize("case", [
    "search: no index folder", "duplicates: no index folder", "duplicates: Qdrant server unreachable",
    "index: missing input", "index: input not parquet", "index: unregistered model", "app: unregistered text model",
    "app: unregistered classifier named", "serve: unregistered model", "embed-table: unregistered model",
    "evaluate: unregistered model", "bench-serving: unregistered model", "random-checkpoint: unwritable path",
])
def test_foreseeable_errors_are_one_line_and_exit_2(case, bad_inputs, request):
    """Each command that takes paths or URIs: a bad one is one line on stderr naming what to do, exit 2."""
    if case == "app: unregistered classifier named":
        request.getfixturevalue("registered")  # the text and image models the app starts with
    d = str(bad_inputs)
    args, expected = {
        "search: no index folder": (["search", "--index-path", f"{d}/none", "--text", "x"],
                                    ["no index at", "clip-pyfunc index --input"]),
        "duplicates: no index folder": (["duplicates", "--index-path", f"{d}/none"],
                                        ["no index at", "clip-pyfunc index"]),
        "duplicates: Qdrant server unreachable": (["duplicates", "--qdrant-url", f"http://127.0.0.1:{free_port()}"],
                                                  ["cannot use the Qdrant server", "--qdrant-url"]),
        "index: missing input": (["index", "--input", f"{d}/missing.parquet", "-m", NO_MODEL,
                                  "--index-path", f"{d}/q"], ["missing.parquet: no such file or folder"]),
        "index: input not parquet": (["index", "--input", f"{d}/fake.parquet", "-m", NO_MODEL,
                                      "--index-path", f"{d}/q"], ["is not a parquet file"]),
        "index: unregistered model": (["index", "--input", f"{d}/table.parquet", "-m", NO_MODEL,
                                       "--index-path", f"{d}/q"],
                                      [f"--model-uri {NO_MODEL}", "not found", "clip-pyfunc register"]),
        "app: unregistered text model": (["app", "--text-name", "no_such_model", "--index-path", f"{d}/none"],
                                         [f"text model {NO_MODEL}", "not found", "clip-pyfunc register"]),
        "app: unregistered classifier named": (["app", "--classifier", NO_MODEL, "--index-path", f"{d}/none"],
                                               [f"classifier {NO_MODEL}", "not found"]),
        "serve: unregistered model": (["serve", "-m", NO_MODEL], [f"--model-uri {NO_MODEL}", "not found"]),
        "embed-table: unregistered model": (["embed-table", "-m", NO_MODEL, "--input", f"{d}/photos", "--output",
                                             f"{d}/out.parquet"], [f"--model-uri {NO_MODEL}", "not found"]),
        "evaluate: unregistered model": (["evaluate", "--models", NO_MODEL, "--data", f"{d}/pairs.csv", "--out",
                                          f"{d}/eval"], [f"--models {NO_MODEL}", "not found"]),
        "bench-serving: unregistered model": (["bench-serving", "-m", NO_MODEL], [f"--model-uri {NO_MODEL}"]),
        "random-checkpoint: unwritable path": (["random-checkpoint", "/proc/no/such/dir"],
                                               ["cannot write the checkpoint to /proc/no/such/dir"]),
    }[case]
    line = _fails_in_one_line(args, d)
    assert all(e in line for e in expected), line
    assert not os.path.exists(f"{d}/none") and not os.path.exists(f"{d}/clip-index")  # readers create no index


@pytest.mark.spark
def test_embed_table_input_errors_are_one_line(bad_inputs, registered):
    d = str(bad_inputs)
    args = ["embed-table", "-m", registered["models"]["image"]["uri"], "--output", f"{d}/out.parquet",
            "--master", "local[1]"]
    # A missing local path is found before the JVM starts: one line, nothing else.
    line = _fails_in_one_line(args + ["--input", f"{d}/missing.parquet"], d)
    assert "missing.parquet: no such file or folder" in line
    # A path with a scheme (dbfs:, s3a://) is Spark's to resolve, so the job starts and logs as Spark does;
    # its error still ends the command as one error line, exit 2, no traceback.
    out = _run(args + ["--input", "dbfs:/mnt/photos"], d)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("clip-pyfunc embed-table: error: --input dbfs:/mnt/photos"), last


def test_commands_on_an_index_another_process_holds(tmp_path, tracking_uri):
    """One process holds an embedded store (a lock on its WAL): the others say what to do instead."""
    path = str(tmp_path / "held")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from clip_pyfunc.search.store import EdgeStore, Space\n"
                               "store = EdgeStore(sys.argv[1], 'clip')\n"
                               "store.ensure(Space(model_uri='models:/m/1', run_id='r', models={}, embedding_dim=4))\n"
                               "print('open', flush=True)\ntime.sleep(600)", path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        # (`index --input` asks the registry for the model's space first: another space's vectors go into a
        # collection of their own beside the held one; tests/test_search.py checks the held one refused.)
        for args in (["search", "--text", "x"], ["duplicates"], ["app", "--port", str(free_port())],
                     ["index", "--to-server", "http://x:1"]):
            line = _fails_in_one_line([*args, "--index-path", path], str(tmp_path))
            assert f"the index {os.path.join(path, 'clip')} is in use by another process" in line, line
            assert all(hint in line for hint in ("POST /search", "stop the process", "--qdrant-url")), line
    finally:
        holder.kill()
        holder.wait()
