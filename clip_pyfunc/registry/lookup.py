"""Registry lookups: what a logged model is, its embedding space, which models share its run,
pinning an alias to its version, and loading or resolving a URI with a one-line error."""

from __future__ import annotations

from clip_pyfunc.errors import ModelLoadError, one_line
from clip_pyfunc.settings import RuntimeConfig

# The metadata key (and version tag) registration writes: a digest of the checkpoint's exported
# weights and the dimension (registry.build.weights_space).
SPACE_KEY = "embedding_space"


def embedding_space(metadata) -> str:
    """A model's embedding space: vectors of two models compare only when their spaces are equal.

    Args:
        metadata: The model's MLflow metadata: a ModelInfo (`model_info`, before loading) or a loaded
            model's `metadata`.

    Returns:
        The recorded space ("sha256:<digest>/<dim>": one checkpoint, however many registrations); for a
        model logged before spaces were recorded, "run:<run id>", so the two towers of one run still match.
    """
    recorded = (metadata.metadata or {}).get(SPACE_KEY)
    if recorded:
        return recorded
    if metadata.run_id:
        return f"run:{metadata.run_id}"
    return f"model:{metadata.model_uuid}"  # no run, no record: matches nothing but itself


def require_same_space(text_meta, image_meta, text_uri: str, image_uri: str) -> str:
    """Refuse a text and an image model of different embedding spaces: their vectors would not compare.

    Args:
        text_meta: The text model's metadata (see `embedding_space`).
        image_meta: The image model's.
        text_uri: The text model's URI, for the message.
        image_uri: The image model's.

    Returns:
        The space they share.

    Raises:
        ModelLoadError: Two spaces; the message names both URIs and their spaces.
    """
    text, image = embedding_space(text_meta), embedding_space(image_meta)
    if text != image:
        raise ModelLoadError(
            f"text model {text_uri} (embedding space {text}) and image model {image_uri} (embedding space {image}) "
            "are of different embedding spaces, so their vectors do not compare; use the text and image models of "
            "one checkpoint (e.g. both @ the alias of one `clip-pyfunc register`)")
    return text


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
    """The registered models logged in the same run as `model_uri`, by kind (check their spaces with
    `require_same_space`: a version registered against the run by hand may be of another).

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


def local_artifacts(uri: str) -> str | None:
    """The absolute path of the folder on this machine's disk that already holds the model at `uri`
    (a registry whose artifact store is a local folder, a file: URI or a local path), else None.

    A local Spark job's workers load such a model in place: copying a ViT-B/32 model's 700 MB took
    2.4 s beside the JVM's start (docs/SPARK.md, issue 40); `serve` and the app do too (the copy was
    part of every cold start, issue 39). Any error while asking the registry
    where the model is means None (the caller downloads it, as before).
    """
    import os

    try:
        location = uri
        if uri.startswith("models:/"):
            from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

            location = ModelsArtifactRepository.get_underlying_uri(uri)
        if location.startswith("file:"):
            from mlflow.utils.file_utils import local_file_uri_to_path

            location = local_file_uri_to_path(location)
        elif _has_scheme(location):  # another store (s3:, dbfs:, runs:, mlflow-artifacts:)
            return None
        location = os.path.abspath(location)
        return location if os.path.isfile(os.path.join(location, "MLmodel")) else None
    except Exception:  # noqa: BLE001 - only a shortcut: the caller downloads the model instead
        return None


def model_folder(uri: str, what: str) -> str:
    """The folder on this disk that holds the model at `uri`: in place where its store is local
    (`local_artifacts`), else downloaded by MLflow (`mlflow.artifacts.download_artifacts`, to a new temporary
    folder).

    Args:
        uri: A model URI (`models:/name@alias`, `models:/name/version`, `runs:/...`, a path).
        what: The flag or field that gave it, for the message.

    Raises:
        ModelLoadError: MLflow finds no model at `uri` (the message names the registry it asked).
    """
    import mlflow

    pinned = _resolved(pin_model_uri, uri, what)  # one version for the three steps: an alias may move meanwhile
    _resolved(lambda _: mlflow.models.get_model_info(pinned), uri, what)
    return local_artifacts(pinned) or _resolved(lambda _: mlflow.artifacts.download_artifacts(pinned), uri, what)


def _has_scheme(location: str) -> bool:
    """True for a URI with a scheme of 2 letters or more (a Windows drive letter is a path)."""
    from urllib.parse import urlparse

    return len(urlparse(location).scheme) > 1


def local_models(towers: dict[str, str], runtime: RuntimeConfig | None = None, which=("text", "image")):
    """The models (text, image, in `which` order) of exported tower directories, loaded here without MLflow."""
    from types import SimpleNamespace

    from clip_pyfunc.models.image import ClipImageEmbedding
    from clip_pyfunc.models.text import ClipTextEmbedding

    context = SimpleNamespace(artifacts=towers, model_config=runtime.to_dict() if runtime else None)
    models = []
    for tower in which:
        model = ClipTextEmbedding() if tower == "text" else ClipImageEmbedding()
        model.load_context(context)
        models.append(model)
    return tuple(models)


def load_model(uri: str, what: str):
    """Load a pyfunc model, turning a bad or unregistered URI into ModelLoadError.

    Args:
        uri: A model URI (models:/name@alias, models:/name/1, runs:/..., a path).
        what: What the URI is, for the message (a flag, or "the collection's text model").

    Raises:
        ModelLoadError: The URI names no model MLflow can find.
    """
    import mlflow

    def load(where: str):  # a model already on this disk is loaded in place, not copied first (local_artifacts)
        return mlflow.pyfunc.load_model(local_artifacts(where) or where)

    return _resolved(load, uri, what)


def model_info(uri: str, what: str):
    """Resolve a model URI (mlflow.models.get_model_info: the registry and MLmodel only, no weights).

    Raises:
        ModelLoadError: The URI names no model MLflow can find.
    """
    import mlflow

    return _resolved(mlflow.models.get_model_info, uri, what)


def _resolved(read, uri: str, what: str):
    """read(uri), with MLflow's error for an unknown URI turned into ModelLoadError."""
    from mlflow.exceptions import MlflowException

    try:
        return read(uri)
    except MlflowException as e:
        raise model_error(what, uri, e) from e


def model_error(what: str, uri: str, e: Exception) -> ModelLoadError:
    """The one-line error for a model URI that MLflow cannot resolve, with where it looked."""
    import mlflow

    return ModelLoadError(f"{what} {uri}: {one_line(e)} (registry: {mlflow.get_registry_uri()}). Check the name, "
                          "version or alias and MLFLOW_TRACKING_URI; `clip-pyfunc register` registers the models")
