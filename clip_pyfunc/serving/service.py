"""The one service the app's routes ask: embed texts and images, classify, search, describe the models.

Routes (serving.app, serving.openai_api) read requests and write answers; they never reach into a
model. Everything they need from the loaded models and the index goes through `EmbeddingService`,
which chains the models' own functions (`embed_rows`, the classifier's `predict`,
`search.query.Searcher`), so the app decodes, batches and scores nothing itself. Every method
that runs a model blocks: call it from a worker thread (starlette's `run_in_threadpool`).
"""

from __future__ import annotations

from typing import Any, Sequence


class EmbeddingService:
    """The loaded models and index behind the app (serving.loading.Loaded), as the routes may use them.

    Args:
        loaded: What `serving.loading.load` loaded: text and image models, and the classifier and
            searcher when present.
    """

    def __init__(self, loaded):
        self.loaded = loaded
        self._towers = {"text": loaded.text.unwrap_python_model(), "image": loaded.image.unwrap_python_model()}

    # ------------------------------------------------------------ what the models are

    @property
    def embedding_dim(self) -> int:
        """Dimension of every vector the service returns (both towers share one space)."""
        return self._towers["text"].embedding_dim

    @property
    def max_items(self) -> int:
        """Most rows one request may hold (the text model's `max_rows`)."""
        return self._towers["text"].config.max_rows

    @property
    def urls_on(self) -> bool:
        """Whether the image model fetches image URLs (its model_config's `allow_urls`)."""
        return self._towers["image"].url_policy is not None

    @property
    def image_limits(self):
        """The image model's decode limits (stages.decode.ImageLimits), for images the app shows."""
        return self._towers["image"].limits

    def served_by(self) -> dict[str, Any]:
        """{"text", "image": the model versions that answer, "collection": the collection searched, or None}:
        what a caller checks an answer's embedding space by, through a promotion."""
        searcher = self.loaded.searcher
        return {"text": self.loaded.versions.get("text"), "image": self.loaded.versions.get("image"),
                "collection": None if searcher is None else searcher.collection}

    def engines(self) -> list:
        """The engines running the text, image and classifier models (what serving.metrics.Health watches)."""
        models = [self.loaded.text, self.loaded.image, self.loaded.classifier]
        return [m.unwrap_python_model().engine for m in models
                if m is not None and hasattr(m.unwrap_python_model(), "engine")]

    def runtime(self) -> dict[str, dict[str, Any]]:
        """{"text": ..., "image": ...}: what runs each tower (engine, device, precision, threads, note)."""
        return {kind: tower.runtime_summary() for kind, tower in self._towers.items()}

    # ------------------------------------------------------------ what the models do

    def embed(self, kind: str, values: Sequence[object]):
        """Embed rows with one tower ("text" or "image"), normalised as its model_config says.

        Returns:
            (float32 array (n, dim) with NaN rows where a row failed, list of errors.InvalidInput);
            every row is checked, and no forward runs once a row failed.

        Raises:
            errors.Unavailable: The engine's guards refused the call (runtime.batching).
        """
        tower = self._towers[kind]
        return tower.embed_rows(list(values), normalize=tower.config.normalize, stop_on_error=True)

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the text tower reads for `texts`: its own tokenizer and truncation."""
        from clip_pyfunc.stages.preprocess import tokenize

        tower = self._towers["text"]
        return sum(len(ids) for ids in tokenize(tower.tokenizer, list(texts), tower.text_spec) if isinstance(ids, list))

    def classify(self, image, top_k: int):
        """The classifier's top `top_k` (labels, scores) for one image (base64 or bytes).

        Raises:
            MlflowException: The classifier refused the image (INVALID_PARAMETER_VALUE), or its engine's
                guards did (429, 503).
        """
        result = self.loaded.classifier.predict([image], params={"top_k": top_k})
        return list(result["labels"][0]), [float(s) for s in result["scores"][0]]

    def search(self, **query) -> list[dict[str, Any]]:
        """search.query.Searcher.search over the index (text, image or like; k; filters)."""
        return self.loaded.searcher.search(**query)
