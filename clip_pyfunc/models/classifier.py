"""The zero-shot image classifier: the image model plus a label matrix and the family's scoring
(clip_pyfunc.stages.score)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

from clip_pyfunc.artifacts.labels import load_labels
from clip_pyfunc.errors import InvalidInput, ModelLoadError, combine_row_errors, preview
from clip_pyfunc.models.image import ClipImageEmbedding
from clip_pyfunc.models.request import check_params
from clip_pyfunc.settings import is_template
from clip_pyfunc.stages.score import scores

LABELS_ARTIFACT = "labels"
DYNAMIC_HINT = ("this classifier was registered without the text tower, so its labels are fixed; register one "
                "that takes candidate_labels with `clip-pyfunc register-classifier --dynamic-labels`")


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
        super().load_context(context)
        self.label_record, self.label_matrix = load_labels(context.artifacts[LABELS_ARTIFACT])
        self.text_model = None
        if "text" in context.artifacts:
            from clip_pyfunc.models.text import ClipTextEmbedding

            self.text_model = ClipTextEmbedding()
            self.text_model.load_context(context)
            self._dynamic = functools.lru_cache(maxsize=self.config.label_cache_size)(self._label_vectors)

    def read_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Check top_k, candidate_labels and hypothesis_template; unknown names are an error."""
        params = check_params(params, self.params_schema)
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
            if template and not is_template(template):
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
        from clip_pyfunc.artifacts.labels import label_set

        templates = (template,) if template else tuple(self.label_record["templates"])
        return label_vectors(self.text_model, label_set(list(labels), templates, where="candidate_labels"))


def label_vectors(text_model, label_set_):
    """Each label's vector: its prompts' L2-normalised vectors averaged and re-normalised (OpenAI's
    prompt ensembling), float32 (labels, dim).

    Args:
        text_model: A loaded ClipTextEmbedding.
        label_set_: The labels and their prompts (artifacts.labels.LabelSet).

    Raises:
        ModelLoadError: A prompt cannot be embedded.
    """
    import numpy as np

    flat = [p for ps in label_set_.prompts for p in ps]
    vectors, errors = text_model.embed_rows(flat, normalize=True)
    if errors:
        raise ModelLoadError(f"label prompts could not be embedded: {[str(e) for e in errors[:3]]}")
    out, at = [], 0
    for ps in label_set_.prompts:
        mean = vectors[at : at + len(ps)].mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
        at += len(ps)
    return np.stack(out).astype(np.float32)
