"""What the app serves, loaded once at start: the text and image models, and the classifier and index when present.

Every URI and the index are checked before any model loads, so a wrong name or a locked store
fails in seconds; a missing classifier or index leaves its endpoint answering how to make one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from clip_pyfunc.artifacts.checkpoint import weights_caveat
from clip_pyfunc.settings import IndexConfig

log = logging.getLogger("clip_pyfunc.serving.app.loading")


@dataclass
class Loaded:
    """What the app serves, loaded once: the text and image models, and the classifier and index when present."""

    text: Any
    image: Any
    classifier: Any  # None: /classify answers 503 with `no_classifier`
    searcher: Any  # search.query.Searcher, or None: /search answers 404 with `no_index`
    warning: str | None = None  # toy or random weights: said on the page and in /health
    uris: dict[str, str | None] = field(default_factory=dict)  # {"text", "image", "classifier"}
    no_index: str | None = None  # why there is no index, and how to make one
    no_classifier: str | None = None  # why there is no classifier, and how to register one
    versions: dict[str, str | None] = field(default_factory=dict)  # the URIs loaded, pinned where followed


def load(text_uri: str, image_uri: str, classifier_uri: str | None = None, *, classifier_required: bool = True,
         index: IndexConfig | None = None, collection: str | None = None, store=None) -> Loaded:
    """Load the text and image models, the classifier and the index (each once), for `create_app`.

    Args:
        text_uri: The text model (e.g. models:/clip_text_embedding@champion).
        image_uri: The image model of the same embedding space (the same checkpoint).
        classifier_uri: The zero-shot classifier; None runs without /classify.
        classifier_required: False: a classifier the registry does not hold is left out (a warning)
            instead of stopping the app.
        index: Where the index is; None, no store folder, or no such collection runs without
            /search. A collection is opened only when its embedding space is the models'.
        collection: Open this very collection (what `index.collection`'s alias named when the models
            were resolved: promotion.live), not what the alias names by the time the store opens.
        store: An open store of that collection to use instead of opening it (the app's reload, when a
            promotion kept the collection); the caller keeps owning it.

    Raises:
        ModelLoadError: A model cannot be found or loaded, or the text and image models are of different
            embedding spaces.
        IndexRefused: The collection holds another embedding space, or the index is locked by
            another process or its server cannot be reached.
    """
    from clip_pyfunc.registry.lookup import load_model, model_info, require_same_space
    from clip_pyfunc.search.query import Searcher

    owned = store is None
    store, no_index = _open_index(index, collection) if owned else (store, None)  # first: a locked store fails at once
    try:
        infos = {"text": model_info(text_uri, "text model"), "image": model_info(image_uri, "image model")}
        require_same_space(infos["text"], infos["image"], text_uri, image_uri)
        found, no_classifier = _find_classifier(classifier_uri, classifier_required)
        if store is not None and (no_index := _check_collection(store, infos)):
            if owned:
                store.close()  # no collection: leave the folder free for `clip-pyfunc index`
            store = None
        text = load_model(text_uri, "text model")  # every URI and the index checked before any model loads
        image = load_model(image_uri, "image model")
        classifier = load_model(found, "classifier") if found else None
        searcher = None if store is None else Searcher(store, text_model=text, image_model=image)
    except BaseException:
        if store is not None and owned:
            store.close()
        raise
    # Said once the app will start, not before an error that stops it.
    for asked, missing, why in ((index, searcher is None, no_index),
                                (classifier_uri, classifier is None, no_classifier)):
        if asked and missing:
            log.warning("%s", why)
    metadata = image.metadata.metadata or {}
    caveat = weights_caveat(random_init=metadata.get("random_init"), toy=metadata.get("toy_checkpoint"))
    warning = f"{caveat[0].capitalize()}: {caveat[1]}." if caveat else None
    return Loaded(text=text, image=image, classifier=classifier, searcher=searcher, warning=warning,
                  uris={"text": text_uri, "image": image_uri, "classifier": found},
                  versions={"text": text_uri, "image": image_uri, "classifier": found},
                  no_index=no_index, no_classifier=no_classifier)


def _open_index(index: IndexConfig | None, collection: str | None = None) -> tuple[Any, str | None]:
    """(the index's store, or None; why there is none).

    Raises:
        IndexRefused: The embedded store is in use by another process, or the server cannot be reached.
    """
    import dataclasses

    from clip_pyfunc.search.store import NoIndex, open_store

    if index is None:
        return None, "no index: the app was started with --no-index; restart it without"
    try:
        if collection is None:
            return open_store(index, must_exist=True), None
        store = open_store(dataclasses.replace(index, collection=collection), must_exist=True, resolve=False)
        store.alias = index.collection
        return store, None
    except NoIndex as e:
        return None, f"{e}, then restart the app"


def _check_collection(store, infos: dict) -> str | None:
    """None when the collection holds the models' embedding space; why there is no index when it does not exist.

    Raises:
        IndexRefused: The collection holds another embedding space.
    """
    from clip_pyfunc.search.index import require_space
    from clip_pyfunc.search.store import IndexRefused, NoIndex

    try:
        space = store.space()
    except NoIndex as e:
        return f"{e}, then restart the app"
    for kind, info in infos.items():
        try:
            require_space(space, store.collection, kind, info)
        except IndexRefused as e:
            raise IndexRefused(f"{e}; or start the app with --text-name/--image-name/--alias naming the "
                               "collection's models, or with --no-index") from e
    return None


def _find_classifier(uri: str | None, required: bool) -> tuple[str | None, str | None]:
    """(the classifier's URI or None, why there is none); one the registry lacks is left out unless `required`."""
    from mlflow.exceptions import ErrorCode, MlflowException

    from clip_pyfunc.errors import ModelLoadError
    from clip_pyfunc.registry.lookup import model_info

    if not uri:
        return None, "no classifier: the app was started with --no-classifier"
    try:
        model_info(uri, "classifier")
        return uri, None
    except ModelLoadError as e:
        cause = e.__cause__
        missing = isinstance(cause, MlflowException) and cause.error_code == ErrorCode.Name(
            ErrorCode.RESOURCE_DOES_NOT_EXIST)
        if required or not missing:
            raise
    return None, (f"no classifier {uri} in the registry: register one with `clip-pyfunc register-classifier`, or "
                  "start the app with --classifier URI")
