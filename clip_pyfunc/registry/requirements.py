"""What a logged model carries besides its weights: its pip requirements and its code.

The requirements are the one dependency list's model part (clip_pyfunc.dependencies), pinned
to what logged it, as MLflow's own flavors do. The code is the part of the package a served
model imports (see MODEL_CODE): never the registry, batch, search, serving, cli, dev or
benchmarks rooms.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil

from clip_pyfunc.dependencies import MODEL_REQUIREMENTS, TORCH_FREE_REQUIREMENTS, TRANSFORMERS_REQUIREMENTS

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The rooms a served model imports: everything below `models`, and `models` itself. A test
# loads each logged model from this code alone and checks the import direction that makes it enough.
MODEL_CODE = ("__init__.py", "errors.py", "settings.py", "runtime", "families", "stages", "artifacts", "models")


def pip_requirements(torch_free: bool = False, transformers: bool = True) -> list[str]:
    """Exact pins of the model's runtime dependencies as installed now (local build tags dropped).

    Args:
        torch_free: The model runs on OpenVINO alone (TORCH_FREE_REQUIREMENTS).
        transformers: With torch_free, the model still needs transformers (its tokenizer or NaFlex sizing).
    """
    names = MODEL_REQUIREMENTS
    if torch_free:
        names = TORCH_FREE_REQUIREMENTS + (TRANSFORMERS_REQUIREMENTS if transformers else ())
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


def entry_file(model: str) -> str:
    """The models-from-code file that builds `model` ("text", "image", "combined" or "classifier")."""
    return os.path.join(PACKAGE_DIR, "models", "entry", f"{model}.py")


def copy_model_code(target: str) -> str:
    """Copy the rooms a served model imports (MODEL_CODE, no caches) into `target`/clip_pyfunc, for `code_paths`."""
    dest = os.path.join(target, "clip_pyfunc")
    os.makedirs(dest, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in MODEL_CODE:
        source = os.path.join(PACKAGE_DIR, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(dest, name), ignore=ignore)
        else:
            shutil.copy2(source, dest)
    return dest
