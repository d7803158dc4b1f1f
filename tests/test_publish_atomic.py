"""Registration moves its aliases all or none, and records the embedding space every pair is checked against.

The module registers in a registry of its own (sqlite in a temp dir): checkpoint A twice (the second
registration moves the aliases the first set) and checkpoint B once, plus one registration that fails
part way.
"""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.registry import register_models
from clip_pyfunc.settings import load_settings

ALIAS = "champion"
KINDS = ("text", "image", "combined")


def _settings(checkpoint: str, **registry):
    return load_settings(None, {"model": {"source": checkpoint}, "registry": registry})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry of this module's own, so moving aliases touches no other test's models."""
    root = tmp_path_factory.mktemp("atomic")
    uri = f"sqlite:///{root}/reg.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(load_settings().registry.experiment, artifact_location=str(root / "artifacts"))
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(old)


@pytest.fixture(scope="module")
def first(registry, tiny_checkpoint) -> dict:
    """Checkpoint A, text, image and combined @champion."""
    return register_models(_settings(tiny_checkpoint, with_combined=True))


@pytest.fixture(scope="module")
def second(first, tiny_checkpoint) -> dict:
    """Checkpoint A again: new versions, in another run."""
    return register_models(_settings(tiny_checkpoint, with_combined=True))


@pytest.fixture(scope="module")
def other(registry, tmp_path_factory) -> dict:
    """Checkpoint B (other random weights, same shapes) as b_text / b_image @champion."""
    from clip_pyfunc.dev.random_checkpoint import save_random_checkpoint

    path = save_random_checkpoint(str(tmp_path_factory.mktemp("ckpt-b") / "tiny-clip-b"), "tiny", seed=1)
    return register_models(_settings(path, text_name="b_text", image_name="b_image"))


def _aliases(client, summary: dict, alias: str = ALIAS) -> dict[str, str | None]:
    """{kind: the version `alias` names now, or None} for the registered models of a summary."""
    found = {kind: client.get_registered_model(m["name"]).aliases.get(alias) for kind, m in summary["models"].items()}
    return {kind: None if version is None else str(version) for kind, version in found.items()}


def _pinned(model: dict) -> str:
    return f"models:/{model['name']}/{model['version']}"


def test_a_registration_that_fails_after_the_text_version_moves_no_alias(registry, first, tiny_checkpoint,
                                                                         monkeypatch):
    from clip_pyfunc.registry import publish

    real = publish.log_tower

    def image_fails(*args, **kwargs):  # a platform fault while logging the second tower
        if args[2] == "image":
            raise RuntimeError("registry unavailable")
        return real(*args, **kwargs)

    before = _aliases(registry, first)
    text_name = first["models"]["text"]["name"]
    versions = len(registry.search_model_versions(f"name='{text_name}'"))
    monkeypatch.setattr(publish, "log_tower", image_fails)
    with pytest.raises(RuntimeError, match="registry unavailable"):
        register_models(_settings(tiny_checkpoint, with_combined=True))
    assert len(registry.search_model_versions(f"name='{text_name}'")) == versions + 1  # the text version exists
    assert _aliases(registry, first) == before  # ... and no alias names it


def test_a_registration_moves_every_alias_and_one_checkpoint_is_one_space(registry, first, second, other):
    from clip_pyfunc.registry.lookup import embedding_space

    assert _aliases(registry, second) == {kind: second["models"][kind]["version"] for kind in KINDS}
    assert all(first["models"][k]["version"] != second["models"][k]["version"] for k in KINDS)
    assert first["run_id"] != second["run_id"]
    space = first["embedding_space"]
    assert space.startswith("sha256:") and space.endswith("/32") and second["embedding_space"] == space
    for summary in (first, second):
        for model in summary["models"].values():
            assert registry.get_model_version(model["name"], model["version"]).tags["embedding_space"] == space
            assert embedding_space(mlflow.models.get_model_info(_pinned(model))) == space
    assert other["embedding_space"] != space


def test_a_failed_alias_move_puts_back_the_aliases_already_moved(registry, first, second):
    from clip_pyfunc.registry.publish import move_aliases

    text, image, combined = (second["models"][k]["name"] for k in KINDS)
    registry.set_registered_model_alias(text, "rollback", second["models"]["text"]["version"])
    moves = {text: first["models"]["text"]["version"], combined: first["models"]["combined"]["version"],
             image: "999"}  # no such version: the registry refuses the third move
    with pytest.raises(MlflowException):
        move_aliases(registry, "rollback", moves)
    assert str(registry.get_registered_model(text).aliases.get("rollback")) == second["models"]["text"]["version"]
    assert "rollback" not in registry.get_registered_model(combined).aliases  # it had none: deleted again
    assert "rollback" not in registry.get_registered_model(image).aliases


def test_embedding_space_of_models_logged_before_it_was_recorded_is_their_run():
    from mlflow.models import Model

    from clip_pyfunc.registry.lookup import embedding_space, require_same_space

    text, image, elsewhere = Model(run_id="r1"), Model(run_id="r1"), Model(run_id="r2")
    assert embedding_space(text) == "run:r1"
    assert require_same_space(text, image, "models:/t/1", "models:/i/1") == "run:r1"
    with pytest.raises(ModelLoadError, match="models:/t/1 .*run:r1.*models:/i/2 .*run:r2"):
        require_same_space(text, elsewhere, "models:/t/1", "models:/i/2")


def test_the_app_refuses_a_text_and_an_image_model_of_two_checkpoints(first, second, other):
    from clip_pyfunc.serving.loading import load

    text_uri, image_uri = second["models"]["text"]["uri"], other["models"]["image"]["uri"]
    with pytest.raises(ModelLoadError) as refused:
        load(text_uri, image_uri, None, index=None)
    message = str(refused.value)
    for named in (text_uri, image_uri, first["embedding_space"], other["embedding_space"]):
        assert named in message
    # Two registrations (two runs) of one checkpoint are one space.
    loaded = load(text_uri, _pinned(first["models"]["image"]), None, index=None)
    assert loaded.text is not None and loaded.image is not None


def test_evaluate_refuses_a_run_that_pairs_two_checkpoints(registry, tmp_path, first, other):
    from clip_pyfunc.batch.evaluate.run import load_candidate
    from clip_pyfunc.registry.lookup import run_models

    # B's image model registered by hand against A's run: the run now pairs A's text with B's image.
    foreign = other["models"]["image"]
    registry.create_registered_model("a_mixed_image")
    source = registry.get_model_version(foreign["name"], foreign["version"]).source
    registry.create_model_version("a_mixed_image", source, run_id=first["run_id"])
    text_uri = _pinned(first["models"]["text"])
    assert run_models(text_uri)["image"] == "models:/a_mixed_image/1"
    with pytest.raises(ModelLoadError) as refused:
        load_candidate(text_uri, str(tmp_path))
    message = str(refused.value)
    for named in (text_uri, "models:/a_mixed_image/1", first["embedding_space"], other["embedding_space"]):
        assert named in message
