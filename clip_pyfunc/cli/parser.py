"""`clip-pyfunc`'s argument parser, and the settings its flags override.

A flag that overrides a setting names it in its `dest` (`--batch-size` -> "runtime.batch_size"),
so `commands.settings_of` builds every command's settings the same way: conf/clip_pyfunc.yaml (or --conf
FILE), then the flags that were given.
"""

from __future__ import annotations

import argparse

import clip_pyfunc.cli.commands as commands
from clip_pyfunc.runtime.engines import ENGINES


class _Formatter(argparse.HelpFormatter):
    """Shows a setting flag's value by its key alone: `--batch-size BATCH_SIZE`, not RUNTIME.BATCH_SIZE."""

    def _get_default_metavar_for_optional(self, action):
        return action.dest.rpartition(".")[2].upper()


def _add_settings_flags(p: argparse.ArgumentParser, names: bool = True) -> None:
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--model", dest="model.source", metavar="MODEL",
                   help="hub id or local directory of a transformers checkpoint (any supported family)")
    p.add_argument("--revision", dest="model.revision", help="hub branch, tag or commit")
    p.add_argument("--cache-dir", dest="model.cache_dir", help="Hugging Face hub cache directory")
    if names:
        p.add_argument("--text-name", dest="registry.text_name", help="registered name of the text model")
        p.add_argument("--image-name", dest="registry.image_name", help="registered name of the image model")
        p.add_argument("--alias", dest="registry.alias", help="alias to point at the new versions")
        p.add_argument("--with-combined", dest="registry.with_combined", action="store_true", default=None,
                       help="also register the combined image+text model (clip_image_text_embedding)")
        p.add_argument("--azure-compatible", dest="registry.azure_compatible", action="store_true", default=None,
                       help="register the combined model with normalize: false, as Azure ML's CLIP model answers")
    p.add_argument("--experiment", dest="registry.experiment", help="MLflow experiment for the logging run")
    p.add_argument("--int8", dest="registry.int8", action="store_true", default=None,
                   help="also quantize the image tower to int8 (OpenVINO + NNCF), offered where it holds cos >= 0.999")
    p.add_argument("--calibration-data", dest="registry.calibration_data", metavar="DIR_OR_TABLE",
                   help="int8 calibration images: a directory of image files or a Parquet table (default: samples)")
    p.add_argument("--all-engine-files", dest="registry.engine_files", action="store_const", const="all",
                   help="ship every engine's files (torch weights and OpenVINO IR) in each tower artifact, for a "
                        "model that must also run on the engine not chosen here (default: the chosen one's alone)")
    p.add_argument("--ir-weights", dest="registry.ir_weights", choices=["auto", "fp32", "fp16", "int8"],
                   help="the OpenVINO IR's weight storage (default auto: the smallest that held the gates, measured)")
    p.add_argument("--fixed-engine-order", dest="registry.engine_order", action="store_const", const="fixed",
                   help="rank engines and precisions by their fixed order instead of timing each on this machine "
                        "(default: measured; the fastest pair that held the fidelity gate is the default here where it ran "
                        "1.1x the fixed order's choice)")
    p.add_argument("--no-engines", dest="registry.engines", action="store_false", default=None,
                   help="register for torch alone: no OpenVINO IR and no engine/precision measurement (quicker; "
                        "`default` precision is then fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--device", dest="runtime.device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--engine", dest="runtime.engine",
                   help="auto | torch | openvino (openvino: the models are logged without torch)")
    p.add_argument("--precision", dest="runtime.precision", help="default | auto | fp32 | bf16 | fp16 | int8")
    p.add_argument("--batch-size", dest="runtime.batch_size", type=int, help="rows per forward pass")
    p.add_argument("--num-threads", dest="runtime.num_threads", type=int,
                   help="the engine's threads (torch intra-op, OpenVINO inference)")
    p.add_argument("--no-truncate-text", dest="runtime.truncate_text", action="store_false", default=None,
                   help="refuse text over the context length instead of truncating it")
    p.add_argument("--allow-urls", dest="runtime.allow_urls", action="store_true", default=None,
                   help="image cells may be https URLs, fetched by the model with address checks (see README)")


def _add_index_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--index-path", dest="index.path", metavar="INDEX_PATH",
                   help="embedded store folder, Qdrant Edge (default ./clip-index)")
    p.add_argument("--qdrant-url", dest="index.url", metavar="QDRANT_URL",
                   help="a Qdrant server instead of the embedded store (or QDRANT_URL)")
    p.add_argument("--collection", dest="index.collection",
                   help="collection name, or the alias that names the live collection (default clip)")
    p.add_argument("--hnsw-ef", dest="index.hnsw_ef", type=int, help="HNSW candidates per query (default 128)")


def _add_names_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-name", dest="registry.text_name", help="registered name of the text model")
    p.add_argument("--image-name", dest="registry.image_name", help="registered name of the image model")
    p.add_argument("--combined-name", dest="registry.combined_name", help="registered name of the combined model")
    p.add_argument("--classifier-name", dest="classifier.name", help="registered name of the classifier")


def build_parser() -> argparse.ArgumentParser:
    from clip_pyfunc.dev.random_checkpoint import ARCHITECTURES
    from clip_pyfunc.dev.samples import IMAGE_WORKLOADS

    parser = argparse.ArgumentParser(prog="clip-pyfunc", description=commands.__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("register", help="log and register the text and image models, move the alias")
    _add_settings_flags(p)
    p.set_defaults(func=commands.cmd_register)
    p = sub.add_parser("register-classifier", help="register the zero-shot image classifier (labels from a file)")
    _add_settings_flags(p, names=False)
    p.add_argument("--labels", help="label file (default from conf: conf/labels/wearables.yaml)")
    p.add_argument("--name", dest="classifier.name", help="registered model name (default clip_zero_shot_classifier)")
    p.add_argument("--alias", dest="classifier.alias", help="alias to point at the new version")
    p.add_argument("--top-k", dest="classifier.top_k", type=int, help="default of the top_k param (0 = every label)")
    p.add_argument("--dynamic-labels", action="store_true",
                   help="ship the text tower too, so requests may send candidate_labels / hypothesis_template")
    p.set_defaults(func=commands.cmd_register_classifier)
    p = sub.add_parser("demo", help="register, then embed sample texts and images through the registry")
    _add_settings_flags(p)
    p.set_defaults(func=commands.cmd_demo)
    p = sub.add_parser("index", help="upsert an embed-table output into a Qdrant collection, or copy the "
                                     "embedded store to a server")
    _add_index_flags(p)
    p.add_argument("--input", help="embed-table output: parquet path or table (id, embedding, error, ...)")
    p.add_argument("--model-uri", "-m", help="the model that made the embeddings")
    p.add_argument("--to-server", metavar="URL",
                   help="copy the embedded collection (--index-path, --collection) into a Qdrant server's "
                        "collection of the same name, instead of indexing a table")
    p.add_argument("--quantization", dest="index.quantization", choices=["none", "int8"],
                   help="int8 scalar quantization of the stored vectors, rescored (fixed when created)")
    p.add_argument("--id-col", help="id column (default: the table's first column)")
    p.add_argument("--catalogue", metavar="SOURCE",
                   help="what --input was embedded from (embed-table's --input), recorded so `promote` can embed "
                        "it again with another model")
    p.add_argument("--catalogue-format", default="auto", choices=["auto", "parquet", "images", "table"],
                   help="embed-table's --input-format for --catalogue")
    p.add_argument("--gc", action="store_true",
                   help="delete the collections no alias names (keeping the one a rollback needs)")
    _add_names_flags(p)  # --gc reads the promotion journal on the text model
    p.set_defaults(func=commands.cmd_index)
    p = sub.add_parser("promote", help="move a candidate's models and its collection to an alias together "
                                       "(builds and checks the collection first)")
    _add_index_flags(p)
    _add_names_flags(p)
    p.add_argument("--alias", default="candidate", help="the candidate's alias (default candidate)")
    p.add_argument("--to", help="the alias to move (default registry.alias, champion: the one the app serves)")
    p.add_argument("--table", help="the catalogue to embed when the candidate's collection is missing (what "
                                   "embed-table takes); default: the one the live collection records")
    p.add_argument("--input-format", default="auto", choices=["auto", "parquet", "images", "table"])
    p.add_argument("--input-col", help="column to embed (image folders: content)")
    p.add_argument("--id-col", help="key column (image folders: path)")
    p.add_argument("--embeddings-dir", help="where embed-table writes (default <index path>-embeddings)")
    p.add_argument("--master", help="Spark master URL (default local[*])")
    p.add_argument("--eval", metavar="DATA", help="labelled data: refuse a candidate worse than the champion")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="how much lower the candidate's headline metric may be (default 0.01)")
    p.add_argument("--force", action="store_true", help="promote a candidate --eval finds worse")
    p.add_argument("--eval-out", default="evaluate-out", help="evaluate's output folder")
    p.set_defaults(func=commands.cmd_promote)
    p = sub.add_parser("rollback", help="undo the newest promotion: the previous models and collection")
    _add_index_flags(p)
    _add_names_flags(p)
    p.add_argument("--to", help="the alias to put back (default registry.alias, champion)")
    p.set_defaults(func=commands.cmd_rollback)
    p = sub.add_parser("search", help="query a collection by words, a photo or a stored item; JSON lines out")
    _add_index_flags(p)
    p.add_argument("--text", help="words to search for")
    p.add_argument("--image", help="an image file to search by")
    p.add_argument("--like", help="the id of an indexed item to find items like")
    p.add_argument("--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="payload must match (repeatable)")
    p.set_defaults(func=commands.cmd_search)
    p = sub.add_parser("duplicates", help="near-duplicate groups in a collection; JSON lines out")
    _add_index_flags(p)
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity that links two items")
    p.add_argument("--k", type=int, default=10, help="nearest neighbours looked at per item (default 10)")
    p.add_argument("--linkage", choices=["complete", "transitive"], default="complete",
                   help="complete (default): every pair in a group is at least --threshold similar; transitive: "
                        "groups join through chains of pairs, so their ends may be far apart")
    p.set_defaults(func=commands.cmd_duplicates)
    p = sub.add_parser("app", help="the web page and JSON API (FastAPI on uvicorn) over the models and the index")
    _add_index_flags(p)
    p.add_argument("--host", dest="app.host", help="interface (default 127.0.0.1; anything else logs a warning)")
    p.add_argument("--port", dest="app.port", type=int, help="port (default 8000)")
    p.add_argument("--text-name", dest="registry.text_name",
                   help="registered name of the text model (default from conf: clip_text_embedding)")
    p.add_argument("--image-name", dest="registry.image_name",
                   help="registered name of the image model (default: clip_image_embedding)")
    p.add_argument("--alias", dest="registry.alias", help="alias of both models (default: champion)")
    p.add_argument("--classifier", dest="app.classifier",
                   help="classifier model URI (default models:/<classifier.name>@<alias>, "
                                        "left out when not registered)")
    p.add_argument("--no-classifier", action="store_true", help="run without /classify")
    p.add_argument("--no-index", action="store_true", help="run without /search even where an index exists")
    p.add_argument("--follow-seconds", dest="app.follow_seconds", type=float,
                   help="look at the registry this often and swap in a promotion's models and collection "
                        "(default 10; 0: only on POST /admin/reload)")
    p.add_argument("--api-key", dest="app.api_key", help="require X-API-Key (or set CLIP_PYFUNC_API_KEY)")
    p.set_defaults(func=commands.cmd_app)
    p = sub.add_parser("bench-promotion", help="a promotion measured: the app's answers through one (2,000 photos, "
                                               "8 clients), and the switch at 100,000 points")
    p.add_argument("--parts", nargs="+", choices=["availability", "switch"], default=["availability", "switch"])
    p.add_argument("--images", type=int, default=2000, help="availability: photos in the catalogue")
    p.add_argument("--points", type=int, default=100_000, help="switch: points per collection")
    p.add_argument("--rounds", type=int, default=6, help="switch: interleaved rounds (every other is a rollback)")
    p.add_argument("--output", help="also write the JSON here, after each part")
    p.set_defaults(func=commands.cmd_bench_promotion)
    p = sub.add_parser("bench-pixels", help="fast path vs each resize kind's reference processor, in levels")
    p.set_defaults(func=commands.cmd_bench_pixels)

    p = sub.add_parser("bench-env", help="the image model's torch environment vs its torch-free one: size, cold "
                                         "start, memory after requests (builds both with uv)")
    p.add_argument("--random-init", choices=sorted(ARCHITECTURES), default="vit-b-32")
    p.add_argument("--requests", type=int, default=100, help="single-image requests before memory is read")
    p.set_defaults(func=commands.cmd_bench_env)

    p = sub.add_parser("bench-footprint", help="cold start and resident memory of serve, mlflow models serve and the "
                                                "app on a random ViT-B/32, optionally against an earlier checkout")
    p.add_argument("--requests", type=int, default=1000, help="mixed requests per server before RSS is read")
    p.add_argument("--starts", type=int, default=3, help="server starts per server (cold start: their median)")
    p.add_argument("--baseline-pythonpath", metavar="DIR",
                   help="a checkout of an earlier clip-pyfunc: its servers run too, alternating with this one's")
    p.add_argument("--servers", nargs="+", default=["serve-image", "serve-text", "mlflow-image", "app"],
                   choices=["serve-image", "serve-text", "mlflow-image", "app"], help="which servers to measure")
    p.add_argument("--no-shapes", action="store_true",
                   help="skip the text tower's memory growth over random input shapes under each padding policy")
    p.add_argument("--output", help="also write the JSON here")
    p.set_defaults(func=commands.cmd_bench_footprint)
    p = sub.add_parser("bench-search", help="the embedded store at catalogue sizes (recall, latency, build, "
                                            "memory), beside qdrant-client's local mode; duplicates; the app")
    p.add_argument("--points", type=int, default=1_000_000, help="points of the large run (default 1,000,000)")
    p.add_argument("--compare-sizes", type=int, nargs="*", default=[20_000, 100_000],
                   help="sizes measured beside qdrant-client's local mode")
    p.add_argument("--efs", type=int, nargs="+", default=[32, 64, 128, 256], help="hnsw_ef values to measure")
    p.add_argument("--queries", type=int, default=200, help="timed queries per setting")
    p.add_argument("--parts", nargs="+", default=["large", "app", "compare", "shell", "duplicates", "iid"],
                   choices=["large", "iid", "compare", "shell", "duplicates", "app", "int8", "payload_m"],
                   help="what to run (int8, payload_m: store variants at the largest compare size)")
    p.add_argument("--quantization", choices=["none", "int8"], default="none",
                   help="the large low-dim store's quantization (int8: scalar, rescored)")
    p.add_argument("--output", help="also write the JSON here, after each part")
    p.set_defaults(func=commands.cmd_bench_search)
    p = sub.add_parser("serve", help="serve a registered model over REST (MLflow's scoring server, with "
                                      "/metrics, a body limit and honest health)")
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--model-uri", "-m", required=True, help="models:/name@alias, models:/name/1, runs:/..., a path")
    p.add_argument("--host", dest="serve.host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", "-p", dest="serve.port", type=int, help="port (default 5001)")
    p.add_argument("--workers", "-w", dest="serve.workers", type=int, help="uvicorn workers")
    p.add_argument("--timeout", "-t", dest="serve.timeout", type=int, help="seconds per request before a 504")
    p.add_argument("--env-manager", dest="serve.env_manager", help="local (default) | uv | virtualenv | conda")
    p.add_argument("--max-body-bytes", dest="serve.max_body_bytes", type=int,
                   help="largest request body; past it 413 without reading it (default 100 MiB)")
    p.add_argument("--no-metrics", dest="serve.metrics", action="store_const", const=False,
                   help="no Prometheus metrics at /metrics")
    p.add_argument("--max-queue-seconds", dest="serve.max_queue_seconds", type=float,
                   help="bounded queue: past this much waiting work, 429 with Retry-After (default 2)")
    p.add_argument("--stall-seconds", dest="serve.stall_seconds", type=float,
                   help="a forward past max(this, 10x its measured time) is stuck: health and waiting requests "
                        "503 (default 10)")
    p.add_argument("--drain-seconds", dest="serve.drain_seconds", type=float,
                   help="after SIGTERM, seconds accepted requests get to finish before the process exits (default 25)")
    p.add_argument("--no-warmup", dest="serve.warmup", action="store_const", const=False,
                   help="answer before running warm-up forwards")
    p.set_defaults(func=commands.cmd_serve)
    p = sub.add_parser("bench-serving", help="served vs in-process latency and throughput (one run)")
    p.add_argument("--model-uri", "-m", help="the registered model to measure (not with --batching)")
    p.add_argument("--batching", action="store_true",
                   help="batching across requests: concurrency sweep, batch_wait_ms, workers, metrics on/off and "
                        "memory under mixed hostile load, default engine and torch fp32, on a random checkpoint")
    p.add_argument("--random-init", default="vit-b-32", help="--batching: the checkpoint's architecture")
    p.add_argument("--output", help="--batching: write the JSON here, and the plot beside it (.png)")
    p.add_argument("--requests", type=int, default=40, help="timed single-image requests per side")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per throughput measurement")
    p.add_argument("--compare-workers", action="store_true",
                   help="1 worker x all threads against one worker per core x 1 thread (throughput, p50, memory)")
    p.set_defaults(func=commands.cmd_bench_serving)
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
    p.set_defaults(func=commands.cmd_embed_table)
    p = sub.add_parser("bench-classifier", help="classify request vs image-model request, same rows (one run)")
    p.add_argument("--random-init", default="vit-b-32", choices=sorted(ARCHITECTURES))
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--labels", type=int, default=20)
    p.set_defaults(func=commands.cmd_bench_classifier)
    p = sub.add_parser("bench-spark", help="embed-table's marginal rows/s and fixed cost vs in-process predict "
                                            "(interleaved command pairs, one run)")
    p.add_argument("--model-uri", "-m", required=True)
    p.add_argument("--rows", type=int, nargs=2, default=[128, 384], metavar=("SMALL", "LARGE"),
                   help="rows of the small and the large table")
    p.add_argument("--pairs", type=int, default=3, help="interleaved (small, large) command pairs")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--spark-udf", action="store_true",
                   help="also compare the same rows with stock mlflow.pyfunc.spark_udf (per-task reloads)")
    p.add_argument("--tasks", type=int, default=8, help="tasks for the --spark-udf comparison")
    p.set_defaults(func=commands.cmd_bench_spark)
    p = sub.add_parser("bench", help="end-to-end vs raw forward vs naive baseline; writes JSON and a PNG plot")
    p.add_argument("--model", help="hub id or local directory")
    p.add_argument("--random-init", choices=sorted(ARCHITECTURES), help="random weights with real shapes")
    p.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES),
                   help="engines timed as rows beside torch fp32 (each with every --precisions)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds per rate (the median is kept; default 5, "
                                               "3 with --peers)")
    p.add_argument("--int8", action="store_true", help="register with --int8 first (built-in calibration samples)")
    p.add_argument("--workloads", nargs="+", choices=sorted(IMAGE_WORKLOADS), help="image workloads (default all)")
    p.add_argument("--peers", action="store_true",
                   help="instead: the default against torch fp32, OpenVINO fp32, fastembed, sentence-transformers and "
                        "transformers by hand on the same weights, each in its own process (writes peers.json)")
    p.add_argument("--recall-images", type=int, default=0,
                   help="with --peers: recall@10 of bf16 queries against an fp32 index of this many varied images")
    p.set_defaults(func=commands.cmd_bench)
    p = sub.add_parser("evaluate", help="compare checkpoints on your own data (one MLflow run each)")
    p.add_argument("--conf", help="YAML settings file (default: conf/clip_pyfunc.yaml when present)")
    p.add_argument("--models", nargs="+", required=True,
                   help="registered model URIs (the other tower is paired through its run), directories or hub ids")
    p.add_argument("--data", required=True, help=".jsonl, .csv or .parquet file, or a folder of images")
    p.add_argument("--kind", default="auto", choices=["auto", "negatives", "pairs", "labels"])
    p.add_argument("--experiment", dest="evaluate.experiment", help="MLflow experiment (default from conf: evaluate)")
    p.add_argument("--out", default="evaluate-out", help="directory for evaluate.md and evaluate.png")
    p.add_argument("--tag-versions", action="store_true", help="put the headline metric on the registered versions")
    p.add_argument("--image-embeddings", help="parquet from embed-table (id, embedding) instead of embedding images")
    p.set_defaults(func=commands.cmd_evaluate)
    p = sub.add_parser("toy-checkpoint", help="train a tiny CLIP on generated coloured shapes (about a minute)")
    p.add_argument("path", help="directory to write (transformers CLIP format)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.cmd_toy_checkpoint)
    p = sub.add_parser("random-checkpoint", help="write a randomly initialised CLIP (stand-in for the hub)")
    p.add_argument("path", help="directory to write")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHITECTURES))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.cmd_random_checkpoint)
    for command in sub.choices.values():
        command.formatter_class = _Formatter
    return parser
