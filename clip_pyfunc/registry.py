"""Log both towers as models-from-code pyfunc models and register them under an alias.

The tracking and registry URI is MLflow's own: MLFLOW_TRACKING_URI when set, else
MLflow's default (`sqlite:///mlflow.db` in the working directory).
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import os
import shutil
import tempfile
from typing import Any

from clip_pyfunc.checkpoint import CheckpointInfo, ResolvedCheckpoint, export_towers, resolve_checkpoint
from clip_pyfunc.config import RegistryConfig, RuntimeConfig, Settings
from clip_pyfunc.errors import ModelLoadError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# What the served model needs, pinned to what logged it (MLflow's own convention). No pyspark,
# no pytest: the serving container builds from exactly this list plus the shipped code.
# sentencepiece and protobuf: SigLIP's tokenizer is SentencePiece-only and needs both to load.
# simplejpeg: the fast path's JPEG decode (libjpeg-turbo into numpy, at M/8 scales).
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "huggingface-hub",
                      "pillow", "pybase64", "simplejpeg", "numpy", "pandas", "sentencepiece", "protobuf")
TAG_CHECKPOINT, TAG_REVISION, TAG_DIM, TAG_RANDOM = "base_checkpoint", "revision", "embedding_dim", "random_init"
TAG_FAMILY, TAG_SCORING, TAG_SCALE, TAG_BIAS = "family", "scoring", "score_scale", "score_bias"
TAG_TOY = "toy_checkpoint"
TAG_LABEL_SET, TAG_LABEL_HASH = "label_set", "label_set_hash"
TOY_WARNING = "toy checkpoint: trained only on generated coloured shapes; its vectors mean nothing else"


# The request contract, written where MLflow shows it (model metadata, version description),
# because the signature itself carries no input schema (see `model_signature`).
INPUT_CONTRACT = (
    "a DataFrame with a column 'input' (or exactly one column of any name), a list, a pandas "
    "Series or a 1-D array"
)


def model_signature(normalize: bool = True):
    """The pinned signature: an array of floats out and the `normalize` param; no input schema.

    MLflow enforces an input schema before our code runs, and no schema accepts every shape
    users send: a named `input` column refuses `predict(["a cat"])` and Series, and an unnamed
    column makes MLflow pass on only the first column of a wider DataFrame, so a frame whose
    first column is an id would be embedded silently. Without an input schema MLflow passes the
    request through untouched and `loader.input_values` reads every shape, naming the columns
    of a frame it cannot read. Output and params are still declared and enforced (Unity
    Catalog needs the output schema), and the input contract is in the metadata and description.
    The `normalize` default is the model_config's, because MLflow fills in a param's declared
    default before the model sees the request.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(Array(DataType.float))]),
        params=ParamSchema([ParamSpec("normalize", DataType.boolean, normalize)]),
    )


def combined_signature(normalize: bool = True):
    """The combined model's signature: `image_features` and `text_features` (each may be null) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(Array(DataType.float), name, required=False)
                        for name in ("image_features", "text_features")]),
        params=ParamSchema([ParamSpec("normalize", DataType.boolean, normalize)]),
    )


def input_example(tower: str):
    """A small request the logged model answers: a caption, or a 16x16 PNG in base64."""
    import pandas as pd

    if tower == "text":
        return pd.DataFrame({"input": ["a photo of a cat"]})
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode("ascii")
    if tower == "combined":
        return pd.DataFrame({"image": [image, ""], "text": ["", "a photo of a cat"]})
    return pd.DataFrame({"input": [image]})


def pip_requirements() -> list[str]:
    """Exact pins of the model's runtime dependencies as installed now (local build tags dropped)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def _entry_file(tower: str) -> str:
    return os.path.join(PACKAGE_DIR, "model_code", f"{tower}.py")


def _copy_package(target: str) -> str:
    """Copy the clip_pyfunc package (no caches) so it ships with the model as `code_paths`."""
    dest = os.path.join(target, "clip_pyfunc")
    shutil.copytree(PACKAGE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def model_metadata(checkpoint: ResolvedCheckpoint, info: CheckpointInfo) -> dict[str, str]:
    """What both models and their registry versions record: source, dimension, family and scoring.

    The scoring constants are what the zero-shot classifier and `evaluate` use: softmax over
    labels of scale*cos (CLIP-like; scale = exp(logit_scale), or 1/temperature for ALIGN), or
    an independent sigmoid(scale*cos + bias) per label (SigLIP).
    """
    tags = {TAG_CHECKPOINT: checkpoint.source, TAG_REVISION: checkpoint.revision, TAG_DIM: str(info.embedding_dim),
            TAG_FAMILY: info.family, TAG_SCORING: info.scoring, TAG_SCALE: repr(info.scale), TAG_BIAS: repr(info.bias)}
    for precision, cosine in info.precision_cosine.items():
        tags[TAG_COSINE + precision] = repr(cosine)
    if checkpoint.random_init:
        tags[TAG_RANDOM] = checkpoint.random_init
    if checkpoint.toy:
        tags[TAG_TOY] = f"zero-shot accuracy {checkpoint.toy['zero_shot_accuracy']} on generated shapes"
    return tags


def log_tower(
    checkpoint: ResolvedCheckpoint, info: CheckpointInfo, tower: str, artifact: str, runtime: RuntimeConfig,
    workdir: str, registered_name: str | None = None,
):
    """Log one exported tower as a pyfunc model in the active run; register it when a name is given.

    Returns:
        mlflow's ModelInfo.
    """
    return _log_model(tower, f"clip_{tower}_embedding", {tower: artifact}, model_signature(runtime.normalize),
                      input_example(tower), runtime, workdir, registered_name,
                      {**model_metadata(checkpoint, info), "input": INPUT_CONTRACT})


def _log_model(entry: str, name: str, artifacts: dict, signature, example, runtime: RuntimeConfig, workdir: str,
               registered_name: str | None, metadata: dict):
    """Log a models-from-code pyfunc (entry file model_code/<entry>.py) with the package as code."""
    import mlflow

    code_dir = os.path.join(workdir, "code")
    package = os.path.join(code_dir, "clip_pyfunc")
    if not os.path.isdir(package):
        _copy_package(code_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=_entry_file(entry),
        artifacts=artifacts,
        code_paths=[package],
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
        model_config=runtime.to_dict(),
        registered_model_name=registered_name,
        metadata=metadata,
    )


def classifier_signature(top_k: int):
    """The classifier's pinned signature: `labels` and `scores` arrays out, its params declared."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(Array(DataType.string), "labels"), ColSpec(Array(DataType.double), "scores")]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, top_k),
                            ParamSpec("candidate_labels", DataType.string, [], (-1,)),
                            ParamSpec("hypothesis_template", DataType.string, "")]),
    )


def register_classifier(settings: Settings, labels_path: str | None = None, dynamic_labels: bool = False) -> dict:
    """Register the zero-shot classifier: the image tower, the label matrix and the family's scoring.

    Args:
        settings: Checkpoint source, runtime config and the `classifier` section.
        labels_path: A label file; None uses the conf's.
        dynamic_labels: Also ship the text tower, so requests may send candidate_labels.

    Returns:
        A JSON-ready summary like register_models', with the label set's name, digest and size.

    Raises:
        ModelLoadError: A bad label file or checkpoint.
    """
    import mlflow
    from mlflow import MlflowClient

    from clip_pyfunc.classifier import save_labels
    from clip_pyfunc.labels import label_vectors, read_label_file

    cfg = settings.classifier
    labels = read_label_file(labels_path or cfg.labels, cfg.templates)
    checkpoint = resolve_checkpoint(settings.model.source, settings.model.revision, settings.model.cache_dir)
    mlflow.set_experiment(settings.registry.experiment)
    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-") as workdir:
        info, towers = export_towers(checkpoint, workdir)
        info = measure_precisions(info, towers)
        (text,) = local_models(towers, settings.runtime, ("text",))
        labels_dir = save_labels(os.path.join(workdir, "labels"), labels, label_vectors(text, labels), cfg.top_k)
        artifacts = {"image": towers["image"], "labels": labels_dir}
        if dynamic_labels:
            artifacts["text"] = towers["text"]
        tags = {**model_metadata(checkpoint, info), TAG_LABEL_SET: labels.name, TAG_LABEL_HASH: labels.digest,
                "labels": str(len(labels.labels)), "templates": str(len(labels.templates)),
                "dynamic_labels": str(dynamic_labels).lower()}
        with mlflow.start_run(run_name=f"register classifier {checkpoint.source}") as run:
            mlflow.log_params({"checkpoint": checkpoint.source, "label_set": labels.name, "labels": len(labels.labels),
                               "family": info.family, "dynamic_labels": dynamic_labels})
            model_info = _log_model("classifier", "clip_zero_shot_classifier", artifacts,
                                    classifier_signature(cfg.top_k), input_example("image"), settings.runtime,
                                    workdir, cfg.name, {**tags, "input": INPUT_CONTRACT})
    version = str(model_info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.name, version, key, value)
    toy = f" TOY CHECKPOINT: {TOY_WARNING}." if checkpoint.toy else ""
    random = f" RANDOM WEIGHTS ({checkpoint.random_init}): scores are meaningless." if checkpoint.random_init else ""
    client.update_model_version(cfg.name, version, description=(
        f"Zero-shot image classifier over {len(labels.labels)} labels ({labels.name}, {labels.digest}) with "
        f"{info.family} {checkpoint.source} @ {checkpoint.revision}. Input: {INPUT_CONTRACT}, of base64 images or "
        f"raw bytes. Output: labels and scores, best first ({info.scoring} scoring); params top_k"
        f"{', candidate_labels, hypothesis_template' if dynamic_labels else ''}.{toy}{random}"))
    client.set_registered_model_alias(cfg.name, cfg.alias, version)
    summary = {
        "tracking_uri": mlflow.get_tracking_uri(), "registry_uri": mlflow.get_registry_uri(),
        "run_id": run.info.run_id, "checkpoint": checkpoint.source, "revision": checkpoint.revision,
        "family": info.family, "scoring": {"function": info.scoring, "scale": info.scale, "bias": info.bias},
        "label_set": {"name": labels.name, "digest": labels.digest, "labels": len(labels.labels),
                      "templates": len(labels.templates)},
        "dynamic_labels": dynamic_labels, "alias": cfg.alias,
        "models": {"classifier": {"name": cfg.name, "version": version, "uri": f"models:/{cfg.name}@{cfg.alias}",
                                  "model_uri": model_info.model_uri}},
    }
    if checkpoint.toy:
        summary["warning"] = TOY_WARNING
    if checkpoint.random_init:
        summary["warning"] = "random weights: scores are meaningless"
    return summary


TAG_COSINE = "cosine_to_fp32_"


def measure_precisions(info: CheckpointInfo, towers: dict[str, str], device: str = "auto") -> CheckpointInfo:
    """Measure each other precision the registering machine runs against fp32; record it in the artifacts.

    The lowest cosine over sample texts and images (toy shapes and photo-like JPEGs) per precision
    ("bf16" and "int8" on CPU, "fp16" and "bf16" on CUDA) is written into both towers'
    `clip_pyfunc.json`, where the loader's "default" precision reads it.

    Returns:
        The description with `precision_cosine` filled in.
    """
    import dataclasses

    import numpy as np
    import torch

    from clip_pyfunc.samples import SAMPLE_TEXTS, photo_jpeg, sample_images_b64

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    texts = list(SAMPLE_TEXTS) + ["", "a photo of something else entirely, described at some length"]
    images = sample_images_b64() + [photo_jpeg(640, 480, seed=s) for s in range(2)]

    def vectors(precision):
        text, image = local_models(towers, RuntimeConfig(device=device, precision=precision))
        return text.embed_rows(texts)[0], image.embed_rows(images)[0]

    reference = vectors("fp32")
    found = {}
    for precision in (("fp16", "bf16") if cuda else ("bf16", "int8")):
        try:
            got = vectors(precision)
        except Exception:  # noqa: BLE001 - a precision this family cannot run (int8 on SigLIP 2's patch Linear)
            continue  # not measured, so never the default
        found[precision] = round(float(min(np.min(np.sum(a * b, axis=1)) for a, b in zip(reference, got))), 6)
    info = dataclasses.replace(info, precision_cosine=found)
    for path in towers.values():
        info.write(path)
    return info


def model_kind(model_uri: str) -> str:
    """What a logged model is, from its artifacts: "text", "image", "combined" or "classifier"."""
    import mlflow

    artifacts = set(mlflow.models.get_model_info(model_uri).flavors["python_function"].get("artifacts") or {})
    if "labels" in artifacts:
        return "classifier"
    if {"text", "image"} <= artifacts:
        return "combined"
    if artifacts in ({"text"}, {"image"}):
        return artifacts.pop()
    raise ModelLoadError(f"{model_uri} is not a clip-pyfunc model (artifacts {sorted(artifacts)})")


def run_models(model_uri: str) -> dict[str, str]:
    """The registered models logged in the same run as `model_uri` (one embedding space), by kind.

    Returns:
        {"text": "models:/name/version", "image": ..., "combined": ..., as registered}; the model
        itself is always included (under its pinned version when it is registered).
    """
    import mlflow
    from mlflow import MlflowClient

    info = mlflow.models.get_model_info(model_uri)
    found = {model_kind(model_uri): pin_model_uri(model_uri)}
    if info.run_id:
        for mv in MlflowClient().search_model_versions(f"run_id='{info.run_id}'"):
            uri = f"models:/{mv.name}/{mv.version}"
            found.setdefault(model_kind(uri), uri)
    return found


def pin_model_uri(model_uri: str) -> str:
    """`models:/name@alias` -> `models:/name/version` (the version the alias points at now); others unchanged."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        from mlflow import MlflowClient

        name, alias = model_uri[len("models:/"):].rsplit("@", 1)
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return model_uri


def local_models(towers: dict[str, str], runtime: RuntimeConfig | None = None, which=("text", "image")):
    """The models (text, image, in `which` order) of exported tower directories, loaded here without MLflow."""
    from types import SimpleNamespace

    from clip_pyfunc.image_model import ClipImageEmbedding
    from clip_pyfunc.text_model import ClipTextEmbedding

    context = SimpleNamespace(artifacts=towers, model_config=runtime.to_dict() if runtime else None)
    models = []
    for tower in which:
        model = ClipTextEmbedding() if tower == "text" else ClipImageEmbedding()
        model.load_context(context)
        models.append(model)
    return tuple(models)


def register_models(settings: Settings) -> dict[str, Any]:
    """Log the text and image models in one run, register both, point the alias at them.

    Args:
        settings: Checkpoint source, registry names and alias, runtime config.

    Returns:
        A JSON-ready summary: names, versions, `models:/name@alias` URIs, dimension, family,
        scoring, checkpoint and revision, and whether the weights are random.

    Raises:
        ModelLoadError: The checkpoint cannot be found or read, or is not a supported family.
    """
    import mlflow
    from mlflow import MlflowClient

    checkpoint = resolve_checkpoint(settings.model.source, settings.model.revision, settings.model.cache_dir)
    reg: RegistryConfig = settings.registry
    mlflow.set_experiment(reg.experiment)
    client = MlflowClient()
    models = {}
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-") as workdir:
        info, artifacts = export_towers(checkpoint, workdir)
        info = measure_precisions(info, artifacts)
        tags = model_metadata(checkpoint, info)
        with mlflow.start_run(run_name=f"register {checkpoint.source}") as run:
            mlflow.log_params({"checkpoint": checkpoint.source, "revision": checkpoint.revision,
                               "embedding_dim": info.embedding_dim, "family": info.family})
            for tower, name in (("text", reg.text_name), ("image", reg.image_name)):
                model_info = log_tower(checkpoint, info, tower, artifacts[tower], settings.runtime, workdir,
                                       registered_name=name)
                version = str(model_info.registered_model_version)
                for key, value in tags.items():
                    client.set_model_version_tag(name, version, key, value)
                client.update_model_version(name, version, description=_description(tower, checkpoint, info))
                client.set_registered_model_alias(name, reg.alias, version)
                models[tower] = {"name": name, "version": version, "uri": f"models:/{name}@{reg.alias}",
                                 "model_uri": model_info.model_uri}
            if reg.with_combined:
                models["combined"] = _register_combined(checkpoint, info, artifacts, settings, workdir, tags)
    summary = {
        "tracking_uri": mlflow.get_tracking_uri(),
        "registry_uri": mlflow.get_registry_uri(),
        "run_id": run.info.run_id,
        "checkpoint": checkpoint.source,
        "revision": checkpoint.revision,
        "family": info.family,
        "embedding_dim": info.embedding_dim,
        "scoring": {"function": info.scoring, "scale": info.scale, "bias": info.bias},
        "precision_cosine_to_fp32": info.precision_cosine,
        "alias": reg.alias,
        "models": models,
    }
    if checkpoint.random_init:
        summary["random_init"] = checkpoint.random_init
        summary["warning"] = "random weights: vectors are meaningless stand-ins, not real embeddings"
    if checkpoint.toy:
        summary["toy"] = {k: checkpoint.toy[k] for k in ("task", "zero_shot_accuracy", "held_out_images")}
        summary["warning"] = TOY_WARNING
    return summary


def _register_combined(checkpoint: ResolvedCheckpoint, info: CheckpointInfo, artifacts: dict[str, str],
                       settings: Settings, workdir: str, tags: dict[str, str]) -> dict[str, str]:
    """Log and register the combined image+text model (both tower artifacts) in the active run."""
    import dataclasses

    from mlflow import MlflowClient

    from clip_pyfunc.combined_model import CONTRACT

    reg = settings.registry
    runtime = dataclasses.replace(settings.runtime, normalize=False) if reg.azure_compatible else settings.runtime
    tags = {**tags, "azure_compatible": str(reg.azure_compatible).lower()}
    model_info = _log_model("combined", "clip_image_text_embedding", dict(artifacts),
                            combined_signature(runtime.normalize), input_example("combined"), runtime, workdir,
                            reg.combined_name, {**tags, "input": CONTRACT})
    client, name = MlflowClient(), reg.combined_name
    version = str(model_info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    norm = "L2-normalised" if runtime.normalize else "not normalised (Azure ML compatible)"
    client.update_model_version(name, version, description=(
        f"{info.family} image and text embeddings of {checkpoint.source} @ {checkpoint.revision} in one request. "
        f"Input: {CONTRACT}. Output: image_features and text_features, float32 [{info.embedding_dim}] or null, "
        f"{norm} by default (param normalize).{_warning(checkpoint)}"))
    client.set_registered_model_alias(name, reg.alias, version)
    return {"name": name, "version": version, "uri": f"models:/{name}@{reg.alias}", "model_uri": model_info.model_uri,
            "normalize": runtime.normalize}


def _warning(checkpoint: ResolvedCheckpoint) -> str:
    if checkpoint.toy:
        return f" TOY CHECKPOINT: {TOY_WARNING}."
    if checkpoint.random_init:
        return f" RANDOM WEIGHTS ({checkpoint.random_init}): vectors are meaningless."
    return ""


def _description(tower: str, checkpoint: ResolvedCheckpoint, info: CheckpointInfo) -> str:
    dim = info.embedding_dim
    what = "text (string)" if tower == "text" else "image (base64 string or raw bytes; an https URL with allow_urls)"
    return (
        f"{info.family} {tower} embeddings of {checkpoint.source} @ {checkpoint.revision}. Input: {INPUT_CONTRACT}, "
        f"of {what}. Output: float32 [{dim}], L2-normalised (param normalize=false for raw). "
        f"Text and image vectors of this checkpoint share one space.{_warning(checkpoint)}"
    )
