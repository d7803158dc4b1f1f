"""One request's path, a module per stage: decode (fetch for image URLs) -> preprocess -> encode ->
postprocess; score for zero-shot labels. No stage imports torch, transformers, mlflow or pyspark
at import.
"""
