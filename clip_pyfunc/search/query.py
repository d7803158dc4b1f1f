"""Query an index: by words, by photo or by a stored item, and find near-duplicates.

Queries are embedded with the models the collection's space records (search.index.Space), so
they land in the space the vectors came from.
"""

from __future__ import annotations

from typing import Any

from clip_pyfunc.errors import InvalidInput, ModelLoadError
from clip_pyfunc.registry.lookup import load_model
from clip_pyfunc.search.index import ID_KEY, collection_space, point_id, require_space


def parse_filters(pairs: list[str] | None):
    """`key=value` strings -> a Qdrant filter that every pair must match (numbers match as numbers too).

    Raises:
        InvalidInput: A pair without '='.
    """
    from qdrant_client import models

    must = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"filter {pair!r} must be key=value")
        options: list = [value]
        if value.lstrip("-").isdigit():
            options.append(int(value))
        elif value.lower() in ("true", "false"):
            options.append(value.lower() == "true")
        must.append(models.Filter(should=[models.FieldCondition(key=key, match=models.MatchValue(value=v))
                                          for v in options]))
    return models.Filter(must=must) if must else None


class Searcher:
    """Queries one collection, embedding them with the models its space records (loaded once)."""

    def __init__(self, client, collection: str, text_model=None, image_model=None):
        """Open a collection for queries.

        Args:
            client: From `open_client`.
            collection: The collection name.
            text_model: A loaded text pyfunc model to embed queries with; None loads the space's own on first use.
            image_model: The same for images.

        Raises:
            NoIndex: No such collection.
            IndexRefused: A given model is of another embedding space than the collection's vectors.
        """
        self.client, self.collection = client, collection
        self.space = collection_space(client, collection)
        self._models = {"text": text_model, "image": image_model}
        for kind, model in self._models.items():
            if model is not None:
                self._require_space(kind, model)

    def _require_space(self, kind: str, model) -> None:
        """Refuse a loaded model of another embedding space than the collection's."""
        require_space(self.space, self.collection, kind, model.metadata)

    def model(self, kind: str):
        """The space's text or image pyfunc model."""
        if self._models.get(kind) is None:
            uri = self.space.models.get(kind)
            if not uri:
                raise ModelLoadError(f"the collection's run {self.space.run_id} registered no {kind} model to embed "
                                     f"queries with; it holds {sorted(self.space.models)}")
            self._models[kind] = load_model(uri, f"collection {self.collection!r}: its {kind} model")
        return self._models[kind]

    def query_vector(self, *, text: str | None = None, image: bytes | str | None = None, like: object = None):
        """The vector of exactly one query: words, an image (bytes or base64) or a stored item's id."""
        given = [name for name, v in (("text", text), ("image", image), ("like", like)) if v is not None]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one of text, image or like; got {given or 'none'}")
        if like is not None:
            found = self.client.retrieve(self.collection, [point_id(like)], with_vectors=True)
            if not found:
                raise InvalidInput(f"like: no item with id {like!r} in collection {self.collection!r}")
            return found[0].vector
        kind, value = ("text", text) if text is not None else ("image", image)
        return self.model(kind).predict([value])[0].tolist()

    def search(self, *, text=None, image=None, like=None, k: int = 10, filters: list[str] | None = None):
        """The k best items: [{"id", "score", "payload"}], best first (the `like` item itself left out)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise InvalidInput(f"k must be a whole number from 1 to 1000, got {k!r}")
        vector = self.query_vector(text=text, image=image, like=like)
        query_filter = parse_filters(filters)
        hits = self.client.query_points(self.collection, query=vector, limit=k + (like is not None),
                                        query_filter=query_filter, with_payload=True).points
        out = []
        for hit in hits:
            payload = dict(hit.payload or {})
            item = payload.pop(ID_KEY, hit.id)
            if like is not None and str(item) == str(like):
                continue
            out.append({"id": item, "score": float(hit.score), "payload": payload})
        return out[:k]


def duplicate_groups(client, collection: str, threshold: float = 0.95, block: int = 2048) -> list[dict[str, Any]]:
    """Groups of items whose vectors are at least `threshold` cosine-similar (linked transitively).

    Brute force over all vectors in blocks, so memory stays at block x points floats.

    Returns:
        [{"ids": [...], "size": n, "min_score": lowest linking score, "max_score": ...}], largest first.
    """
    import numpy as np

    if not -1.0 <= threshold <= 1.0:
        raise InvalidInput(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    collection_space(client, collection)
    ids, vectors, offset = [], [], None
    while True:
        points, offset = client.scroll(collection, limit=1024, offset=offset, with_vectors=True, with_payload=[ID_KEY])
        for p in points:
            ids.append((p.payload or {}).get(ID_KEY, p.id))
            vectors.append(p.vector)
        if offset is None:
            break
    if not ids:
        return []
    matrix = np.asarray(vectors, dtype=np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    parent = list(range(len(ids)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links: dict[tuple[int, int], float] = {}
    for start in range(0, len(ids), block):
        sims = matrix[start:start + block] @ matrix.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c > i:
                links[(i, c)] = float(sims[r, c])
                parent[root(i)] = root(c)
    groups: dict[int, list[int]] = {}
    for i in {i for pair in links for i in pair}:
        groups.setdefault(root(i), []).append(i)
    scores: dict[int, list[float]] = {}
    for (a, _), score in links.items():
        scores.setdefault(root(a), []).append(score)
    out = []
    for group, members in groups.items():
        members.sort(key=lambda i: str(ids[i]))
        out.append({"ids": [ids[i] for i in members], "size": len(members),
                    "min_score": round(min(scores[group]), 6), "max_score": round(max(scores[group]), 6)})
    out.sort(key=lambda g: (-g["size"], -g["max_score"]))
    return out
