"""Evaluation metrics of one model pair: zero-shot accuracy, retrieval recall and rank, negatives accuracy.

Every vector is made by the models' own `embed_rows`, and zero-shot labels are scored exactly as
the classifier scores them (models.classifier.label_vectors, stages.score.scores).
"""

from __future__ import annotations

import time

from clip_pyfunc.batch.evaluate.data import EvalData
from clip_pyfunc.errors import InvalidInput


def embed(model, values, batch_size: int, progress=None):
    """Embed cells in batches, taking one batch of `values` at a time (data.ImageRefs reads its files then).

    Returns:
        (float32 (n, dim) with NaN rows for bad ones, {row: reason}, seconds in the model, rows handed to it).
    """
    import numpy as np

    out, errors, seconds, handed = None, {}, 0.0, 0
    for start in range(0, len(values), batch_size):
        chunk = values[start : start + batch_size]
        cells = [None if isinstance(v, InvalidInput) else v for v in chunk]
        handed += len(cells) - cells.count(None)
        t = time.perf_counter()
        vectors, bad = model.embed_rows(cells, normalize=True)
        seconds += time.perf_counter() - t
        for e in bad:
            errors[start + e.row] = e.reason
        for j, v in enumerate(chunk):
            if isinstance(v, InvalidInput):
                errors[start + j] = v.reason
                vectors[j] = np.nan
        if out is None:  # filled in place: no list of batches to concatenate (twice the vectors) at the end
            out = np.empty((len(values), vectors.shape[1]), np.float32)
        out[start : start + len(chunk)] = vectors
        if progress is not None:
            progress.update(len(chunk))
        del chunk, cells  # this batch's encoded images go before the next batch is read
    return (out if out is not None else np.zeros((0, 0), np.float32)), errors, seconds, handed


def evaluate_candidate(candidate, data: EvalData, templates, batch_size: int,
                       image_vectors=None, progress=None) -> dict:
    """Embed the data with one model pair and compute its metrics, per-item results and costs."""
    import numpy as np

    if image_vectors is None:
        images, bad_rows, image_seconds, n_images = embed(candidate.image, data.images, batch_size, progress)
    else:
        n_images = 0  # nothing embedded here: no images/s
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
    vectors, errors, _, _ = embed(candidate.text, texts, batch_size)
    if errors:  # captions were checked before; a tokenizer refusal is still a bad row, named
        raise InvalidInput(f"text rows could not be embedded: {sorted(errors.items())[:3]}")
    return vectors


def _zero_shot(candidate, data, images, good, templates, batch_size):
    """Top-1/top-5 over the data's labels: label vectors and scores exactly as the classifier makes them."""
    import numpy as np

    from clip_pyfunc.artifacts.labels import label_set
    from clip_pyfunc.models.classifier import label_vectors
    from clip_pyfunc.stages.score import scores

    labels = sorted({data.texts[r] for r in good})
    vectors = label_vectors(candidate.text, label_set(labels, templates, where="evaluate labels"))
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
    ranks_i2t = _ranks(images[good], texts)  # image i's own caption is text i
    ranks_t2i = _ranks(texts, images[good])
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


def _ranks(queries, keys, block_elements: int = 1 << 22) -> list[int]:
    """Per query i, the rank of key i among all keys by dot product (1 = best; ties count in its favour).

    Taken a block of queries at a time, so memory is a (block, n) slice of the similarities
    (at most `block_elements` floats), never the whole (n, n) matrix.
    """
    import numpy as np

    n = len(queries)
    block = max(1, block_elements // max(n, 1))
    ranks = []
    for start in range(0, n, block):
        sims = queries[start : start + block] @ keys.T
        own = sims[np.arange(len(sims)), start + np.arange(len(sims))]  # from the same product: exact ties
        ranks.extend(int(r) + 1 for r in (sims > own[:, None]).sum(axis=1))
    return ranks


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
