"""Find a dual-encoder checkpoint: a hub id or a local directory in transformers format.

The hub download is the package's only network access besides image URLs (stages.fetch):
huggingface_hub honours the hub cache, a revision and HF_HUB_OFFLINE itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from clip_pyfunc.errors import ModelLoadError

_HUB_FILES = ["*.json", "*.txt", "*.safetensors", "*.model"]  # *.model: SentencePiece vocabularies
_HUB_FALLBACK_WEIGHTS = ["pytorch_model.bin"]
# config.json keys that mark a checkpoint built by clip_pyfunc.dev: random weights with real
# shapes, or the toy trained on generated shapes. Their vectors must never pass for real ones.
RANDOM_INIT_KEY = "clip_pyfunc_random_init"
TOY_KEY = "clip_pyfunc_toy"
# What every summary, description, page and report says of such weights: (heading, reason).
TOY_CAVEAT = ("toy checkpoint", "trained only on generated coloured shapes; its vectors mean nothing else")
RANDOM_CAVEAT = ("random weights", "a stand-in with real shapes; its vectors and scores are meaningless")
TOY_WARNING, RANDOM_WARNING = (": ".join(c) for c in (TOY_CAVEAT, RANDOM_CAVEAT))


def weights_caveat(*, random_init: object = None, toy: object = None) -> tuple[str, str] | None:
    """(heading, reason) for toy or random weights (a checkpoint's record, or a model's tags), None for
    real ones. Summaries say "heading: reason", version descriptions "HEADING: reason.", pages
    "Heading: reason."."""
    if toy:
        return TOY_CAVEAT
    if random_init:
        return RANDOM_CAVEAT
    return None


@dataclass(frozen=True, kw_only=True)
class ResolvedCheckpoint:
    """A checkpoint on local disk, and what the registry records about it.

    Attributes:
        path: Local directory in transformers CLIP format.
        source: What the user asked for (hub id or directory).
        revision: The hub commit of the snapshot, or "local" for a directory.
        random_init: The architecture name when the weights are random (see dev.random_checkpoint).
        toy: The toy checkpoint's record (task, labels, zero-shot accuracy) when it is the
            trained toy (see dev.toy_checkpoint); None otherwise.
        model_type: The config's `model_type`, checked to be a supported family.
    """

    path: str
    source: str
    revision: str
    random_init: str | None
    toy: dict | None = None
    model_type: str = "clip"

    @property
    def caveat(self) -> tuple[str, str] | None:
        """(heading, reason) for toy or random weights (weights_caveat), None for real weights."""
        return weights_caveat(random_init=self.random_init, toy=self.toy)

    @property
    def warning(self) -> str | None:
        """The caveat as one line ("heading: reason"), None for real weights."""
        return ": ".join(self.caveat) if self.caveat else None


def resolve_checkpoint(source: str, revision: str | None = None, cache_dir: str | None = None) -> ResolvedCheckpoint:
    """Return a local directory for `source`, downloading from the hub when it is a hub id.

    Args:
        source: A local directory, or a Hugging Face hub id such as "openai/clip-vit-base-patch32".
        revision: Hub branch, tag or commit (ignored for a directory).
        cache_dir: Hub cache directory; None uses Hugging Face's default.

    Returns:
        The resolved checkpoint.

    Raises:
        ModelLoadError: The directory is not a CLIP checkpoint, or the hub cannot be reached
            and no cached snapshot exists.
    """
    if os.path.isdir(source):
        path, resolved_revision = source, "local"
    elif source.startswith((".", "~", os.path.sep)) or source.count("/") > 1:
        raise ModelLoadError(f"model directory {source!r} does not exist (a hub id looks like 'org/name')")
    else:
        path = _download(source, revision, cache_dir)
        resolved_revision = os.path.basename(os.path.normpath(path))
    config = read_config(path)
    return ResolvedCheckpoint(
        path=path, source=source, revision=resolved_revision, random_init=config.get(RANDOM_INIT_KEY),
        toy=config.get(TOY_KEY), model_type=config["model_type"],
    )


def read_config(path: str) -> dict:
    """Read the checkpoint's config.json and check that its `model_type` is a supported family."""
    from clip_pyfunc.families import family_for

    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a transformers checkpoint: cannot read config.json ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object")
    family_for(config.get("model_type"), where=path)
    return config


def _download(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_FILES)
        if not any(name.endswith(".safetensors") for name in os.listdir(path)):
            path = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_FILES + _HUB_FALLBACK_WEIGHTS
            )
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(
            f"could not reach the Hugging Face hub for {repo_id!r} (revision {revision or 'default'}) and no copy "
            f"is in the hub cache ({cache_dir or 'HF_HUB_CACHE default'}). Pass a local directory in transformers "
            "format instead, e.g. `clip-pyfunc register --model /path/to/clip-vit-base-patch32`, or fill the "
            "cache on a connected machine and set HF_HUB_OFFLINE=1."
        ) from e
    except (HfHubHTTPError, HFValidationError) as e:
        raise ModelLoadError(f"the hub refused {repo_id!r} at revision {revision or 'default'}: {e}") from e
    return path
