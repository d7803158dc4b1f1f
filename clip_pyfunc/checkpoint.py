"""Find a CLIP checkpoint (hub id or local directory) and split it into per-tower artifacts.

This is the only module that reaches the network: the hub download, with the hub cache,
a revision and HF_HUB_OFFLINE honoured by huggingface_hub itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.random_checkpoint import RANDOM_INIT_KEY

_HUB_FILES = ["*.json", "*.txt", "*.safetensors"]
_HUB_FALLBACK_WEIGHTS = ["pytorch_model.bin"]
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TOWERS = ("text", "image")


@dataclass(frozen=True, kw_only=True)
class ResolvedCheckpoint:
    """A checkpoint on local disk, and what the registry records about it.

    Attributes:
        path: Local directory in transformers CLIP format.
        source: What the user asked for (hub id or directory).
        revision: The hub commit of the snapshot, or "local" for a directory.
        random_init: The architecture name when the weights are random (see random_checkpoint).
    """

    path: str
    source: str
    revision: str
    random_init: str | None


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
    config = read_clip_config(path)
    return ResolvedCheckpoint(
        path=path, source=source, revision=resolved_revision, random_init=config.get(RANDOM_INIT_KEY)
    )


def read_clip_config(path: str) -> dict:
    """Read and check the checkpoint's config.json (a CLIPModel config)."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a transformers checkpoint: cannot read config.json ({e})") from e
    if config.get("model_type") != "clip":
        raise ModelLoadError(
            f"{path} holds a {config.get('model_type')!r} model; clip-pyfunc needs a transformers CLIP "
            "checkpoint (model_type 'clip': OpenAI, LAION/OpenCLIP or MetaCLIP exports)"
        )
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


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars while we split towers on purpose."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def export_tower(checkpoint: ResolvedCheckpoint, tower: str, target: str) -> str:
    """Write one tower (weights in safetensors, plus its tokenizer or image processor) to `target`.

    The text artifact holds only `text_model.*` and `text_projection`; the image artifact only
    `vision_model.*` and `visual_projection`. Weights are saved in fp32, the reference precision.

    Args:
        checkpoint: The resolved checkpoint.
        tower: "text" or "image".
        target: Directory to create.

    Returns:
        `target`.

    Raises:
        ModelLoadError: The checkpoint lacks the tower's files or weights.
    """
    import torch
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    model_cls = CLIPTextModelWithProjection if tower == "text" else CLIPVisionModelWithProjection
    os.makedirs(target, exist_ok=True)
    try:
        with quiet_transformers():
            model = model_cls.from_pretrained(checkpoint.path, dtype=torch.float32)
            model.save_pretrained(target, safe_serialization=True)
            if tower == "text":
                AutoTokenizer.from_pretrained(checkpoint.path).save_pretrained(target)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the {tower} tower of {checkpoint.source}: {e}") from e
    if tower == "image":
        src = os.path.join(checkpoint.path, PREPROCESSOR_CONFIG)
        if not os.path.exists(src):
            raise ModelLoadError(f"{checkpoint.source} has no {PREPROCESSOR_CONFIG}; the image model needs it")
        shutil.copyfile(src, os.path.join(target, PREPROCESSOR_CONFIG))
    return target
