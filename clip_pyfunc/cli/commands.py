"""`clip-pyfunc` commands: each a thin edge over the package's functions, returning its JSON result.

Settings come from conf/clip_pyfunc.yaml (or --conf FILE); flags override them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from clip_pyfunc.artifacts.checkpoint import RANDOM_WARNING, TOY_WARNING
from clip_pyfunc.errors import InvalidInput, ModelLoadError


def settings_of(args: argparse.Namespace):
    """The command's settings: the conf file, then every flag whose `dest` names a setting ("section.key")."""
    from clip_pyfunc.settings import load_settings

    overrides: dict[str, dict] = {}
    for dest, value in vars(args).items():
        section, dot, key = dest.partition(".")
        if dot:
            overrides.setdefault(section, {})[key] = value
    return load_settings(getattr(args, "conf", None), overrides)


def _require_model(uri: str, flag: str) -> None:
    """Refuse a model URI MLflow cannot resolve before a server or a Spark job starts on it."""
    from clip_pyfunc.registry.lookup import model_info

    model_info(uri, flag)


def cmd_register(args: argparse.Namespace) -> dict:
    from clip_pyfunc.registry import register_models

    return register_models(settings_of(args))


def cmd_register_classifier(args: argparse.Namespace) -> dict:
    from clip_pyfunc.registry import register_classifier

    settings = settings_of(args)
    return register_classifier(settings, args.labels, dynamic_labels=args.dynamic_labels)


def cmd_demo(args: argparse.Namespace) -> dict:
    """Register, then embed the sample texts and images through the registered models."""
    import mlflow
    import pandas as pd

    from clip_pyfunc.dev.samples import SAMPLE_TEXTS, sample_images_b64, sample_names

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
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint

    try:
        path = save_random_checkpoint(args.path, args.arch, seed=args.seed)
    except OSError as e:
        raise ModelLoadError(f"cannot write the checkpoint to {args.path}: {e}") from e
    return {"path": path, "arch": args.arch, "warning": RANDOM_WARNING}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from clip_pyfunc.batch.evaluate.metrics import HEADLINE
    from clip_pyfunc.batch.evaluate.run import run

    conf = settings_of(args).evaluate
    for spec in args.models:
        if spec.startswith(("models:/", "runs:/")):
            _require_model(spec, "--models")
    result = run(args.models, args.data, kind=args.kind, experiment=conf.experiment, templates=conf.templates,
                 batch_size=conf.batch_size, out_dir=args.out, tag_versions=args.tag_versions,
                 image_embeddings=args.image_embeddings)
    kind = result["data"]["kind"]
    print(open(result["table"]).read(), file=sys.stderr)
    result["headline_metric"] = HEADLINE[kind]
    return result


def cmd_toy_checkpoint(args: argparse.Namespace) -> dict:
    from clip_pyfunc.dev.toy_checkpoint import train_toy_checkpoint

    try:
        result = train_toy_checkpoint(args.path, seed=args.seed, log=lambda line: print(line, file=sys.stderr))
    except OSError as e:
        raise ModelLoadError(f"cannot write the checkpoint to {args.path}: {e}") from e
    result["warning"] = TOY_WARNING
    return result


class JsonLines(list):
    """A command result printed as one JSON object per line (search hits, duplicate groups)."""


def _store(settings, must_exist: bool = False):
    from clip_pyfunc.search.store import open_store

    return open_store(settings.index, must_exist=must_exist)


def cmd_index(args: argparse.Namespace) -> dict:
    from clip_pyfunc.search.index import index_space

    settings = settings_of(args)
    if args.to_server:
        if args.input or args.model_uri:
            raise InvalidInput("--to-server copies the embedded store as it is: give it without --input/--model-uri")
        from clip_pyfunc.search.store import copy_to_server

        return copy_to_server(settings.index, args.to_server)
    if args.gc:
        if args.input or args.model_uri:
            raise InvalidInput("--gc deletes the collections no alias names: give it without --input/--model-uri")
        from clip_pyfunc.promotion import collect_garbage

        return collect_garbage(settings)
    missing = [flag for flag, value in (("--input", args.input), ("--model-uri", args.model_uri)) if not value]
    if missing:
        raise InvalidInput(f"index needs {' and '.join(missing)} (or --to-server URL to copy the embedded store, "
                           "or --gc)")
    catalogue = None if not args.catalogue else {"input": args.catalogue, "input_format": args.catalogue_format,
                                                 "id_col": args.id_col, "input_col": None}
    return index_space(settings.index, args.input, args.model_uri, id_col=args.id_col, catalogue=catalogue)


def cmd_promote(args: argparse.Namespace) -> dict:
    from clip_pyfunc.promotion import promote

    if not 0 <= args.tolerance < float("inf"):  # nan compares false both ways: it would turn the gate off
        raise InvalidInput(f"--tolerance must be a number, 0 or more, got {args.tolerance}")
    return promote(settings_of(args), source=args.alias, target=args.to, table=args.table,
                   input_format=args.input_format, id_col=args.id_col, input_col=args.input_col,
                   eval_data=args.eval, tolerance=args.tolerance, force=args.force,
                   embeddings_dir=args.embeddings_dir, master=args.master, eval_out=args.eval_out)


def cmd_rollback(args: argparse.Namespace) -> dict:
    from clip_pyfunc.promotion import rollback

    return rollback(settings_of(args), target=args.to)


def cmd_search(args: argparse.Namespace) -> JsonLines:
    from clip_pyfunc.search.query import Searcher

    settings = settings_of(args)
    image = None
    if args.image:
        try:
            with open(args.image, "rb") as f:
                image = f.read()
        except OSError as e:
            raise ModelLoadError(f"--image {args.image}: {e}") from e
    with _store(settings, must_exist=True) as store:
        hits = Searcher(store).search(text=args.text, image=image, like=args.like, k=args.k, filters=args.filter)
    return JsonLines(hits)


def cmd_duplicates(args: argparse.Namespace) -> JsonLines:
    from clip_pyfunc.search.query import duplicate_groups

    settings = settings_of(args)
    with _store(settings, must_exist=True) as store:
        return JsonLines(duplicate_groups(store, args.threshold, k=args.k, progress=True, linkage=args.linkage))


def cmd_app(args: argparse.Namespace) -> dict:
    import dataclasses

    from clip_pyfunc.serving import app

    settings = settings_of(args)
    config, names = settings.app, settings.registry
    classifier = None if args.no_classifier else (
        config.classifier or f"models:/{settings.classifier.name}@{settings.classifier.alias}")
    config = dataclasses.replace(config, api_key=config.api_key or os.environ.get("CLIP_PYFUNC_API_KEY"))
    app.configure_logging()  # what load() warns about (no index, no classifier) carries the app's format
    asked = {"text": f"models:/{names.text_name}@{names.alias}", "image": f"models:/{names.image_name}@{names.alias}",
             "classifier": classifier}
    follows_classifier = classifier == f"models:/{settings.classifier.name}@{names.alias}"
    index = None if args.no_index else settings.index

    def load_live(now, serving=None) -> "app.Loaded":
        """The models and collection the alias names (promotion.live), pinned; shown by the names asked. The
        store of `serving` (the Loaded serving now) is reused where the collection is the same."""
        pinned = {kind: now.models.get(kind, uri) for kind, uri in asked.items()}
        if not follows_classifier:
            pinned["classifier"] = classifier
        held = None if serving is None or serving.searcher is None else serving.searcher.store
        loaded = app.load(pinned["text"], pinned["image"], pinned["classifier"],
                          classifier_required=bool(config.classifier),  # the conf default may be absent
                          index=index, collection=now.collection,
                          store=held if held is not None and held.collection == now.collection else None)
        loaded.versions, loaded.uris = dict(loaded.uris), {**asked, "classifier": loaded.uris["classifier"] and
                                                           asked["classifier"]}
        return loaded

    from clip_pyfunc.promotion import live

    def resolve():
        return live(settings)

    now = resolve()
    follow = app.Follow(resolve=resolve, load=load_live, serving=now, seconds=config.follow_seconds)
    # Not bound to a name here: this frame lives as long as the server, and would keep the first pair alive
    # after a promotion swapped it out.
    app.run(load_live(now), config, settings.serve, follow)  # serves until stopped
    return {}


def cmd_serve(args: argparse.Namespace) -> dict:
    from clip_pyfunc.serving.serve import serve

    # serve finds the model (in a child process: the registry's client stays out of the server) before anything
    # listens; no model there is one line, as from _require_model
    serve(args.model_uri, settings_of(args).serve, "--model-uri")  # does not return
    return {}


def cmd_bench_serving(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import serving

    if args.batching:
        import json

        if args.model_uri:
            raise InvalidInput("--batching registers its own random-weight checkpoint (--random-init): "
                               "give it without --model-uri")
        result = serving.batching(args.random_init, seconds=args.seconds,
                                  log=lambda line: print(line, file=sys.stderr, flush=True))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
            serving.plot_batching(result, os.path.splitext(args.output)[0] + ".png")
        return result
    if not args.model_uri:
        raise InvalidInput("bench-serving needs --model-uri (or --batching)")
    _require_model(args.model_uri, "--model-uri")
    if args.compare_workers:
        return serving.compare_workers(args.model_uri, seconds=args.seconds)
    return serving.run(args.model_uri, requests_n=args.requests, seconds=args.seconds)


def cmd_embed_table(args: argparse.Namespace) -> dict:
    from clip_pyfunc.batch.spark import embed_table

    _require_model(args.model_uri, "--model-uri")  # found out before the JVM starts (and logs)
    overrides = {k: v for k, v in (("precision", args.precision), ("batch_size", args.batch_size)) if v is not None}
    return embed_table(args.model_uri, args.input, args.output, master=args.master, id_col=args.id_col,
                       input_col=args.input_col, input_format=args.input_format, fail_on_error=args.fail_on_error,
                       model_config=overrides, arrow_batch_rows=args.arrow_batch_rows)


def cmd_bench_classifier(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import classifier

    return classifier.run(args.random_init, rows=args.rows, labels=args.labels)


def cmd_bench_spark(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import spark

    rows = spark.table_sizes(args.rows, args.pairs)  # before the registry lookup: a bad flag fails at once
    _require_model(args.model_uri, "--model-uri")
    return spark.run(args.model_uri, rows=rows, pairs=args.pairs, master=args.master, tasks=args.tasks,
                     spark_udf=args.spark_udf)


def cmd_bench_search(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import search

    return search.run(points=args.points, compare_sizes=args.compare_sizes, efs=args.efs, queries=args.queries,
                      parts=args.parts, output=args.output, quantization=args.quantization)


def cmd_bench_promotion(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import promotion

    if args.images < 1 or args.points < 1 or args.rounds < 1:
        raise InvalidInput("--images, --points and --rounds must be 1 or more")
    return promotion.run(tuple(args.parts), images=args.images, points=args.points, rounds=args.rounds,
                         output=args.output, log=lambda line: print(line, file=sys.stderr, flush=True))


def cmd_bench_pixels(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import fast_path

    return fast_path.run()


def cmd_bench_env(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import model_env

    result = model_env.run(random_init=args.random_init, requests=args.requests)
    print(model_env.table(result), file=sys.stderr)
    return result


def cmd_bench_footprint(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import footprint

    if args.requests < 100 or args.starts < 1:
        raise InvalidInput(f"--requests must be 100 or more and --starts 1 or more, got {args.requests}, {args.starts}")
    if args.baseline_pythonpath and not os.path.isdir(os.path.join(args.baseline_pythonpath, "clip_pyfunc")):
        raise InvalidInput(f"--baseline-pythonpath {args.baseline_pythonpath!r} holds no clip_pyfunc package")
    result = footprint.run(args.requests, args.starts, args.baseline_pythonpath, tuple(args.servers), args.output,
                           shapes=not args.no_shapes)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(footprint.table(result), file=sys.stderr)
    return result


def cmd_bench(args: argparse.Namespace) -> dict:
    from clip_pyfunc.benchmarks import bench

    if bool(args.model) == bool(args.random_init):
        raise ModelLoadError("pass exactly one of --model (hub id or directory) and --random-init NAME")
    rounds = args.rounds if args.rounds is not None else (3 if args.peers else 5)
    if rounds < 1:
        raise InvalidInput(f"--rounds must be 1 or more, got {args.rounds}")
    if args.recall_images and (args.recall_images < 11 or not args.peers):
        raise InvalidInput(f"--recall-images takes a count of 11 or more (recall@10 needs an 11th image), with "
                           f"--peers; got {args.recall_images}")
    if args.peers:
        from clip_pyfunc.benchmarks import peers

        result = peers.run(args.random_init, args.model, args.out, rounds=rounds, recall_images=args.recall_images)
        print(peers.table(result), file=sys.stderr)
        return result
    result = bench.run(args.model, args.random_init, out_dir=args.out,
                       batch_sizes=tuple(args.batch_sizes), precisions=tuple(args.precisions),
                       workloads=args.workloads, engines=tuple(args.engines), int8=args.int8, rounds=rounds)
    print(bench.table(result), file=sys.stderr)
    return result
