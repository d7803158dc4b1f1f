"""Serving: `mlflow models serve` for one model (serve), and the web page and JSON API over the
models and the index (app).
"""
