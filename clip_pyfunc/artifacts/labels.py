"""Label sets for the zero-shot classifier: read and checked once at registration, saved as an artifact.

A label file (YAML) holds `labels`, a list whose entries are a label, or {name, synonyms} (each
synonym is filled into the templates too), or {name, prompts} (the label's own prompts, used
instead of the templates); optionally a `name` and `templates`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from clip_pyfunc.errors import ModelLoadError
from clip_pyfunc.settings import is_template

VECTORS_FILE, LABELS_FILE = "labels.safetensors", "labels.json"


@dataclass(frozen=True, kw_only=True)
class LabelSet:
    """Labels and the prompts whose vectors make each label's vector.

    Attributes:
        name: The set's name (registry tag).
        labels: Label names, in order (the classifier's output names).
        prompts: Per label, the texts whose normalised vectors are averaged.
        templates: The templates used (for the record).
    """

    name: str
    labels: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]

    @property
    def digest(self) -> str:
        """A short hash of the labels and prompts: two sets with one digest score alike."""
        text = json.dumps([self.labels, self.prompts], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def label_set(labels, templates, name: str = "labels", where: str = "labels") -> LabelSet:
    """Check label entries and expand them into prompts.

    Raises:
        ModelLoadError: An empty set, a duplicate, a non-string or empty label, or a bad template.
    """
    templates = tuple(templates)
    if not templates or not all(is_template(t) for t in templates):
        raise ModelLoadError(f"{where}: templates must be strings with one '{{}}' each, got {list(templates)!r}")
    if not isinstance(labels, (list, tuple)) or not labels:
        raise ModelLoadError(f"{where}: needs a non-empty list of labels, got {labels!r}")
    names, prompts = [], []
    for i, entry in enumerate(labels):
        own = None
        synonyms: list = []
        if isinstance(entry, dict):
            unknown = set(entry) - {"name", "synonyms", "prompts"}
            if unknown:
                raise ModelLoadError(f"{where}: label {i} has unknown keys {sorted(unknown)}; allowed: name, synonyms, prompts")
            label, synonyms, own = entry.get("name"), entry.get("synonyms") or [], entry.get("prompts")
        else:
            label = entry
        if not isinstance(label, str):
            raise ModelLoadError(f"{where}: label {i} must be a string, got {type(label).__name__} {label!r}")
        if not label.strip():
            raise ModelLoadError(f"{where}: label {i} is empty")
        for what, values in (("synonyms", synonyms), ("prompts", own or [])):
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ModelLoadError(f"{where}: label {label!r}: {what} must be a list of non-empty strings")
        if own is not None and not own:
            raise ModelLoadError(f"{where}: label {label!r}: prompts is empty")
        if label in names:
            raise ModelLoadError(f"{where}: label {label!r} appears twice (labels {names.index(label)} and {i})")
        names.append(label)
        prompts.append(tuple(own) if own else tuple(t.format(x) for x in [label, *synonyms] for t in templates))
    return LabelSet(name=name, labels=tuple(names), prompts=tuple(prompts), templates=templates)


def read_label_file(path: str, default_templates) -> LabelSet:
    """Read a label file (see the module docstring).

    Raises:
        ModelLoadError: Unreadable, not a mapping with `labels`, or any label check fails.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ModelLoadError(f"cannot read label file {path}: {e}") from e
    if not isinstance(data, dict) or "labels" not in data:
        raise ModelLoadError(f"label file {path} must be a mapping with a 'labels' list")
    unknown = set(data) - {"name", "labels", "templates"}
    if unknown:
        raise ModelLoadError(f"label file {path}: unknown keys {sorted(unknown)}; allowed: name, labels, templates")
    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    return label_set(data["labels"], data.get("templates") or default_templates, name=str(name), where=path)


def save_labels(target: str, label_set, vectors, top_k: int = 3) -> str:
    """Write the label matrix (safetensors) and the label list with its record (JSON): no pickle."""
    from safetensors.numpy import save_file

    os.makedirs(target, exist_ok=True)
    save_file({"vectors": vectors}, os.path.join(target, VECTORS_FILE))
    with open(os.path.join(target, LABELS_FILE), "w", encoding="utf-8") as f:
        json.dump({"name": label_set.name, "digest": label_set.digest, "labels": list(label_set.labels),
                   "templates": list(label_set.templates), "prompts": [list(p) for p in label_set.prompts],
                   "top_k": top_k},
                  f, ensure_ascii=False, indent=2)
    return target


def load_labels(folder: str):
    """Read a labels artifact written by `save_labels`: (its record, the label matrix float32 (labels, dim)).

    Raises:
        ModelLoadError: Missing or malformed files.
    """
    from safetensors.numpy import load_file

    try:
        with open(os.path.join(folder, LABELS_FILE), encoding="utf-8") as f:
            record = json.load(f)
        return record, load_file(os.path.join(folder, VECTORS_FILE))["vectors"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read the classifier's labels in {folder}: {e}") from e
