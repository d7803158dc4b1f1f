"""`clip-pyfunc bench-classifier`: what a classify request costs over the image model's request.

Both models are registered from one checkpoint and answer the same rows in one process, in
interleaved rounds (bench._rates), so the difference per row is the classifier's own cost:
the label matrix product, the scoring and building the labels/scores columns.
"""

from __future__ import annotations

import os


def run(random_init: str = "vit-b-32", rows: int = 32, labels: int = 20, rounds: int = 5) -> dict:
    """Time image-model predict vs classifier predict on the same base64 JPEGs; return ms per row."""
    import mlflow
    import yaml

    from clip_pyfunc.benchmarks.bench import _images, _rates
    from clip_pyfunc.benchmarks.common import machine_info, temporary_registry
    from clip_pyfunc.settings import load_settings
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint
    from clip_pyfunc.registry import register_classifier, register_models

    tmp = temporary_registry("clip-bench-clf-")
    path = save_random_checkpoint(os.path.join(tmp, random_init), random_init)
    label_file = os.path.join(tmp, "labels.yaml")
    with open(label_file, "w", encoding="utf-8") as f:
        yaml.safe_dump({"name": "bench", "labels": [f"category {i}" for i in range(labels)]}, f)
    settings = load_settings(None, {"model": {"source": path}})
    image_uri = register_models(settings)["models"]["image"]["uri"]
    clf_uri = register_classifier(settings, label_file)["models"]["classifier"]["uri"]
    image, clf = mlflow.pyfunc.load_model(image_uri), mlflow.pyfunc.load_model(clf_uri)
    values = _images("jpeg_640x480", rows)
    rates = _rates({"image_model": lambda: image.predict(values),
                    "classifier": lambda: clf.predict(values, params={"top_k": 3})}, rows, rounds=rounds)
    ms = {k: 1000.0 / v for k, v in rates.items()}
    return {"benchmark": "bench-classifier", "checkpoint": f"random-init {random_init}", "random_weights": True,
            "machine": machine_info(), "rows_per_request": rows, "labels": labels, "workload": "jpeg_640x480",
            "image_model_ms_per_row": round(ms["image_model"], 3), "classifier_ms_per_row": round(ms["classifier"], 3),
            "classifier_added_ms_per_row": round(ms["classifier"] - ms["image_model"], 3)}
