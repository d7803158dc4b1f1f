"""The zero-shot image classifier: the image model plus a label matrix and the family's scoring.

Scores follow the family, as transformers' zero-shot-image-classification pipeline does: a
softmax over labels of scale*cos for CLIP-like families (scale = exp(logit_scale), or
1/temperature for ALIGN), an independent sigmoid(scale*cos + bias) per label for SigLIP.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

from clip_pyfunc.errors import InvalidInput, ModelLoadError, combine_row_errors, preview
from clip_pyfunc.image_model import ClipImageEmbedding

LABELS_ARTIFACT = "labels"
VECTORS_FILE, LABELS_FILE = "labels.safetensors", "labels.json"
DYNAMIC_HINT = ("this classifier was registered without the text tower, so its labels are fixed; register one "
                "that takes candidate_labels with `clip-pyfunc register-classifier --dynamic-labels`")


def scores(similarities, scoring: str, scale: float, bias: float):
    """Scores (n, labels) from cosine similarities, by the family's rule (float64)."""
    import numpy as np

    logits = scale * np.asarray(similarities, dtype=np.float64) + bias
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


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


class ClipZeroShotClassifier(ClipImageEmbedding):
    """Zero-shot image classification as a pyfunc model.

    Input: the image model's (`input` column of base64 strings or raw bytes, same limits and
    errors). Output: a DataFrame with `labels` (best first) and `scores`. Params: `top_k` (0 or
    at least the number of labels returns all), and, where the text tower was registered with
    it (--dynamic-labels), `candidate_labels` and `hypothesis_template` for one request.
    """

    params_schema: dict[str, Any] = {"top_k": 3, "candidate_labels": [], "hypothesis_template": ""}

    def load_context(self, context) -> None:
        """Load the image tower, the label matrix and, when shipped, the text tower."""
        from safetensors.numpy import load_file

        super().load_context(context)
        folder = context.artifacts[LABELS_ARTIFACT]
        try:
            with open(os.path.join(folder, LABELS_FILE), encoding="utf-8") as f:
                self.label_record = json.load(f)
            self.label_matrix = load_file(os.path.join(folder, VECTORS_FILE))["vectors"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read the classifier's labels in {folder}: {e}") from e
        self.text_model = None
        if "text" in context.artifacts:
            from clip_pyfunc.text_model import ClipTextEmbedding

            self.text_model = ClipTextEmbedding()
            self.text_model.load_context(context)
            self._dynamic = functools.lru_cache(maxsize=self.config.label_cache_size)(self._label_vectors)

    def read_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Check top_k, candidate_labels and hypothesis_template; unknown names are an error."""
        params = dict(params or {})
        unknown = set(params) - set(self.params_schema)
        if unknown:
            raise InvalidInput(f"unknown params {sorted(unknown)}; allowed: {sorted(self.params_schema)}")
        top_k = params.get("top_k", self.label_record.get("top_k", self.params_schema["top_k"]))
        if isinstance(top_k, str) and top_k.strip().isdigit():
            top_k = int(top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise InvalidInput(f"param 'top_k' must be a whole number >= 0 (0 returns every label), got {preview(top_k)}")
        labels = params.get("candidate_labels") or []
        if hasattr(labels, "tolist"):
            labels = labels.tolist()
        template = params.get("hypothesis_template") or ""
        if labels or template:
            if self.text_model is None:
                raise InvalidInput(f"params candidate_labels / hypothesis_template: {DYNAMIC_HINT}")
            if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
                raise InvalidInput(f"param 'candidate_labels' must be a list of non-empty strings, got {preview(labels)}")
            if len(set(labels)) != len(labels):
                raise InvalidInput(f"param 'candidate_labels' has duplicates: {preview(labels)}")
            if template and (not isinstance(template, str) or template.count("{}") != 1):
                raise InvalidInput(f"param 'hypothesis_template' must contain '{{}}' once, got {preview(template)}")
        return {"top_k": top_k, "candidate_labels": tuple(labels), "hypothesis_template": template}

    def respond(self, values: Sequence[object], params: dict[str, Any]):
        """The top_k labels and scores of each row, best first (a DataFrame)."""
        import pandas as pd

        vectors, errors = self.embed_rows(values, normalize=True, stop_on_error=True)
        if errors:
            raise combine_row_errors(errors)
        labels, ranked = self.classify(vectors, params)
        return pd.DataFrame({"labels": labels, "scores": ranked})

    def table_columns(self, values: Sequence[object], *, normalize: bool | None = None):
        """Per-row `labels` and `scores` for table jobs (Spark), None where a row failed, and the row errors."""
        vectors, errors = self.embed_rows(values, normalize=True)
        labels, ranked = self.classify(vectors, self.read_params(None))  # failed rows are NaN: None here
        return {"labels": labels, "scores": ranked}, errors

    def classify(self, vectors, params: dict[str, Any]):
        """Per row of normalised image vectors: (top labels, their scores), NaN rows giving None."""
        import numpy as np

        names, matrix = self._labels_for(params)
        info = self.info
        k = params["top_k"] if 0 < params["top_k"] < len(names) else len(names)
        out_labels, out_scores = [], []
        finite = ~np.isnan(vectors).any(axis=1)
        s = np.full((len(vectors), len(names)), np.nan)
        if finite.any():
            s[finite] = scores(vectors[finite] @ matrix.T, info.scoring, info.scale, info.bias)
        for row in range(len(vectors)):
            if not finite[row]:
                out_labels.append(None)
                out_scores.append(None)
                continue
            order = np.argsort(-s[row], kind="stable")[:k]
            out_labels.append([names[i] for i in order])
            out_scores.append([float(s[row, i]) for i in order])
        return out_labels, out_scores

    def _labels_for(self, params):
        if params["candidate_labels"] or params["hypothesis_template"]:
            labels = params["candidate_labels"] or tuple(self.label_record["labels"])
            return list(labels), self._dynamic(labels, params["hypothesis_template"])
        return self.label_record["labels"], self.label_matrix

    def _label_vectors(self, labels: tuple[str, ...], template: str):
        """Label vectors for one request's labels and template (cached, bounded by label_cache_size)."""
        from clip_pyfunc.labels import label_set, label_vectors

        templates = (template,) if template else tuple(self.label_record["templates"])
        return label_vectors(self.text_model, label_set(list(labels), templates, where="candidate_labels"))
