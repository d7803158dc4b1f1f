"""`clip-pyfunc evaluate`: choose a checkpoint on your own data.

Three kinds of data, read from JSONL, CSV or parquet (or a folder of images):

- "negatives": rows {image, positive, negatives[]} (the model-selection guide's format):
  accuracy (the positive caption beats every negative) and the mean margin;
- "pairs": rows {image, caption} (or a folder of images with captions.csv / captions.jsonl):
  recall@1/5/10 in both directions, MRR and median rank;
- "labels": rows {image, label} (or a folder with one subfolder per class): zero-shot top-1
  and top-5 accuracy with the conf's prompt templates and the family's own scoring.

Each model is one MLflow run in the `evaluate` experiment (params, metrics, the per-item table,
and the data set through `mlflow.data`, so runs compare on one digest); a Markdown table and a
PNG plot compare them. Bad rows (a missing file, an unreadable image, an empty caption) are
reported with their row and reason, skipped, and counted, never dropped silently.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from clip_pyfunc.decode import is_missing
from clip_pyfunc.errors import InvalidInput, ModelLoadError

FORMATS = ("negatives", "pairs", "labels")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(kw_only=True)
class EvalData:
    """A data set read for evaluation: one row per item, image references resolved to bytes or text.

    Attributes:
        kind: One of FORMATS.
        frame: The rows as read (what `mlflow.data` logs and digests).
        images: Per row: encoded image bytes, a base64 string, or an InvalidInput (missing file ...).
        texts: Per row: the caption, or the positive caption ("negatives"), or the label ("labels").
        negatives: Per row, "negatives" only: the negative captions.
        source: Where the data came from.
    """

    kind: str
    frame: object
    images: list
    texts: list
    negatives: list = field(default_factory=list)
    source: str = ""


def read_data(path: str, kind: str = "auto") -> EvalData:
    """Read an evaluation data set (see the module docstring for the formats).

    Raises:
        InvalidInput: The file cannot be read, or its columns fit no format (the message names them).
    """
    import pandas as pd

    if os.path.isdir(path):
        frame, base = _read_folder(path), path
    else:
        base = os.path.dirname(os.path.abspath(path))
        try:
            if path.endswith((".jsonl", ".json")):
                frame = pd.read_json(path, lines=path.endswith(".jsonl"), dtype=False)
            elif path.endswith(".csv"):
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            elif path.endswith(".parquet") or os.path.isdir(path):
                frame = pd.read_parquet(path)
            else:
                raise InvalidInput(f"--data {path!r}: use a .jsonl, .csv or .parquet file, or a folder of images")
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read --data {path!r}: {e}") from e
    columns = [str(c) for c in frame.columns]
    if kind == "auto":
        kind = ("negatives" if "negatives" in columns else "labels" if "label" in columns
                else "pairs" if "caption" in columns else None)
    needed = {"negatives": ("image", "positive", "negatives"), "pairs": ("image", "caption"),
              "labels": ("image", "label")}.get(kind)
    if needed is None or not set(needed) <= set(columns):
        raise InvalidInput(
            f"--data {path!r} has columns {columns}; expected one of: image+positive+negatives (negatives), "
            "image+caption (pairs), image+label (labels)"
        )
    texts = [_text(v) for v in frame[needed[1]].tolist()]
    data = EvalData(kind=kind, frame=frame, images=[_image_ref(v, base) for v in frame["image"].tolist()],
                    texts=texts, source=os.path.abspath(path))
    if kind == "negatives":
        data.negatives = [_negatives(v) for v in frame["negatives"].tolist()]
    return data


def _read_folder(path: str):
    """A folder: one subfolder per class (labels), or images with captions.csv / captions.jsonl (pairs)."""
    import pandas as pd

    for name in ("captions.jsonl", "captions.csv"):
        captions = os.path.join(path, name)
        if os.path.exists(captions):
            frame = (pd.read_json(captions, lines=True, dtype=False) if name.endswith(".jsonl")
                     else pd.read_csv(captions, dtype=str, keep_default_na=False))
            if "file" in frame.columns and "image" not in frame.columns:
                frame = frame.rename(columns={"file": "image"})
            return frame
    rows = [{"image": os.path.join(label, f), "label": label}
            for label in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, label))
            for f in sorted(os.listdir(os.path.join(path, label))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not rows:
        raise InvalidInput(f"folder {path!r} has neither class subfolders of images nor captions.csv/.jsonl")
    return pd.DataFrame(rows)


def _text(value):
    if is_missing(value) or not isinstance(value, str) or not value.strip():
        return InvalidInput(f"empty or missing text: {value!r}")
    return value


def _negatives(value):
    if isinstance(value, str):  # CSV: a JSON list, or captions separated by "|"
        value = json.loads(value) if value.strip().startswith("[") else value.split("|")
    values = list(value) if not is_missing(value) and hasattr(value, "__iter__") and not isinstance(value, str) else []
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        return InvalidInput(f"negatives must be a non-empty list of captions, got {value!r}")
    return values


def _image_ref(value, base: str):
    """A cell of the image column: a path (against the data's folder), base64, raw bytes, or a URL."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        return InvalidInput(f"empty image reference: {value!r}")
    if value.startswith(("http://", "https://")):
        return InvalidInput(f"image URL {value[:60]!r}: evaluate reads files and base64; download the images first")
    full = value if os.path.isabs(value) else os.path.join(base, value)
    if value[:5].lower() == "data:" or (len(value) > 255 and not os.path.exists(full)):
        return value  # base64 (too long for a file name): the decode stage checks it
    try:
        with open(full, "rb") as f:
            return f.read()
    except OSError as e:
        return InvalidInput(f"cannot read image file {full!r}: {e.strerror or e}")


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
        ModelLoadError: The URI's run holds no model of the other tower, or the checkpoint cannot be read.
    """
    start = time.perf_counter()
    if spec.startswith(("models:/", "runs:/")):
        text, image, versions, size = _load_registered(spec)
    else:
        text, image, size = _load_checkpoint(spec, workdir)
        versions = []
    info = text.info
    params = {"model": spec, "family": info.family, "embedding_dim": info.embedding_dim,
              "precision": text.runtime.precision, "scoring": info.scoring}
    return Candidate(name=spec, text=text, image=image, params=params, versions=versions,
                     load_seconds=time.perf_counter() - start, artifact_bytes=size)


def _load_registered(uri: str):
    import mlflow

    from clip_pyfunc.registry import model_kind, run_models

    kind = model_kind(uri)
    paired = run_models(uri)
    if kind not in ("text", "image") or not {"text", "image"} <= set(paired):
        missing = "text and image models" if kind not in ("text", "image") else f"{'text' if kind == 'image' else 'image'} model"
        raise ModelLoadError(f"{uri} is a {kind} model whose run holds no registered {missing} to pair it with; "
                             "pass the text or image model of a `clip-pyfunc register` run")
    uris = {"text": uri if kind == "text" else paired["text"], "image": uri if kind == "image" else paired["image"]}
    models = {tower: mlflow.pyfunc.load_model(u).unwrap_python_model() for tower, u in uris.items()}
    versions = [tuple(u[len("models:/"):].rsplit("/", 1)) for u in (paired["text"], paired["image"])
                if u.startswith("models:/") and "@" not in u]
    size = sum(_dir_bytes(mlflow.artifacts.download_artifacts(u)) for u in uris.values())
    return models["text"], models["image"], versions, size


def _load_checkpoint(source: str, workdir: str):
    from clip_pyfunc.checkpoint import export_towers, resolve_checkpoint
    from clip_pyfunc.registry import local_models

    checkpoint = resolve_checkpoint(source)
    _, dirs = export_towers(checkpoint, os.path.join(workdir, str(abs(hash(source)))))
    text, image = local_models(dirs)
    return text, image, sum(_dir_bytes(d) for d in dirs.values())


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def embed(model, values: list, batch_size: int, progress=None):
    """Embed cells in batches: (float32 (n, dim) with NaN rows for bad ones, {row: reason}, seconds)."""
    import numpy as np

    out, errors, seconds = [], {}, 0.0
    for start in range(0, len(values), batch_size):
        chunk = values[start : start + batch_size]
        cells = [None if isinstance(v, InvalidInput) else v for v in chunk]
        t = time.perf_counter()
        vectors, bad = model.embed_rows(cells, normalize=True)
        seconds += time.perf_counter() - t
        for e in bad:
            errors[start + e.row] = e.reason
        for j, v in enumerate(chunk):
            if isinstance(v, InvalidInput):
                errors[start + j] = v.reason
                vectors[j] = np.nan
        out.append(vectors)
        if progress is not None:
            progress.update(len(chunk))
    dim = out[0].shape[1] if out else 0
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), errors, seconds


def evaluate_candidate(candidate: Candidate, data: EvalData, templates, batch_size: int,
                       image_vectors=None, progress=None) -> dict:
    """Embed the data with one model pair and compute its metrics, per-item results and costs."""
    import numpy as np

    if image_vectors is None:
        images, bad_rows, image_seconds = embed(candidate.image, data.images, batch_size, progress)
    else:
        images, bad_rows, image_seconds = image_vectors, {i: "no precomputed embedding" for i in
                                                          np.flatnonzero(np.isnan(image_vectors).any(1))}, 0.0
        if progress is not None:
            progress.update(len(images))
    for row, t in enumerate(data.texts):
        if isinstance(t, InvalidInput):
            bad_rows.setdefault(row, t.reason)
    for row, n in enumerate(data.negatives):
        if isinstance(n, InvalidInput):
            bad_rows.setdefault(row, n.reason)
    good = [r for r in range(len(data.images)) if r not in bad_rows]
    text_rows = 0
    t0 = time.perf_counter()
    if data.kind == "labels":
        metrics, items, text_rows = _zero_shot(candidate, data, images, good, templates, batch_size)
    elif data.kind == "pairs":
        metrics, items, text_rows = _retrieval(candidate, data, images, good, batch_size)
    else:
        metrics, items, text_rows = _negatives_accuracy(candidate, data, images, good, batch_size)
    text_seconds = time.perf_counter() - t0
    n_images = len(data.images) - sum(1 for v in data.images if isinstance(v, InvalidInput))
    metrics.update({
        "rows": len(data.images), "rows_evaluated": len(good), "rows_skipped": len(bad_rows),
        "images_per_s": round(n_images / image_seconds, 2) if image_seconds else None,
        "texts_per_s": round(text_rows / text_seconds, 2) if text_seconds else None,
        "load_seconds": round(candidate.load_seconds, 2), "embedding_dim": candidate.params["embedding_dim"],
        "artifact_mib": round(candidate.artifact_bytes / 2**20, 2),
    })
    skipped = [{"row": int(r), "reason": reason} for r, reason in sorted(bad_rows.items())]
    return {"metrics": metrics, "items": items, "skipped": skipped}


def _texts(candidate, texts, batch_size):
    vectors, errors, _ = embed(candidate.text, texts, batch_size)
    if errors:  # captions were checked before; a tokenizer refusal is still a bad row, named
        raise InvalidInput(f"text rows could not be embedded: {sorted(errors.items())[:3]}")
    return vectors


def _zero_shot(candidate, data, images, good, templates, batch_size):
    """Top-1/top-5 over the data's labels: label vectors and scores exactly as the classifier makes them."""
    import numpy as np

    from clip_pyfunc.classifier import scores
    from clip_pyfunc.labels import label_set, label_vectors

    labels = sorted({data.texts[r] for r in good})
    vectors = label_vectors(candidate.text, label_set(labels, templates, where="evaluate labels"), batch_size)
    info = candidate.text.info
    top1 = top5 = 0
    items = []
    for r in good:
        row_scores = scores((vectors @ images[r])[None, :], info.scoring, info.scale, info.bias)[0]
        order = np.argsort(-row_scores, kind="stable")
        truth = labels.index(data.texts[r])
        rank = int(np.flatnonzero(order == truth)[0]) + 1
        top1 += rank == 1
        top5 += rank <= 5
        items.append({"row": r, "label": data.texts[r], "predicted": labels[order[0]], "rank": rank,
                      "score_of_label": round(float(row_scores[truth]), 6)})
    n = max(len(good), 1)
    return {"top1_accuracy": top1 / n, "top5_accuracy": top5 / n, "labels": len(labels)}, items, len(labels) * len(templates)


def _retrieval(candidate, data, images, good, batch_size):
    import numpy as np

    texts = _texts(candidate, [data.texts[r] for r in good], batch_size)
    sims = images[good] @ texts.T  # image i's own caption is text i
    ranks_i2t = [int((row > row[i]).sum()) + 1 for i, row in enumerate(sims)]
    ranks_t2i = [int((col > col[i]).sum()) + 1 for i, col in enumerate(sims.T)]
    metrics = {}
    for k in (1, 5, 10):
        metrics[f"image_to_text_recall_at_{k}"] = float(np.mean([r <= k for r in ranks_i2t])) if good else 0.0
        metrics[f"text_to_image_recall_at_{k}"] = float(np.mean([r <= k for r in ranks_t2i])) if good else 0.0
    metrics["image_to_text_mrr"] = float(np.mean([1 / r for r in ranks_i2t])) if good else 0.0
    metrics["text_to_image_mrr"] = float(np.mean([1 / r for r in ranks_t2i])) if good else 0.0
    metrics["image_to_text_median_rank"] = float(np.median(ranks_i2t)) if good else 0.0
    metrics["text_to_image_median_rank"] = float(np.median(ranks_t2i)) if good else 0.0
    items = [{"row": r, "caption": data.texts[r], "image_to_text_rank": a, "text_to_image_rank": b}
             for r, a, b in zip(good, ranks_i2t, ranks_t2i)]
    return metrics, items, len(good)


def _negatives_accuracy(candidate, data, images, good, batch_size):
    import numpy as np

    captions = [data.texts[r] for r in good]
    negatives = [data.negatives[r] for r in good]
    flat = captions + [n for ns in negatives for n in ns]
    vectors = _texts(candidate, flat, batch_size)
    pos, neg_at = vectors[: len(good)], len(good)
    correct, margins, items = 0, [], []
    for i, r in enumerate(good):
        p = float(images[r] @ pos[i])
        ns = vectors[neg_at : neg_at + len(negatives[i])] @ images[r]
        neg_at += len(negatives[i])
        margin = p - float(ns.max())
        correct += margin > 0
        margins.append(margin)
        items.append({"row": r, "positive": captions[i], "positive_score": round(p, 6),
                      "best_negative_score": round(float(ns.max()), 6), "correct": margin > 0})
    n = max(len(good), 1)
    return {"accuracy": correct / n, "mean_margin": float(np.mean(margins)) if margins else 0.0}, items, len(flat)


HEADLINE = {"negatives": "accuracy", "pairs": "image_to_text_recall_at_1", "labels": "top1_accuracy"}


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
    precomputed = _read_embeddings(image_embeddings, data) if image_embeddings else None
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
    _plot(results, data.kind, plot_path)
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


def _read_embeddings(path: str, data: EvalData):
    """Image vectors from an `embed-table` output (id = the data's image column, embedding)."""
    import numpy as np
    import pandas as pd

    table = pd.read_parquet(path)
    id_col = next((c for c in table.columns if c not in ("embedding", "error")), None)
    if id_col is None or "embedding" not in table.columns:
        raise InvalidInput(f"--image-embeddings {path!r} needs an id column and 'embedding'; got {list(table.columns)}")
    lookup = {str(k): v for k, v in zip(table[id_col], table["embedding"]) if v is not None}
    dim = len(next(iter(lookup.values()))) if lookup else 0
    out = np.full((len(data.frame), dim), np.nan, dtype=np.float32)
    for row, key in enumerate(data.frame["image"].astype(str)):
        if key in lookup:
            v = np.asarray(lookup[key], dtype=np.float32)
            out[row] = v / np.linalg.norm(v)
    return out


def markdown(results: list[dict], kind: str) -> str:
    """The comparison table: quality, speed, size."""
    quality = {"negatives": ["accuracy", "mean_margin"],
               "pairs": ["image_to_text_recall_at_1", "text_to_image_recall_at_1", "image_to_text_mrr"],
               "labels": ["top1_accuracy", "top5_accuracy"]}[kind]
    cost = ["images_per_s", "texts_per_s", "load_seconds", "embedding_dim", "artifact_mib", "rows_skipped"]
    head = ["model", "family"] + quality + cost
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["metrics"]
        cells = [r["model"], r["params"]["family"]] + [_fmt(m.get(k)) for k in quality + cost]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _plot(results: list[dict], kind: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = HEADLINE[kind]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        x, y = r["metrics"]["images_per_s"] or 0.0, r["metrics"][metric]
        ax.scatter([x], [y], s=40)
        ax.annotate(r["model"][-40:], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("images/s (this machine)")
    ax.set_ylabel(metric)
    ax.set_title("clip-pyfunc evaluate: quality vs speed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
