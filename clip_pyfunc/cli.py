"""`clip-pyfunc` command line: a thin edge over the package's functions.

Settings come from conf/clip_pyfunc.yaml (or --conf FILE); flags override them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

from clip_pyfunc.errors import ClipPyfuncError, ModelLoadError


def _add_settings_flags(p: argparse.ArgumentParser, names: bool = True) -> None:
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--model", help="hub id or local directory of a transformers checkpoint (any supported family)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--cache-dir", help="Hugging Face hub cache directory")
    if names:
        p.add_argument("--text-name", help="registered name of the text model")
        p.add_argument("--image-name", help="registered name of the image model")
        p.add_argument("--alias", help="alias to point at the new versions")
        p.add_argument("--with-combined", action="store_true", default=None,
                       help="also register the combined image+text model (clip_image_text_embedding)")
        p.add_argument("--azure-compatible", action="store_true", default=None,
                       help="register the combined model with normalize: false, as Azure ML's CLIP model answers")
    p.add_argument("--experiment", help="MLflow experiment for the logging run")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", help="default | auto | fp32 | bf16 | fp16 | int8")
    p.add_argument("--batch-size", type=int, help="rows per forward pass")
    p.add_argument("--num-threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-truncate-text", dest="truncate_text", action="store_false", default=None,
                   help="refuse text over the context length instead of truncating it")
    p.add_argument("--allow-urls", action="store_true", default=None,
                   help="image cells may be https URLs, fetched by the model with address checks (see README)")


def _add_index_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--index-path", help="qdrant-client local mode directory (default ./clip-index)")
    p.add_argument("--qdrant-url", help="a Qdrant server instead of local mode (or QDRANT_URL)")
    p.add_argument("--collection", help="collection name (default clip)")


def _settings(args: argparse.Namespace):
    from clip_pyfunc.config import load_settings

    return load_settings(args.conf, {
        "model": {"source": args.model, "revision": args.revision, "cache_dir": args.cache_dir},
        "registry": {"text_name": args.text_name, "image_name": args.image_name, "alias": args.alias,
                     "experiment": args.experiment, "with_combined": args.with_combined,
                     "azure_compatible": args.azure_compatible},
        "runtime": {"device": args.device, "precision": args.precision, "batch_size": args.batch_size,
                    "num_threads": args.num_threads, "truncate_text": args.truncate_text,
                    "allow_urls": args.allow_urls},
    })


def _require_model(uri: str, flag: str) -> None:
    """Refuse a model URI MLflow cannot resolve before a server or a Spark job starts on it."""
    from clip_pyfunc.index import model_info

    model_info(uri, flag)


def cmd_register(args: argparse.Namespace) -> dict:
    from clip_pyfunc.registry import register_models

    return register_models(_settings(args))


def cmd_register_classifier(args: argparse.Namespace) -> dict:
    from clip_pyfunc.config import load_settings
    from clip_pyfunc.registry import register_classifier

    settings = load_settings(args.conf, {
        "model": {"source": args.model, "revision": args.revision, "cache_dir": args.cache_dir},
        "registry": {"experiment": args.experiment},
        "runtime": {"device": args.device, "precision": args.precision, "batch_size": args.batch_size,
                    "num_threads": args.num_threads, "truncate_text": args.truncate_text,
                    "allow_urls": args.allow_urls},
        "classifier": {"name": args.name, "alias": args.alias, "top_k": args.top_k},
    })
    return register_classifier(settings, args.labels, dynamic_labels=args.dynamic_labels)


def cmd_demo(args: argparse.Namespace) -> dict:
    """Register, then embed the sample texts and images through the registered models."""
    import mlflow
    import pandas as pd

    from clip_pyfunc.samples import SAMPLE_TEXTS, sample_images_b64, sample_names

    summary = cmd_register(args)
    text = mlflow.pyfunc.load_model(summary["models"]["text"]["uri"])
    image = mlflow.pyfunc.load_model(summary["models"]["image"]["uri"])
    t = text.predict(pd.DataFrame({"input": list(SAMPLE_TEXTS)}))
    i = image.predict(pd.DataFrame({"input": sample_images_b64()}))
    scores = t @ i.T
    summary["demo"] = {
        "texts": list(SAMPLE_TEXTS),
        "images": [f"{name} (JPEG)" for name in sample_names()],
        "best_image_for_text": {text: sample_names()[int(row.argmax())] for text, row in zip(SAMPLE_TEXTS, scores)},
        "text_vectors": list(t.shape),
        "image_vectors": list(i.shape),
        "dtype": str(t.dtype),
        "cosine_text_x_image": [[round(float(x), 4) for x in row] for row in scores],
    }
    return summary


def cmd_random_checkpoint(args: argparse.Namespace) -> dict:
    from clip_pyfunc.random_checkpoint import save_random_checkpoint

    try:
        path = save_random_checkpoint(args.path, args.arch, seed=args.seed)
    except OSError as e:
        raise ModelLoadError(f"cannot write the checkpoint to {args.path}: {e}") from e
    return {"path": path, "arch": args.arch,
            "warning": "random weights: a stand-in with real shapes, its vectors are meaningless"}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from clip_pyfunc import evaluate
    from clip_pyfunc.config import load_settings

    conf = load_settings(args.conf).evaluate
    for spec in args.models:
        if spec.startswith(("models:/", "runs:/")):
            _require_model(spec, "--models")
    result = evaluate.run(args.models, args.data, kind=args.kind, experiment=args.experiment or conf.experiment,
                          templates=conf.templates, batch_size=conf.batch_size, out_dir=args.out,
                          tag_versions=args.tag_versions, image_embeddings=args.image_embeddings)
    kind = result["data"]["kind"]
    print(open(result["table"]).read(), file=sys.stderr)
    result["headline_metric"] = evaluate.HEADLINE[kind]
    return result


def cmd_toy_checkpoint(args: argparse.Namespace) -> dict:
    from clip_pyfunc.toy_checkpoint import train_toy_checkpoint

    try:
        result = train_toy_checkpoint(args.path, seed=args.seed, log=lambda line: print(line, file=sys.stderr))
    except OSError as e:
        raise ModelLoadError(f"cannot write the checkpoint to {args.path}: {e}") from e
    result["warning"] = "toy checkpoint: trained only on generated coloured shapes; its vectors mean nothing else"
    return result


class JsonLines(list):
    """A command result printed as one JSON object per line (search hits, duplicate groups)."""


def _index_settings(args: argparse.Namespace):
    from clip_pyfunc.config import load_settings

    return load_settings(args.conf, {"index": {"path": args.index_path, "url": args.qdrant_url,
                                               "collection": args.collection}})


def _client(settings, must_exist: bool = False):
    from clip_pyfunc.index import open_client

    return open_client(settings.index.path, settings.index.url, must_exist=must_exist)


def cmd_index(args: argparse.Namespace) -> dict:
    from clip_pyfunc.index import index_table

    settings = _index_settings(args)
    client = _client(settings)
    try:
        return index_table(client, settings.index.collection, args.input, args.model_uri, id_col=args.id_col)
    finally:
        client.close()


def cmd_search(args: argparse.Namespace) -> JsonLines:
    from clip_pyfunc.index import Searcher

    settings = _index_settings(args)
    image = None
    if args.image:
        try:
            with open(args.image, "rb") as f:
                image = f.read()
        except OSError as e:
            raise ModelLoadError(f"--image {args.image}: {e}") from e
    client = _client(settings, must_exist=True)
    try:
        hits = Searcher(client, settings.index.collection).search(text=args.text, image=image, like=args.like,
                                                                 k=args.k, filters=args.filter)
    finally:
        client.close()
    return JsonLines(hits)


def cmd_duplicates(args: argparse.Namespace) -> JsonLines:
    from clip_pyfunc.index import duplicate_groups

    settings = _index_settings(args)
    client = _client(settings, must_exist=True)
    try:
        return JsonLines(duplicate_groups(client, settings.index.collection, args.threshold))
    finally:
        client.close()


def cmd_app(args: argparse.Namespace) -> dict:
    import dataclasses

    from clip_pyfunc import app
    from clip_pyfunc.config import load_settings

    settings = load_settings(args.conf, {
        "registry": {"text_name": args.text_name, "image_name": args.image_name, "alias": args.alias},
        "index": {"path": args.index_path, "url": args.qdrant_url, "collection": args.collection},
        "app": {"host": args.host, "port": args.port, "classifier": args.classifier, "api_key": args.api_key}})
    config, names = settings.app, settings.registry
    classifier = None if args.no_classifier else (
        config.classifier or f"models:/{settings.classifier.name}@{settings.classifier.alias}")
    config = dataclasses.replace(config, api_key=config.api_key or os.environ.get("CLIP_PYFUNC_API_KEY"))
    app.configure_logging()  # what load() warns about (no index, no classifier) carries the app's format
    loaded = app.load(f"models:/{names.text_name}@{names.alias}", f"models:/{names.image_name}@{names.alias}",
                      classifier, classifier_required=bool(config.classifier),  # the conf default may be absent
                      index=None if args.no_index else settings.index)
    app.run(loaded, config)  # serves until stopped
    return {}


def cmd_serve(args: argparse.Namespace) -> dict:
    from clip_pyfunc.config import load_settings
    from clip_pyfunc.serve import serve

    settings = load_settings(args.conf, {"serve": {"host": args.host, "port": args.port, "workers": args.workers,
                                                   "timeout": args.timeout, "env_manager": args.env_manager}})
    _require_model(args.model_uri, "--model-uri")  # before this process becomes the server
    serve(args.model_uri, settings.serve)  # does not return
    return {}


def cmd_bench_serving(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import serving

    _require_model(args.model_uri, "--model-uri")
    if args.compare_workers:
        return serving.compare_workers(args.model_uri, seconds=args.seconds)
    return serving.run(args.model_uri, requests_n=args.requests, seconds=args.seconds)


def cmd_embed_table(args: argparse.Namespace) -> dict:
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from pyspark.errors import AnalysisException

    from clip_pyfunc.spark import (EmbedJobError, is_local, planned_master, prepare_model, run_job, spark_session,
                                   stop_session)

    # Found out before the JVM starts: a model MLflow cannot find, an input path that is not there.
    _require_model(args.model_uri, "--model-uri")
    # Only a local job reads this machine's disk; a scheme (dbfs:, s3://) or a cluster's default file
    # system is Spark's to resolve, and its AnalysisException below names what is missing.
    looks_like_path = "/" in args.input or args.input.endswith(".parquet")  # table names have neither
    has_scheme = re.match(r"^[A-Za-z][\w+.-]*:", args.input) is not None
    if (args.input_format != "table" and looks_like_path and not has_scheme and is_local(planned_master(args.master))
            and not os.path.exists(args.input)):
        raise EmbedJobError(f"--input {args.input}: no such file or folder; give a parquet path, a folder of "
                            "images or a table name")
    overrides = {k: v for k, v in (("precision", args.precision), ("batch_size", args.batch_size)) if v is not None}
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-model-") as copy_dir, ThreadPoolExecutor(1) as pool:
        # A local job's workers share this disk: copy the model there while the JVM starts.
        model = pool.submit(prepare_model, args.model_uri, copy_dir) if is_local(planned_master(args.master)) else None
        spark = spark_session(args.master, batch_rows=args.arrow_batch_rows)
        try:
            return run_job(spark, model_uri=model.result() if model else args.model_uri, source=args.input,
                           output=args.output, id_col=args.id_col, input_col=args.input_col,
                           input_format=args.input_format, fail_on_error=args.fail_on_error, model_config=overrides)
        except AnalysisException as e:  # no such table or path, as Spark reads it
            reason = " ".join(str(e).split())
            raise EmbedJobError(f"--input {args.input} / --output {args.output}: {reason[:300]}") from e
        finally:
            stop_session(spark)


def cmd_bench_classifier(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import classifier

    return classifier.run(args.random_init, rows=args.rows, labels=args.labels)


def cmd_bench_spark(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import spark

    _require_model(args.model_uri, "--model-uri")
    return spark.run(args.model_uri, rows=args.rows, master=args.master, tasks=args.tasks)


def cmd_bench_search(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import search

    return search.run(sizes=args.sizes, requests_n=args.requests)


def cmd_bench_pixels(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import fast_path

    return fast_path.run()


def cmd_bench(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import bench

    if bool(args.model) == bool(args.random_init):
        raise ModelLoadError("pass exactly one of --model (hub id or directory) and --random-init NAME")
    result = bench.run(args.model, args.random_init, out_dir=args.out,
                       batch_sizes=tuple(args.batch_sizes), precisions=tuple(args.precisions),
                       workloads=args.workloads)
    print(bench.table(result), file=sys.stderr)
    return result


def build_parser() -> argparse.ArgumentParser:
    from clip_pyfunc.random_checkpoint import ARCHITECTURES
    from clip_pyfunc.benchmarks.bench import IMAGE_WORKLOADS

    parser = argparse.ArgumentParser(prog="clip-pyfunc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("register", help="log and register the text and image models, move the alias")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_register)
    p = sub.add_parser("register-classifier", help="register the zero-shot image classifier (labels from a file)")
    _add_settings_flags(p, names=False)
    p.add_argument("--labels", help="label file (default from conf: conf/labels/wearables.yaml)")
    p.add_argument("--name", help="registered model name (default clip_zero_shot_classifier)")
    p.add_argument("--alias", help="alias to point at the new version")
    p.add_argument("--top-k", type=int, help="default of the top_k param (0 = every label)")
    p.add_argument("--dynamic-labels", action="store_true",
                   help="ship the text tower too, so requests may send candidate_labels / hypothesis_template")
    p.set_defaults(func=cmd_register_classifier)
    p = sub.add_parser("demo", help="register, then embed sample texts and images through the registry")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("index", help="upsert an embed-table output into a Qdrant collection")
    _add_index_flags(p)
    p.add_argument("--input", required=True, help="embed-table output: parquet path or table (id, embedding, error, ...)")
    p.add_argument("--model-uri", "-m", required=True, help="the model that made the embeddings")
    p.add_argument("--id-col", help="id column (default: the table's first column)")
    p.set_defaults(func=cmd_index)
    p = sub.add_parser("search", help="query a collection by words, a photo or a stored item; JSON lines out")
    _add_index_flags(p)
    p.add_argument("--text", help="words to search for")
    p.add_argument("--image", help="an image file to search by")
    p.add_argument("--like", help="the id of an indexed item to find items like")
    p.add_argument("--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="payload must match (repeatable)")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("duplicates", help="near-duplicate groups in a collection; JSON lines out")
    _add_index_flags(p)
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity that links two items")
    p.set_defaults(func=cmd_duplicates)
    p = sub.add_parser("app", help="the web page and JSON API (FastAPI on uvicorn) over the models and the index")
    _add_index_flags(p)
    p.add_argument("--host", help="interface (default 127.0.0.1; anything else logs a warning)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--text-name", help="registered name of the text model (default from conf: clip_text_embedding)")
    p.add_argument("--image-name", help="registered name of the image model (default: clip_image_embedding)")
    p.add_argument("--alias", help="alias of both models (default: champion)")
    p.add_argument("--classifier", help="classifier model URI (default models:/<classifier.name>@<alias>, "
                                        "left out when not registered)")
    p.add_argument("--no-classifier", action="store_true", help="run without /classify")
    p.add_argument("--no-index", action="store_true", help="run without /search even where an index exists")
    p.add_argument("--api-key", help="require X-API-Key (or set CLIP_PYFUNC_API_KEY)")
    p.set_defaults(func=cmd_app)
    p = sub.add_parser("bench-pixels", help="fast path vs each resize kind's reference processor, in levels")
    p.set_defaults(func=cmd_bench_pixels)

    p = sub.add_parser("bench-search", help="search latency in Qdrant local mode; the app's added latency")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 20000], help="points per collection")
    p.add_argument("--requests", type=int, default=30, help="timed requests per app endpoint")
    p.set_defaults(func=cmd_bench_search)
    p = sub.add_parser("serve", help="serve a registered model over REST (mlflow models serve)")
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--model-uri", "-m", required=True, help="models:/name@alias, models:/name/1, runs:/..., a path")
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, help="port (default 5001)")
    p.add_argument("--workers", "-w", type=int, help="uvicorn workers")
    p.add_argument("--timeout", "-t", type=int, help="seconds per request before a 504")
    p.add_argument("--env-manager", help="local (default) | uv | virtualenv | conda")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("bench-serving", help="served vs in-process latency and throughput (one run)")
    p.add_argument("--model-uri", "-m", required=True)
    p.add_argument("--requests", type=int, default=40, help="timed single-image requests per side")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per throughput measurement")
    p.add_argument("--compare-workers", action="store_true",
                   help="1 worker x all threads against one worker per core x 1 thread (throughput, p50, memory)")
    p.set_defaults(func=cmd_bench_serving)
    p = sub.add_parser("embed-table", help="embed a table (parquet, image directory or table) with Spark")
    p.add_argument("--model-uri", "-m", required=True, help="e.g. models:/clip_image_embedding@champion")
    p.add_argument("--input", required=True, help="parquet path, directory of image files, or table name")
    p.add_argument("--input-format", default="auto", choices=["auto", "parquet", "images", "table"])
    p.add_argument("--input-col", help="column to embed (image directories: content)")
    p.add_argument("--id-col", help="key column kept in the output (image directories: path)")
    p.add_argument("--output", required=True, help="parquet path, or a table name (saveAsTable)")
    p.add_argument("--master", help="Spark master URL (default local[*]; spark-submit's when submitted)")
    p.add_argument("--fail-on-error", action="store_true", help="any bad row fails the job; nothing is written")
    p.add_argument("--precision", help="override the model's precision (fp32, bf16, int8, auto, ...)")
    p.add_argument("--batch-size", type=int, help="override the model's forward batch size")
    p.add_argument("--arrow-batch-rows", type=int, default=64, help="rows per Arrow batch sent to Python")
    p.set_defaults(func=cmd_embed_table)
    p = sub.add_parser("bench-classifier", help="classify request vs image-model request, same rows (one run)")
    p.add_argument("--random-init", default="vit-b-32", choices=sorted(ARCHITECTURES))
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--labels", type=int, default=20)
    p.set_defaults(func=cmd_bench_classifier)
    p = sub.add_parser("bench-spark", help="Spark job rows/s vs in-process predict (one run)")
    p.add_argument("--model-uri", "-m", required=True)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--tasks", type=int, default=8, help="tasks for the per-task reload comparison")
    p.set_defaults(func=cmd_bench_spark)
    p = sub.add_parser("bench", help="end-to-end vs raw forward vs naive baseline; writes JSON and a PNG plot")
    p.add_argument("--model", help="hub id or local directory")
    p.add_argument("--random-init", choices=sorted(ARCHITECTURES), help="random weights with real shapes")
    p.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    p.add_argument("--workloads", nargs="+", choices=sorted(IMAGE_WORKLOADS), help="image workloads (default all)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("evaluate", help="compare checkpoints on your own data (one MLflow run each)")
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--models", nargs="+", required=True,
                   help="registered model URIs (the other tower is paired through its run), directories or hub ids")
    p.add_argument("--data", required=True, help=".jsonl, .csv or .parquet file, or a folder of images")
    p.add_argument("--kind", default="auto", choices=["auto", "negatives", "pairs", "labels"])
    p.add_argument("--experiment", help="MLflow experiment (default from conf: evaluate)")
    p.add_argument("--out", default="evaluate-out", help="directory for evaluate.md and evaluate.png")
    p.add_argument("--tag-versions", action="store_true", help="put the headline metric on the registered versions")
    p.add_argument("--image-embeddings", help="parquet from embed-table (id, embedding) instead of embedding images")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("toy-checkpoint", help="train a tiny CLIP on generated coloured shapes (about a minute)")
    p.add_argument("path", help="directory to write (transformers CLIP format)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_toy_checkpoint)
    p = sub.add_parser("random-checkpoint", help="write a randomly initialised CLIP (stand-in for the hub)")
    p.add_argument("path", help="directory to write")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHITECTURES))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_checkpoint)
    return parser


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout while the command runs to stderr instead.

    MLflow writes "View run ... at: http://..." to stdout with an HTTP tracking server, and
    subprocesses (the Spark JVM, environment builders) inherit file descriptor 1, so both
    `sys.stdout` and the descriptor itself are pointed at stderr; only the JSON result is
    written to the real stdout afterwards.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; print the result as JSON on stdout (and nothing else there), errors on stderr."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("serve", "app"):  # long-running servers; they print no JSON
            args.func(args)
            return 0
        with stdout_to_stderr():
            result = args.func(args)
    except ClipPyfuncError as e:  # what the user sent or configured: one line, exit 2
        message = " ".join(str(e).splitlines())  # a library's reason may span lines
        print(f"clip-pyfunc {args.command}: error: {message}", file=sys.stderr)
        return 2
    if isinstance(result, JsonLines):
        for item in result:
            print(json.dumps(item))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
