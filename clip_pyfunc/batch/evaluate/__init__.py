"""`clip-pyfunc evaluate`: choose a checkpoint on your own data (data -> metrics -> run -> report).

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
