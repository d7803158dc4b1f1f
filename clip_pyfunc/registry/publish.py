"""Register the models: build the towers once, log every model, then publish them in one place.

A registration is three steps. `registry.build.build_towers` writes the tower artifacts (each
engine's files, the fidelity measurement, the description). Logging then creates every model
version (`log_tower`, `_log_model`). `publish` comes last: it tags and describes each new version
and moves the aliases it touches, all or none (`move_aliases`), so `@alias` never points text and
image at different embedding spaces. Each model and version records its space
(`embedding_space`: a digest of the exported weights and the dimension), which readers compare
with `lookup.require_same_space`.

The tracking and registry URI is MLflow's own: MLFLOW_TRACKING_URI when set, else
MLflow's default (`sqlite:///mlflow.db` in the working directory).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from clip_pyfunc.artifacts.checkpoint import ResolvedCheckpoint
from clip_pyfunc.artifacts.towers import CheckpointInfo
from clip_pyfunc.errors import one_line
from clip_pyfunc.registry.build import build_towers, describe_engines, reference_fidelity
from clip_pyfunc.registry.lookup import SPACE_KEY, local_models
from clip_pyfunc.registry.precision import TAG_COSINE
from clip_pyfunc.registry.requirements import copy_model_code, entry_file, pip_requirements
from clip_pyfunc.registry.signatures import (INPUT_CONTRACT, classifier_signature, combined_signature, input_example,
                                             model_signature)
from clip_pyfunc.settings import RegistryConfig, RuntimeConfig, Settings

TAG_CHECKPOINT, TAG_REVISION, TAG_DIM, TAG_RANDOM = "base_checkpoint", "revision", "embedding_dim", "random_init"
TAG_FAMILY, TAG_SCORING, TAG_SCALE, TAG_BIAS = "family", "scoring", "score_scale", "score_bias"
TAG_TOY = "toy_checkpoint"
TAG_LABEL_SET, TAG_LABEL_HASH = "label_set", "label_set_hash"
TAG_SPACE = SPACE_KEY


def model_metadata(checkpoint: ResolvedCheckpoint, info: CheckpointInfo, space: str) -> dict[str, str]:
    """What both models and their registry versions record: source, dimension, embedding space
    (registry.build.weights_space), family and scoring, and what each engine and precision held.

    The scoring constants are what the zero-shot classifier and `evaluate` use: softmax over
    labels of scale*cos (CLIP-like; scale = exp(logit_scale), or 1/temperature for ALIGN), or
    an independent sigmoid(scale*cos + bias) per label (SigLIP).
    """
    tags = {TAG_CHECKPOINT: checkpoint.source, TAG_REVISION: checkpoint.revision, TAG_DIM: str(info.embedding_dim),
            TAG_SPACE: space, TAG_FAMILY: info.family, TAG_SCORING: info.scoring, TAG_SCALE: repr(info.scale),
            TAG_BIAS: repr(info.bias)}
    from clip_pyfunc.runtime.engines import REFERENCE

    for engine, cosines in info.fidelity.items():  # the reference engine's precisions go untagged by engine
        for precision, cosine in cosines.items():
            tags[TAG_COSINE + ("" if engine == REFERENCE[0] else f"{engine}_") + precision] = repr(cosine)
    for engine, towers in info.unavailable.items():
        for tower, reason in towers.items():
            tags[f"{engine}_fallback_{tower}"] = reason[:250]
    for pair, note in info.measurement_notes.items():  # why a pair has no cosine; what int8 was judged on
        tags["measurement_note_" + pair.replace(" ", "_")] = note
    for tower, storage in info.ir_weights.items():  # the shipped IR's weight storage (registry.weights)
        tags[f"openvino_ir_weights_{tower}"] = storage
    for tower, engines in info.speed.get("rows_per_s", {}).items():  # what "default" ranks by here (registry.speed)
        for engine, rates in engines.items():
            for precision, value in rates.items():
                tags[f"rows_per_s_{tower}_{engine}_{precision}"] = repr(value)
    if info.speed:
        tags["rows_per_s_measured_on"] = info.speed["hardware"][:250]
    if checkpoint.random_init:
        tags[TAG_RANDOM] = checkpoint.random_init
    if checkpoint.toy:
        tags[TAG_TOY] = f"zero-shot accuracy {checkpoint.toy['zero_shot_accuracy']} on generated shapes"
    return tags


def log_tower(
    tags: dict[str, str], info: CheckpointInfo, tower: str, artifact: str, runtime: RuntimeConfig,
    workdir: str, registered_name: str | None = None,
):
    """Log one exported tower as a pyfunc model in the active run; register it when a name is given.

    Args:
        tags: The model's metadata (`model_metadata`).

    Returns:
        mlflow's ModelInfo.
    """
    return _log_model(tower, f"clip_{tower}_embedding", {tower: artifact}, model_signature(runtime.normalize),
                      input_example(tower), runtime, workdir, registered_name, {**tags, "input": INPUT_CONTRACT}, info)


def move_aliases(client, alias: str, versions: dict[str, str]) -> None:
    """Point `alias` of each registered model at its version: all of them, or none.

    MLflow moves one alias per call. When a move fails (or the process is interrupted), the aliases
    already moved go back to the versions they named before, or are deleted where there was none, and
    the error is raised; an alias that cannot be put back is named in a note on it. Call this last,
    once every version exists.

    Args:
        client: An MlflowClient.
        alias: The alias to move (e.g. "champion").
        versions: {registered model name: version}.

    Raises:
        MlflowException: A move failed; the aliases are where they were.
    """
    before = {name: _alias_version(client, name, alias) for name in versions}
    moved = []
    try:
        for name, version in versions.items():
            client.set_registered_model_alias(name, alias, version)
            moved.append(name)
        now = {name: _alias_version(client, name, alias) for name in versions}
        if now != {name: str(v) for name, v in versions.items()}:  # another registration moved one meanwhile
            raise RegistryRace(f"while moving @{alias} to {versions}, another registration moved it: now {now}; "
                               "register again once the other one is done")
    except BaseException as e:
        for name in reversed(moved):
            try:
                if _alias_version(client, name, alias) != str(versions[name]):
                    continue  # someone else's move since ours: not ours to undo
                if before[name] is None:
                    client.delete_registered_model_alias(name, alias)
                else:
                    client.set_registered_model_alias(name, alias, before[name])
            except Exception as undo:  # the registry may be what failed: say what is left to fix
                e.add_note(f"{name}@{alias} was left at version {versions[name]} and could not be put back to "
                           f"{before[name] or '(no alias)'}: {one_line(undo)}; set it by hand")
        raise


class RegistryRace(Exception):
    """Another registration moved an alias while this one was moving it."""


def _alias_version(client, name: str, alias: str) -> str | None:
    """The version `alias` of `name` points at now, or None."""
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else str(version)


def requirements_for(info: CheckpointInfo, artifacts: dict) -> list[str]:
    """A model's pip requirements: torch-free where no tower it ships carries torch weights (registry.build.
    ship_engine_files: logged for OpenVINO by name, or where OpenVINO is the engine chosen); transformers then
    only where its tokenizer or NaFlex sizing needs it."""
    from clip_pyfunc.runtime.engines.torch_engine import WEIGHTS_FILE

    towers = [t for t in artifacts if t in ("text", "image")]
    torch_free = bool(towers) and not any(os.path.exists(os.path.join(artifacts[t], WEIGHTS_FILE)) for t in towers)
    transformers = ("text" in towers and info.tokenizer != "tokenizers") or (
        "image" in towers and info.image_inputs == "naflex")
    return pip_requirements(torch_free=torch_free, transformers=transformers)


def _log_model(entry: str, name: str, artifacts: dict, signature, example, runtime: RuntimeConfig, workdir: str,
               registered_name: str | None, metadata: dict, info: CheckpointInfo):
    """Log a models-from-code pyfunc (entry file models/entry/<entry>.py) with the rooms it imports as code
    (registry.requirements.MODEL_CODE)."""
    import mlflow

    code_dir = os.path.join(workdir, "code")
    package = os.path.join(code_dir, "clip_pyfunc")
    if not os.path.isdir(package):
        copy_model_code(code_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=entry_file(entry),
        artifacts=artifacts,
        code_paths=[package],
        signature=signature,
        input_example=example,
        pip_requirements=requirements_for(info, artifacts),
        model_config=runtime.to_dict(),
        registered_model_name=registered_name,
        metadata=metadata,
    )


@dataclass(frozen=True, kw_only=True)
class LoggedVersion:
    """A model version logged and registered, waiting to be published.

    Attributes:
        kind: Its key in the summary's `models` ("text", "image", "combined", "classifier").
        name: The registered model name.
        model_info: mlflow's ModelInfo (its registered version and model URI).
        tags: The version's tags (model_metadata and the kind's own).
        description: The version's description.
        extra: More fields for the summary's entry.
    """

    kind: str
    name: str
    model_info: Any
    tags: dict[str, str]
    description: str
    extra: dict = dataclasses.field(default_factory=dict)


def publish(client, alias: str, logged: list[LoggedVersion]) -> dict[str, dict]:
    """The last step of every registration: tag and describe each new version, then move `alias` onto all of
    them, all or none (`move_aliases`).

    Returns:
        The summary's `models`: {kind: {name, version, uri (models:/name@alias), model_uri, ...extra}}.

    Raises:
        MlflowException: The registry refused a tag, a description or a move (no alias moved).
    """
    versions = {}
    for item in logged:
        version = str(item.model_info.registered_model_version)
        for key, value in item.tags.items():
            client.set_model_version_tag(item.name, version, key, value)
        client.update_model_version(item.name, version, description=item.description)
        versions[item.kind] = version
    move_aliases(client, alias, {item.name: versions[item.kind] for item in logged})
    return {item.kind: {"name": item.name, "version": versions[item.kind], "uri": f"models:/{item.name}@{alias}",
                        "model_uri": item.model_info.model_uri, **item.extra} for item in logged}


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

    from clip_pyfunc.artifacts.labels import read_label_file, save_labels
    from clip_pyfunc.models.classifier import label_vectors

    cfg = settings.classifier
    labels = read_label_file(labels_path or cfg.labels, cfg.templates)
    mlflow.set_experiment(settings.registry.experiment)
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-") as workdir:
        built = build_towers(settings, workdir)
        checkpoint, info, towers = built.checkpoint, built.info, built.towers
        (text,) = local_models(towers, settings.runtime, ("text",))
        labels_dir = save_labels(os.path.join(workdir, "labels"), labels, label_vectors(text, labels), cfg.top_k)
        del text
        artifacts = {"image": towers["image"], "labels": labels_dir}
        if dynamic_labels:
            artifacts["text"] = towers["text"]
        tags = {**model_metadata(checkpoint, info, built.space), TAG_LABEL_SET: labels.name,
                TAG_LABEL_HASH: labels.digest, "labels": str(len(labels.labels)),
                "templates": str(len(labels.templates)), "dynamic_labels": str(dynamic_labels).lower()}
        with mlflow.start_run(run_name=f"register classifier {checkpoint.source}") as run:
            mlflow.log_params({"checkpoint": checkpoint.source, "label_set": labels.name, "labels": len(labels.labels),
                               "family": info.family, "dynamic_labels": dynamic_labels})
            model_info = _log_model("classifier", "clip_zero_shot_classifier", artifacts,
                                    classifier_signature(cfg.top_k), input_example("image"), settings.runtime,
                                    workdir, cfg.name, {**tags, "input": INPUT_CONTRACT}, info)
            models = publish(MlflowClient(), cfg.alias, [LoggedVersion(
                kind="classifier", name=cfg.name, model_info=model_info, tags=tags, description=(
                    f"Zero-shot image classifier over {len(labels.labels)} labels ({labels.name}, {labels.digest}) "
                    f"with {info.family} {checkpoint.source} @ {checkpoint.revision}. Input: {INPUT_CONTRACT}, of "
                    f"base64 images or raw bytes. Output: labels and scores, best first ({info.scoring} scoring); "
                    f"params top_k{', candidate_labels, hypothesis_template' if dynamic_labels else ''}."
                    f"{_warning(checkpoint)}"))])
    summary = {
        "tracking_uri": mlflow.get_tracking_uri(), "registry_uri": mlflow.get_registry_uri(),
        "run_id": run.info.run_id, "checkpoint": checkpoint.source, "revision": checkpoint.revision,
        "family": info.family, "scoring": {"function": info.scoring, "scale": info.scale, "bias": info.bias},
        "label_set": {"name": labels.name, "digest": labels.digest, "labels": len(labels.labels),
                      "templates": len(labels.templates)},
        "dynamic_labels": dynamic_labels, "alias": cfg.alias, "models": models,
    }
    if checkpoint.warning:
        summary["warning"] = checkpoint.warning
    return summary


def register_models(settings: Settings) -> dict[str, Any]:
    """Build the towers once, log the text and image models (and the combined one) in one run, then publish them:
    tags, descriptions, and the alias on all of them (`move_aliases`: all or none, so a failure leaves every alias
    where it was).

    Args:
        settings: Checkpoint source, registry names and alias, runtime config.

    Returns:
        A JSON-ready summary: names, versions, `models:/name@alias` URIs, dimension, family,
        scoring, checkpoint and revision, and whether the weights are random.

    Raises:
        ModelLoadError: The checkpoint cannot be found or read, or is not a supported family.
        MlflowException: Logging, registering or moving an alias failed (no alias moved).
    """
    import mlflow
    from mlflow import MlflowClient

    reg: RegistryConfig = settings.registry
    mlflow.set_experiment(reg.experiment)
    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-") as workdir:
        built = build_towers(settings, workdir)
        checkpoint, info, artifacts, space = built.checkpoint, built.info, built.towers, built.space
        tags = model_metadata(checkpoint, info, space)
        with mlflow.start_run(run_name=f"register {checkpoint.source}") as run:
            mlflow.log_params({"checkpoint": checkpoint.source, "revision": checkpoint.revision,
                               "embedding_dim": info.embedding_dim, "family": info.family, TAG_SPACE: space})
            logged = []
            for tower, name in (("text", reg.text_name), ("image", reg.image_name)):
                model_info = log_tower(tags, info, tower, artifacts[tower], settings.runtime, workdir,
                                       registered_name=name)
                logged.append(LoggedVersion(kind=tower, name=name, model_info=model_info, tags=tags,
                                            description=_description(tower, checkpoint, info)))
            if reg.with_combined:
                logged.append(_log_combined(checkpoint, info, artifacts, settings, workdir, tags))
            # Last, once every version exists, and inside the run so a failure marks it failed.
            models = publish(MlflowClient(), reg.alias, logged)
    summary = {
        "tracking_uri": mlflow.get_tracking_uri(),
        "registry_uri": mlflow.get_registry_uri(),
        "run_id": run.info.run_id,
        "checkpoint": checkpoint.source,
        "revision": checkpoint.revision,
        "family": info.family,
        "embedding_dim": info.embedding_dim,
        "embedding_space": space,
        "scoring": {"function": info.scoring, "scale": info.scale, "bias": info.bias},
        "precision_cosine_to_fp32": reference_fidelity(info),
        "engines": describe_engines(info),
        "engine_files": built.shipped,
        "alias": reg.alias,
        "models": models,
    }
    if checkpoint.random_init:
        summary["random_init"] = checkpoint.random_init
    if checkpoint.toy:
        summary["toy"] = {k: checkpoint.toy[k] for k in ("task", "zero_shot_accuracy", "held_out_images")}
    if checkpoint.warning:
        summary["warning"] = checkpoint.warning
    return summary


def _log_combined(checkpoint: ResolvedCheckpoint, info: CheckpointInfo, artifacts: dict[str, str],
                  settings: Settings, workdir: str, tags: dict[str, str]) -> LoggedVersion:
    """Log and register the combined image+text model (both tower artifacts) in the active run."""
    from clip_pyfunc.models.combined import CONTRACT

    reg = settings.registry
    runtime = dataclasses.replace(settings.runtime, normalize=False) if reg.azure_compatible else settings.runtime
    tags = {**tags, "azure_compatible": str(reg.azure_compatible).lower()}
    model_info = _log_model("combined", "clip_image_text_embedding", dict(artifacts),
                            combined_signature(runtime.normalize), input_example("combined"), runtime, workdir,
                            reg.combined_name, {**tags, "input": CONTRACT}, info)
    norm = "L2-normalised" if runtime.normalize else "not normalised (Azure ML compatible)"
    return LoggedVersion(kind="combined", name=reg.combined_name, model_info=model_info, tags=tags, description=(
        f"{info.family} image and text embeddings of {checkpoint.source} @ {checkpoint.revision} in one request. "
        f"Input: {CONTRACT}. Output: image_features and text_features, float32 [{info.embedding_dim}] or null, "
        f"{norm} by default (param normalize).{_warning(checkpoint)}"), extra={"normalize": runtime.normalize})


def _warning(checkpoint: ResolvedCheckpoint) -> str:
    """A version description's closing caveat for toy or random weights: "HEADING (architecture): reason."."""
    if not checkpoint.caveat:
        return ""
    heading, reason = checkpoint.caveat
    arch = f" ({checkpoint.random_init})" if checkpoint.random_init and not checkpoint.toy else ""
    return f" {heading.upper()}{arch}: {reason}."


def _description(tower: str, checkpoint: ResolvedCheckpoint, info: CheckpointInfo) -> str:
    dim = info.embedding_dim
    what = "text (string)" if tower == "text" else "image (base64 string or raw bytes; an https URL with allow_urls)"
    return (
        f"{info.family} {tower} embeddings of {checkpoint.source} @ {checkpoint.revision}. Input: {INPUT_CONTRACT}, "
        f"of {what}. Output: float32 [{dim}], L2-normalised (param normalize=false for raw). "
        f"Text and image vectors of this checkpoint share one space.{_warning(checkpoint)}"
    )
