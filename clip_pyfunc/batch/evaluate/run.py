"""Run an evaluation: load each candidate model pair, score it (metrics), log one MLflow run each, report."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from clip_pyfunc.batch.evaluate.data import read_embeddings, read_data
from clip_pyfunc.batch.evaluate.metrics import HEADLINE, evaluate_candidate
from clip_pyfunc.batch.evaluate.report import plot, markdown
from clip_pyfunc.errors import InvalidInput, ModelLoadError
from clip_pyfunc.registry.lookup import local_models, model_info, model_kind, require_same_space, run_models


@dataclass(kw_only=True)
class Candidate:
    """One model pair under evaluation: its two towers (clip-pyfunc pyfunc models) and what describes it."""

    name: str
    text: object
    image: object
    params: dict
    versions: list = field(default_factory=list)  # (registered name, version) to tag
    load_seconds: float = 0.0
    artifact_bytes: int = 0


def load_candidate(spec: str, workdir: str) -> Candidate:
    """Load a model pair from a registered model URI (paired through its run), a directory or a hub id.

    Raises:
        ModelLoadError: The URI's run holds no model of the other tower or one of another embedding space, or
            the checkpoint cannot be read.
    """
    start = time.perf_counter()
    if spec.startswith(("models:/", "runs:/")):
        text, image, versions, size = _load_registered(spec)
    else:
        text, image, size = _load_checkpoint(spec, workdir)
        versions = []
    info = text.info
    params = {"model": spec, "family": info.family, "embedding_dim": info.embedding_dim,
              "engine": text.runtime.engine, "precision": text.runtime.precision, "scoring": info.scoring}
    return Candidate(name=spec, text=text, image=image, params=params, versions=versions,
                     load_seconds=time.perf_counter() - start, artifact_bytes=size)


def _load_registered(uri: str):
    import mlflow

    kind = model_kind(uri)
    paired = run_models(uri)
    if kind not in ("text", "image") or not {"text", "image"} <= set(paired):
        missing = "text and image models" if kind not in ("text", "image") else f"{'text' if kind == 'image' else 'image'} model"
        raise ModelLoadError(f"{uri} is a {kind} model whose run holds no registered {missing} to pair it with; "
                             "pass the text or image model of a `clip-pyfunc register` run")
    uris = {"text": uri if kind == "text" else paired["text"], "image": uri if kind == "image" else paired["image"]}
    require_same_space(model_info(uris["text"], "text model"), model_info(uris["image"], "image model"),
                       uris["text"], uris["image"])
    models = {tower: mlflow.pyfunc.load_model(u).unwrap_python_model() for tower, u in uris.items()}
    versions = [tuple(u[len("models:/"):].rsplit("/", 1)) for u in (paired["text"], paired["image"])
                if u.startswith("models:/") and "@" not in u]
    size = sum(_dir_bytes(mlflow.artifacts.download_artifacts(u)) for u in uris.values())
    return models["text"], models["image"], versions, size


def _load_checkpoint(source: str, workdir: str):
    from clip_pyfunc.artifacts.checkpoint import resolve_checkpoint
    from clip_pyfunc.artifacts.towers import export_towers

    checkpoint = resolve_checkpoint(source)
    _, dirs = export_towers(checkpoint, os.path.join(workdir, str(abs(hash(source)))))
    text, image = local_models(dirs)
    return text, image, sum(_dir_bytes(d) for d in dirs.values())


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run(models: list[str], data_path: str, *, kind: str = "auto", experiment: str = "evaluate",
        templates=("a photo of a {}.",), batch_size: int = 256, out_dir: str = "evaluate-out",
        tag_versions: bool = False, image_embeddings: str | None = None) -> dict:
    """Evaluate each model on the data, log one MLflow run each, write the comparison.

    Returns:
        A JSON-ready summary: the data set (kind, rows, digest), one entry per model (run id,
        metrics, skipped rows), and the paths of the Markdown table and the plot.

    Raises:
        InvalidInput: Bad data or arguments. ModelLoadError: A model cannot be loaded.
    """
    import tempfile

    import mlflow
    from tqdm import tqdm

    data = read_data(data_path, kind)
    if image_embeddings and len(models) != 1:
        raise InvalidInput("--image-embeddings belong to one model: pass exactly one --models with them")
    precomputed = read_embeddings(image_embeddings, data) if image_embeddings else None
    dataset = mlflow.data.from_pandas(_loggable(data.frame), source=data.source, name=os.path.basename(data.source))
    os.makedirs(out_dir, exist_ok=True)
    mlflow.set_experiment(experiment)
    results = []
    with tempfile.TemporaryDirectory(prefix="clip-evaluate-") as workdir:
        for spec in models:
            candidate = load_candidate(spec, workdir)
            with tqdm(total=len(data.images), desc=f"evaluate {spec}", file=sys.stderr, unit="img") as bar:
                result = evaluate_candidate(candidate, data, templates, batch_size, precomputed, bar)
            with mlflow.start_run(run_name=f"evaluate {spec}") as run:
                mlflow.log_input(dataset, context="evaluation")
                mlflow.log_params({**candidate.params, "data_kind": data.kind})
                mlflow.log_metrics({k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))})
                if result["items"]:
                    mlflow.log_table(_table(result["items"]), artifact_file="per_item.json")
                mlflow.log_dict({"skipped": result["skipped"]}, "skipped_rows.json")
            if tag_versions:
                from mlflow import MlflowClient

                headline = HEADLINE[data.kind]
                for name, version in candidate.versions:
                    MlflowClient().set_model_version_tag(name, version, f"eval_{headline}",
                                                         f"{result['metrics'][headline]:.4f} on {dataset.name} "
                                                         f"({dataset.digest})")
            results.append({"model": spec, "run_id": run.info.run_id, "params": candidate.params, **result})
    table_path = os.path.join(out_dir, "evaluate.md")
    with open(table_path, "w", encoding="utf-8") as f:
        f.write(markdown(results, data.kind) + "\n")
    plot_path = os.path.join(out_dir, "evaluate.png")
    plot(results, data.kind, plot_path)
    return {"data": {"source": data.source, "kind": data.kind, "rows": len(data.images), "digest": dataset.digest},
            "models": [{"model": r["model"], "run_id": r["run_id"], "metrics": r["metrics"],
                        "skipped": r["skipped"]} for r in results],
            "table": table_path, "plot": plot_path}


def _loggable(frame):
    """The frame with byte cells shown as their length, so mlflow.data can describe and digest it."""
    return frame.apply(lambda col: col.map(lambda v: f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else
                                           (json.dumps(list(v)) if hasattr(v, "__len__") and not isinstance(v, str)
                                            else v)))


def _table(items):
    import pandas as pd

    return pd.DataFrame(items)


