"""The notebooks run top to bottom on the tiny checkpoint, calling the package."""

from __future__ import annotations

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.mark.parametrize("name", sorted(os.listdir(NOTEBOOKS)))
def test_the_generator_writes_the_committed_notebooks(name):
    import runpy

    generator = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "make_notebooks.py"))
    with open(os.path.join(NOTEBOOKS, name), encoding="utf-8") as f:
        assert f.read() == generator["render"](name), "run `python tools/make_notebooks.py` and commit the notebooks"


def _execute(name: str, cwd) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


@pytest.mark.slow
def test_register_then_embed_notebooks(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CLIP_MODEL", tiny_checkpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/nb.db")
    registered = _execute("01_register_models.ipynb", tmp_path)
    assert "models:/clip_image_embedding@champion" in str(registered.cells[2].outputs)
    embedded = _execute("02_embed_texts_and_images.ipynb", tmp_path)
    assert "(4, 32)" in str(embedded.cells[3].outputs) and "float32" in str(embedded.cells[3].outputs)


@pytest.mark.slow
def test_choose_a_checkpoint_notebook(tmp_path, toy_checkpoint, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CLIP_MODELS", f"{toy_checkpoint},{tiny_checkpoint}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/nb.db")
    nb = _execute("05_choose_a_checkpoint.ipynb", tmp_path)
    shown = next(o for o in nb.cells[3].outputs if o.get("output_type") == "execute_result")
    scores = eval(shown["data"]["text/plain"])  # [(model, top1, images/s), ...]
    assert scores[0][0] == toy_checkpoint and scores[0][1] >= 0.9
    assert "| model |" in str(nb.cells[4].outputs) and "image/png" in str(nb.cells[4].outputs)


@pytest.mark.slow
def test_zero_shot_classifier_notebook(tmp_path, toy_checkpoint, monkeypatch):
    import yaml

    from clip_pyfunc.dev.toy_checkpoint import LABELS

    (tmp_path / "shapes.yaml").write_text(yaml.safe_dump({"name": "shapes", "labels": list(LABELS),
                                                          "templates": ["a {}"]}))
    monkeypatch.setenv("CLIP_MODEL", toy_checkpoint)
    monkeypatch.setenv("CLIP_LABELS", str(tmp_path / "shapes.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/nb.db")
    nb = _execute("06_zero_shot_classifier.ipynb", tmp_path)
    table = str(nb.cells[3].outputs)
    for name in ("red circle", "blue triangle", "green square", "purple triangle"):
        assert f"[{name}," in table  # each image's first label is its own colour and shape


@pytest.mark.slow
@pytest.mark.spark
def test_search_notebook(tmp_path, toy_checkpoint, monkeypatch):
    monkeypatch.setenv("CLIP_MODEL", toy_checkpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/nb.db")
    nb = _execute("07_search.ipynb", tmp_path)
    assert "'failed': 0" in str(nb.cells[3].outputs) and "'skipped': 0" in str(nb.cells[4].outputs)
    shown = next(o for o in nb.cells[5].outputs if o.get("output_type") == "execute_result")
    rows = shown["data"]["text/plain"].splitlines()[1:]  # 6 text hits, then 6 image hits
    assert "a red circle" in rows[0] and "red circle/" in rows[0]  # the best text hit is a red circle
    query, hit = re.match(r"\s*6\s+(\w+ \w+)/\S+\s+(\w+ \w+)/", rows[6]).groups()
    assert query == hit  # the best image hit shows the query's label
    assert "image/png" in str(nb.cells[6].outputs)


@pytest.mark.slow
@pytest.mark.spark
def test_change_the_model_notebook(tmp_path, toy_checkpoint, monkeypatch):
    monkeypatch.setenv("CLIP_MODEL", toy_checkpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/nb.db")
    nb = _execute("08_change_the_model.ipynb", tmp_path)

    def shown(cell: int) -> str:
        return next(o for o in nb.cells[cell].outputs if o.get("output_type") == "execute_result")["data"]["text/plain"]

    first = re.search(r"'after': '(catalogue-[0-9a-f]{12})'", shown(4)).group(1)  # the first promotion's collection
    second = re.search(r"'after': '(catalogue-[0-9a-f]{12})'", shown(8)).group(1)
    assert second != first and f"'before': '{first}'" in shown(8)  # the random candidate got a collection of its own
    live = " ".join(shown(12).split())  # after the rollback: the first collection and models again
    assert live.startswith("(True, True, Live(") and f"collection='{first}'" in live
    rows = shown(13).splitlines()[1:]  # the search after the rollback, best first
    assert first in rows[0] and "red circle/" in rows[0]  # the toy's collection, and a red circle first
